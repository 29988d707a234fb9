"""Collator and label invariants under arbitrary mixes of lengths, images and label masks (hypothesis)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.chat import ProcessedSample
from vlmlab.collators import (CollatorError, PackedDataCollator, StandardDataCollator, assert_packed_batch,
                              mrope_position_ids, plan_packs)

PAD, IMG = 0, 7


@st.composite
def samples(draw, idx=0):
    "A fake processed sample: text runs, 0-2 images with consistent grids, a random label mask on text."
    parts, grids = [], []
    for _ in range(draw(st.integers(0, 2))):
        parts.append(('text', draw(st.integers(1, 30))))
        t, h, w = 1, 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
        grids.append([t, h, w]); parts.append(('image', t * h * w // 4))
    parts.append(('text', draw(st.integers(2, 40))))
    ids, mm = [], []
    for kind, n in parts:
        ids += [IMG] * n if kind == 'image' else draw(st.lists(st.integers(10, 99), min_size=n, max_size=n))
        mm += [1 if kind == 'image' else 0] * n
    ids, mm = torch.tensor(ids), torch.tensor(mm, dtype=torch.int32)
    kind = torch.tensor([0 if m else draw(st.sampled_from([0, 0, 1, 2])) for m in mm.tolist()], dtype=torch.int32)
    kind[0] = 0  # a sample starts with prompt markup
    labels = torch.where(kind > 0, ids, torch.full_like(ids, -100))
    g = torch.tensor(grids) if grids else None
    pv = torch.randn(int(g.prod(-1).sum()), 3) if grids else None
    return ProcessedSample(f's{idx}-{draw(st.integers(0, 10**6))}', ids, labels, mm, kind, pv, g, {}, [])


BATCHES = st.lists(samples(), min_size=1, max_size=5)


@settings(max_examples=500, deadline=None)
@given(batch=BATCHES, multiple=st.sampled_from([None, 1, 8, 64]))
def test_packed_invariants(batch, multiple):
    out = PackedDataCollator(PAD, pad_to_multiple_of=multiple)(batch)
    assert_packed_batch(out)
    cu, T = out['cu_seqlens'], out['input_ids'].shape[1]
    assert int(cu[0]) == 0 and int(cu[-1]) == T and bool((cu[1:] > cu[:-1]).all())
    if multiple: assert T % multiple == 0
    for k in ('labels', 'mm_token_type_ids', 'label_kind'): assert out[k].shape == out['input_ids'].shape
    assert out['position_ids'].shape == (4, 1, T)
    # labels are -100 exactly where the sample had no label, and at every boundary
    expected = torch.cat([s.labels for s in batch])
    expected[cu[:len(batch)].long()] = -100
    got = out['labels'][0]
    assert torch.equal(got[:len(expected)], expected) and bool((got[len(expected):] == -100).all())
    # per sample: text row restarts at 0, mRoPE rows are the sample's own
    for s, a in zip(batch, cu[:-1].tolist()):
        n = len(s)
        assert torch.equal(out['position_ids'][0, 0, a:a + n], torch.arange(n))
        assert torch.equal(out['position_ids'][1:, 0, a:a + n], mrope_position_ids(s.mm_token_type_ids, s.image_grid_thw))
    if out.get('pixel_values') is not None:
        assert out['pixel_values'].shape[0] == int(out['image_grid_thw'].prod(-1).sum())


@settings(max_examples=500, deadline=None)
@given(batch=BATCHES, multiple=st.sampled_from([None, 8]))
def test_standard_invariants(batch, multiple):
    out = StandardDataCollator(PAD, pad_to_multiple_of=multiple)(batch)
    B, L = out['input_ids'].shape
    assert B == len(batch) and L >= max(len(s) for s in batch) and (not multiple or L % multiple == 0)
    assert out['attention_mask'].dtype == torch.bool
    assert out['attention_mask'].sum(1).tolist() == [len(s) for s in batch]
    for k in ('labels', 'mm_token_type_ids', 'label_kind'): assert out[k].shape == (B, L)
    for i, s in enumerate(batch):
        assert torch.equal(out['labels'][i, :len(s)], s.labels) and bool((out['labels'][i, len(s):] == -100).all())


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 4096), min_size=1, max_size=400), cap=st.sampled_from([4096, 8192]))
def test_plan_packs_is_a_partition_within_capacity(lengths, cap):
    packs = plan_packs(lengths, cap)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= cap for p in packs)
    # an any-fit rule never opens a row for a sample that fits an open one, so any two rows together overflow
    loads = sorted(sum(lengths[i] for i in p) for p in packs)
    assert len(loads) < 2 or loads[0] + loads[1] > cap


def test_collators_refuse_broken_contracts():
    import pytest
    ids = torch.arange(10, 20)
    s = ProcessedSample('s', ids, ids.clone(), torch.zeros(10, dtype=torch.int32), torch.ones(10, dtype=torch.int32), None, None, {}, [])
    with pytest.raises(CollatorError, match='max_tokens'):
        PackedDataCollator(PAD, max_tokens=1)([s])
    bad = ProcessedSample('x', s.input_ids, s.labels, s.mm_token_type_ids, s.label_kind,
                          torch.randn(3, 3), torch.tensor([[1, 4, 4]]), {}, [])
    with pytest.raises(CollatorError, match='sum\\(prod\\(grid_thw\\)\\)'):
        StandardDataCollator(PAD)([bad])
