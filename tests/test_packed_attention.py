"""vlmlab's packed attention: packed rows equal the solo runs and transformers' sdpa (logits and gradients) in every tiny
family, no T x T mask for packed rows, the collator's boundaries win, and only the language model changes attention."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.masking_utils import create_causal_mask

import vlmlab.attention as attention
from vlmlab.attention import (PACKED_ATTENTION, packed_attention_implementation, packed_boundaries, packed_sdpa_attention,
                              use_packed_attention)
from vlmlab.chat import ChatProcessor
from vlmlab.collators import PackedDataCollator, StandardDataCollator, model_inputs
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.tiny import VLM_FAMILIES, tiny_kit
from vlmlab.vision import ResizeSpec


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    "Per family: a text-only, a two-image and a one-image sample, processed by the family's ChatProcessor."
    d = tmp_path_factory.mktemp('attn')
    make_shapes(d / 'raw', n=4, seed=4, old_format=0, size_range=(96, 240))
    imgs = sorted(p.name for p in (d / 'raw').iterdir() if p.suffix != '.json')
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    (d / 'mixed.json').write_text(json.dumps([
        {'id': 'text-only', 'conversations': turn('Say hello.', 'hello')},
        {'id': 'two-image', 'image': imgs[:2], 'conversations': turn('<image>\n<image>\nCompare them.', 'They differ.')},
        {'id': 'one-image', 'image': imgs[2], 'conversations': turn('<image>\nDescribe the image.', 'Shapes.')}]))
    out = {}
    for fam in VLM_FAMILIES:
        tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
        convert(d / 'mixed.json', d / fam, ResizeSpec.from_pretrained(tiny_kit(fam)), image_root=d / 'raw', progress=False)
        recs = {r['id']: r for _, r, _ in read_jsonl(d / fam / 'train.jsonl')}
        proc = ChatProcessor(tok, ip, fam, d / fam, target='conversation')
        out[fam] = dict(tok=tok, samples=[proc(recs[i]) for i in ('text-only', 'two-image', 'one-image')])
    return out


def models(fam):
    ref = AutoModelForImageTextToText.from_pretrained(tiny_kit(fam), attn_implementation='sdpa').train()
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(fam), attn_implementation='sdpa').train()
    assert use_packed_attention(vlm) == PACKED_ATTENTION
    return ref, vlm


def solo_logits(m, s):
    return m(input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None], pixel_values=s.pixel_values,
             image_grid_thw=s.image_grid_thw, use_cache=False).logits[0]


def summed_loss(logits, labels):
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction='sum')


def grads(m):
    g = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]); m.zero_grad(); return g


@pytest.mark.parametrize('flash_attn_kwargs', [False, True])
@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_packed_logits_equal_solo_and_sdpa(family, flash_attn_kwargs, mixed):
    k = mixed[family]; ref, vlm = models(family)
    pk = PackedDataCollator(k['tok'].pad_token_id, pad_to_multiple_of=16, flash_attn_kwargs=flash_attn_kwargs)(k['samples'])
    cu = pk['cu_seqlens'].tolist()
    with torch.no_grad():
        out, out_ref = vlm(**model_inputs(pk)).logits[0], ref(**model_inputs(pk)).logits[0]
        for s, a, b in zip(k['samples'], cu, cu[1:]):
            assert (out[a:b] - solo_logits(vlm, s)).abs().max().item() < 1e-6, s.id
    assert (out - out_ref).abs().max().item() < 1e-6


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_packed_gradients_equal_summed_solo_and_sdpa(family, mixed):
    k = mixed[family]; ref, vlm = models(family)
    pk = PackedDataCollator(k['tok'].pad_token_id, pad_to_multiple_of=16, flash_attn_kwargs=True)(k['samples'])
    for s in k['samples']: summed_loss(solo_logits(vlm, s)[None], s.labels[None]).backward()
    g_solo = grads(vlm)
    summed_loss(vlm(**model_inputs(pk)).logits, pk['labels']).backward(); g_packed = grads(vlm)
    summed_loss(ref(**model_inputs(pk)).logits, pk['labels']).backward(); g_sdpa = grads(ref)
    for g in (g_solo, g_sdpa):
        assert g.shape == g_packed.shape
        assert ((g_packed - g).abs().max() / g.abs().max()).item() < 1e-6


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_padded_batch_unchanged(family, mixed):
    k = mixed[family]; ref, vlm = models(family)
    pd_ = StandardDataCollator(k['tok'].pad_token_id)(k['samples'])
    with torch.no_grad():
        a, b = vlm(**model_inputs(pd_)), ref(**model_inputs(pd_))
    assert torch.equal(a.logits, b.logits) and a.loss.item() == b.loss.item()


def test_collator_boundaries_win_over_positions(mixed):
    k = mixed['qwen2_5_vl']; _, vlm = models('qwen2_5_vl')
    pk = PackedDataCollator(k['tok'].pad_token_id, flash_attn_kwargs=True)(k['samples'])
    cu = pk['cu_seqlens']; joined = torch.cat([cu[:1], cu[2:]])
    with torch.no_grad():
        out = vlm(**model_inputs(dict(pk, cu_seq_lens_q=joined, cu_seq_lens_k=joined))).logits[0]
        a, b = cu[1].item(), cu[2].item()
        assert (out[a:b] - solo_logits(vlm, k['samples'][1])).abs().max().item() > 1e-3   # sample 2 now sees sample 1


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_language_model_only_and_idempotent(family):
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), attn_implementation='sdpa')
    for _ in range(2): assert use_packed_attention(vlm) == PACKED_ATTENTION
    assert vlm.model.language_model.config._attn_implementation == PACKED_ATTENTION
    assert vlm.model.visual.config._attn_implementation == 'sdpa' == vlm.config.vision_config._attn_implementation


def test_no_dense_mask_for_packed_rows():
    cfg = AutoModelForImageTextToText.from_pretrained(tiny_kit('qwen2_5_vl'), attn_implementation='sdpa').config.text_config
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    def mask(impl, am, p):
        cfg._attn_implementation = impl
        return create_causal_mask(config=cfg, inputs_embeds=torch.zeros(p.shape[0], 8, 4), attention_mask=am,
                                  past_key_values=None, position_ids=p)
    assert mask(PACKED_ATTENTION, None, pos) is None and mask('sdpa', None, pos).shape == (1, 1, 8, 8)
    am = torch.tensor([[1] * 8, [1] * 6 + [0] * 2]); p2 = torch.arange(8).expand(2, -1)
    assert torch.equal(mask(PACKED_ATTENTION, am, p2), mask('sdpa', am, p2))


def test_boundaries_checked():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert packed_boundaries(8, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])) == [0, 3, 8]
    assert packed_boundaries(8, position_ids=torch.arange(8)[None]) is None
    with pytest.raises(ValueError, match='end at the row'): packed_boundaries(7, cu)
    with pytest.raises(ValueError, match='increase'): packed_boundaries(8, torch.tensor([0, 3, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match='differs'): packed_boundaries(8, cu, torch.tensor([0, 4, 8], dtype=torch.int32))


def test_sliding_window_refused():
    q = torch.randn(1, 2, 8, 4)
    layer = torch.nn.Module(); layer.is_causal = True
    with pytest.raises(NotImplementedError, match='sliding-window'):
        packed_sdpa_attention(layer, q, q, q, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), sliding_window=4)


def test_implementation_choice(monkeypatch):
    for requested in ('sdpa', 'eager', None, PACKED_ATTENTION): assert packed_attention_implementation(requested) == PACKED_ATTENTION
    monkeypatch.setitem(attention._FLASH_AVAILABLE, 'flash_attention_2', lambda: False)
    assert packed_attention_implementation('flash_attention_2') == PACKED_ATTENTION   # asked for, not installed
    monkeypatch.setitem(attention._FLASH_AVAILABLE, 'flash_attention_2', lambda: True)
    assert packed_attention_implementation('flash_attention_2') == 'flash_attention_2'


def test_generation_unchanged(mixed):
    k = mixed['qwen2_5_vl']; ref, vlm = models('qwen2_5_vl'); s = k['samples'][2]
    inputs = dict(input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None], pixel_values=s.pixel_values,
                  image_grid_thw=s.image_grid_thw, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(vlm.eval().generate(**inputs), ref.eval().generate(**inputs))


def test_text_only_base_model():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_kit('qwen2_base'), attn_implementation='sdpa').eval()
    assert use_packed_attention(m) == PACKED_ATTENTION == m.config._attn_implementation
    ids = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(input_ids=ids, position_ids=torch.cat([torch.arange(12), torch.arange(18)])[None], use_cache=False).logits[0]
        assert (out[:12] - m(input_ids=ids[:, :12], use_cache=False).logits[0]).abs().max().item() < 1e-6
        assert (out[12:] - m(input_ids=ids[:, 12:], use_cache=False).logits[0]).abs().max().item() < 1e-6
