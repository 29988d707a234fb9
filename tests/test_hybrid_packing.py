"""Packed rows of the hybrid linear-attention families equal their solo runs (logits, gradients, MoE routing), the GPU
path hands the kernels their boundaries, and every set-up that cannot keep samples apart is refused by name."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.chat import ProcessedSample
from vlmlab.collators import PackedDataCollator, model_inputs
from vlmlab.families import family_names, family_record, parameter_group
from vlmlab.hybrid import (PackingError, cu_seqlens_from_seq_idx, is_packing_safe, kernel_stand_ins, linear_attention_kernels,
                           linear_attention_layers, make_packing_safe, packing_problem, row_boundaries,
                           seq_idx_from_cu_seqlens)
from vlmlab.tiny import tiny_image_processor

HYBRID = family_names(lambda f: f.packing == 'linear_attention')
MOE = [n for n in HYBRID if family_record(n).moe]
TOKEN_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
LENGTHS = [23, 70, 17]


def tiny_hybrid(name, seed=0):
    "A tiny random model of a linear-attention family: layers [linear, linear, linear, full]; MoE: 2 of 4 experts."
    # once vlmlab.tiny builds these families, the body of this function becomes one line (everything else reads the
    # model's config):  return AutoModelForImageTextToText.from_pretrained(tiny_kit(name), attn_implementation='sdpa').eval()
    fam = family_record(name)
    cls = getattr(transformers, fam.model_class)
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4, layer_types=['linear_attention'] * 3 + ['full_attention'],
                max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                rope_parameters=dict(rope_type='default', rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True,
                                     partial_rotary_factor=1.0))
    if fam.moe: text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, num_position_embeddings=64,
                  patch_size=fam.patch_size, spatial_merge_size=fam.merge_size)
    torch.manual_seed(seed)
    return cls(cls.config_class(text_config=text, vision_config=vision, **TOKEN_IDS)).eval()


@pytest.fixture(scope='module')
def row():
    "Three random text samples, their packed row, positions restarting per sample, and the boundary kwargs."
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(2, 240, (1, n), generator=g) for n in LENGTHS]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return dict(texts=texts, ids=torch.cat(texts, 1), cu=cu, pos=torch.cat([torch.arange(n) for n in LENGTHS])[None],
                bounds=list(zip(cu[:-1].tolist(), cu[1:].tolist())),
                kw=dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)))


def gaps(m, row, **extra):
    "Per sample, the largest |packed - solo| logit difference."
    with torch.no_grad():
        out = m(input_ids=row['ids'], position_ids=row['pos'], use_cache=False, **extra).logits[0]
        return [(out[a:b] - m(input_ids=s, use_cache=False).logits[0]).abs().max().item() for s, (a, b) in zip(row['texts'], row['bounds'])]


@pytest.mark.parametrize('name', HYBRID)
def test_transformers_forward_bleeds(name, row):
    d = gaps(tiny_hybrid(name), row)
    assert d[0] < 1e-6 and d[1] > 1e-3 and d[2] > 1e-3


@pytest.mark.parametrize('name', HYBRID)
def test_packed_logits_equal_solo(name, row):
    m = tiny_hybrid(name)
    assert make_packing_safe(m) == 3 and make_packing_safe(m) == 3
    assert max(gaps(m, row, **row['kw'])) < 1e-5
    assert max(gaps(m, row, seq_idx=seq_idx_from_cu_seqlens(row['cu']))) < 1e-5   # seq_idx alone is enough


def test_patch_is_per_instance(row):
    m, other = tiny_hybrid(HYBRID[0]), tiny_hybrid(HYBRID[0])
    make_packing_safe(m)
    assert all(is_packing_safe(l) for l in linear_attention_layers(m))
    assert not any(is_packing_safe(l) for l in linear_attention_layers(other))
    assert max(gaps(other, row)) > 1e-3   # the class is untouched: another model still runs transformers' forward


def test_deepcopy_runs_its_own_weights(row):
    m = tiny_hybrid(HYBRID[0])
    make_packing_safe(m)
    c = copy.deepcopy(m)                                  # a reference or EMA model made after the patch
    with torch.no_grad():
        for layer in linear_attention_layers(c): layer.out_proj.weight.mul_(2)
        x = row['ids'][:, :20]
        assert (m(input_ids=x, use_cache=False).logits - c(input_ids=x, use_cache=False).logits).abs().max() > 1e-4
    assert all(is_packing_safe(l) for l in linear_attention_layers(c)) and make_packing_safe(c) == 3
    assert max(gaps(c, row, **row['kw'])) < 1e-5


def test_pickled_model_stays_packing_safe(row, tmp_path):
    m = tiny_hybrid(HYBRID[0])
    make_packing_safe(m)
    torch.save(m, tmp_path / 'model.pt')
    loaded = torch.load(tmp_path / 'model.pt', weights_only=False)
    assert all(is_packing_safe(l) and l.forward.layer is l for l in linear_attention_layers(loaded))
    assert max(gaps(loaded, row, **row['kw'])) < 1e-5


@pytest.mark.parametrize('name', HYBRID)
def test_packed_gradients_equal_solo_with_checkpointing(name, row):
    m = tiny_hybrid(name)
    make_packing_safe(m)
    m.train(); m.activation_checkpointing_enable()
    ce = lambda logits, ids: F.cross_entropy(logits[:-1], ids[1:], reduction='sum')
    def grads(packed):
        m.zero_grad()
        if packed:
            out = m(input_ids=row['ids'], position_ids=row['pos'], use_cache=False, **row['kw']).logits[0]
            loss = sum(ce(out[a:b], row['ids'][0, a:b]) for a, b in row['bounds'])
        else: loss = sum(ce(m(input_ids=s, use_cache=False).logits[0], s[0]) for s in row['texts'])
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    gp, gs = grads(True), grads(False)
    assert set(gp) == set(gs) and len(gp) > 40
    assert max((gp[n] - gs[n]).abs().max().item() for n in gp) < 1e-5


def routed(m, **inputs):
    "Per MoE layer, the sorted (T, k) experts of every token."
    routers = [mod for n, mod in m.named_modules() if hasattr(mod, 'top_k') and parameter_group(f'{n}.weight') == 'router']
    seen = []
    hooks = [r.register_forward_hook(lambda mod, a, out: seen.append(out[2].sort(-1).values)) for r in routers]
    with torch.no_grad(): m(**inputs, use_cache=False)
    for h in hooks: h.remove()
    return seen


@pytest.mark.parametrize('name', MOE)
def test_moe_routes_every_token_as_solo(name, row):
    m = tiny_hybrid(name)
    solo = [torch.cat(r) for r in zip(*[routed(m, input_ids=s) for s in row['texts']])]
    stock = routed(m, input_ids=row['ids'], position_ids=row['pos'])
    make_packing_safe(m)
    packed = routed(m, input_ids=row['ids'], position_ids=row['pos'], **row['kw'])
    assert len(packed) == 4 and all(torch.equal(p, s) for p, s in zip(packed, solo))
    assert any(not torch.equal(p, s) for p, s in zip(stock, solo))   # the control: transformers' forward moves some tokens


def image_sample(sid, n_before, n_after, image, family, seed, cfg):
    "A ProcessedSample of random text around an optional image; the vision token ids come from the model config `cfg`."
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(2, 240, (n,), generator=g)
    pieces, kinds, pv, grid = [text(n_before)], [torch.zeros(n_before, dtype=torch.int32)], None, None
    if image is not None:
        out = tiny_image_processor(family)(images=[image], return_tensors='pt')
        pv, grid = out['pixel_values'], out['image_grid_thw']
        n = int(grid.prod()) // family_record(family).merge_size ** 2
        pieces += [torch.tensor([cfg.vision_start_token_id]), torch.full((n,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id])]
        kinds += [torch.zeros(1, dtype=torch.int32), torch.ones(n, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)]
    pieces.append(text(n_after)); kinds.append(torch.zeros(n_after, dtype=torch.int32))
    ids, mm = torch.cat(pieces), torch.cat(kinds)
    labels = torch.where((mm == 0) & (ids < 240), ids, -100)
    return ProcessedSample(sid, ids, labels, mm, (labels != -100).int(), pv, grid, {'teacher': [], 'student': []}, ['text'] * len(ids))


@pytest.mark.parametrize('name', HYBRID)
def test_collated_image_row_equals_solo(name):
    m = tiny_hybrid(name)
    samples = [image_sample('text', 30, 0, None, name, 1, m.config),
               image_sample('wide', 5, 20, Image.new('RGB', (96, 64), 'red'), name, 2, m.config),
               image_sample('tall', 8, 12, Image.new('RGB', (64, 96), 'blue'), name, 3, m.config)]
    batch = PackedDataCollator(0, pad_to_multiple_of=16, flash_attn_kwargs=True)(samples)   # with a padding segment
    assert 'make_packing_safe' in packing_problem(m, batch)
    make_packing_safe(m)
    assert packing_problem(m, batch) is None
    cu = batch['cu_seqlens'].tolist()
    with torch.no_grad():
        out = m(**model_inputs(batch)).logits[0]
        for s, a in zip(samples, cu):
            solo = m(input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None], pixel_values=s.pixel_values,
                     image_grid_thw=s.image_grid_thw, use_cache=False).logits[0]
            assert (out[a:a + len(s)] - solo).abs().max().item() < 1e-5


def test_refusals(row):
    m = tiny_hybrid(HYBRID[0])
    make_packing_safe(m)
    call = lambda **kw: m(input_ids=row['ids'], position_ids=row['pos'], **kw)
    with pytest.raises(PackingError, match='without sample boundaries'): call(use_cache=False)
    with pytest.raises(PackingError, match='disagree'): call(use_cache=False, cu_seq_lens_q=torch.tensor([0, 23, 60, 110], dtype=torch.int32))
    with pytest.raises(PackingError, match='with a cache'): call(use_cache=True, **row['kw'])
    with pytest.raises(PackingError, match='end at the row'): call(use_cache=False, cu_seq_lens_q=torch.tensor([0, 23, 93], dtype=torch.int32))
    two_rows = torch.cat([row['ids'], row['ids']])
    with pytest.raises(PackingError, match='batch of 2 rows'): m(input_ids=two_rows, use_cache=False, **row['kw'])


def test_packing_problem_names_the_missing_piece(row):
    m = tiny_hybrid(HYBRID[0])
    samples = [image_sample(f's{i}', 10 + i, 5, None, HYBRID[0], i, m.config) for i in range(3)]
    full, bare = PackedDataCollator(0, flash_attn_kwargs=True)(samples), PackedDataCollator(0)(samples)
    assert 'make_packing_safe' in packing_problem(m, full)
    make_packing_safe(m)
    assert packing_problem(m, full) is None
    assert 'flash_attn_kwargs=True' in packing_problem(m, bare)
    assert 'use_cache' in packing_problem(m, dict(full, use_cache=True))
    assert 'differ' in packing_problem(m, dict(full, cu_seq_lens_q=torch.tensor([0, 5, 20, full['input_ids'].shape[1]], dtype=torch.int32)))
    assert 'does not number' in packing_problem(m, dict(full, seq_idx=torch.zeros(1, full['input_ids'].shape[1], dtype=torch.int32)))
    assert packing_problem(m, {k: v for k, v in full.items() if k not in ('cu_seqlens', 'cu_seq_lens_q', 'cu_seq_lens_k')}) is None  # not packed


def test_kernel_path_receives_boundaries(row):
    m, stock = tiny_hybrid(HYBRID[0]), tiny_hybrid(HYBRID[0])
    make_packing_safe(m)
    layer = linear_attention_layers(m)[0]
    modeling = sys.modules[type(layer).__module__]
    with kernel_stand_ins(modeling) as calls:
        assert all(linear_attention_kernels(layer).values())
        assert max(gaps(m, row, **row['kw'])) < 1e-5
        whole_row = [c for c in calls if c['shape'][-1 if c['kernel'] == 'conv' else 1] == row['ids'].shape[1]]
        convs = [c for c in whole_row if c['kernel'] == 'conv']
        rules = [c for c in whole_row if c['kernel'] == 'delta_rule']
        assert len(convs) == len(rules) == 3
        assert all(c['channel_last'] and c['seq_idx'].dtype == torch.int32 and
                   torch.equal(c['seq_idx'], seq_idx_from_cu_seqlens(row['cu'])) for c in convs)
        assert all(c['cu_seqlens'].tolist() == row['cu'].tolist() for c in rules)
        calls.clear()
        assert max(gaps(stock, row, **row['kw'])) > 1e-3   # the control: transformers' forward gives the conv no seq_idx
        assert all(c['seq_idx'] is None for c in calls if c['kernel'] == 'conv' and c['shape'][-1] == row['ids'].shape[1])
    assert linear_attention_kernels(layer) == {'conv': None, 'delta_rule': None}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_boundary_round_trip(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq_idx = seq_idx_from_cu_seqlens(cu)
    assert seq_idx.shape == (1, sum(lengths)) and seq_idx.dtype == torch.int32
    assert torch.equal(cu_seqlens_from_seq_idx(seq_idx), cu)
    assert row_boundaries(sum(lengths), cu, seq_idx) == cu.tolist()
    with pytest.raises(PackingError): row_boundaries(sum(lengths) + 1, cu)


def test_lora_on_linear_attention_keeps_samples_apart(row):
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(tiny_hybrid(HYBRID[0]), LoraConfig(r=4, target_modules=['in_proj_qkv', 'out_proj'], init_lora_weights=False))
    assert make_packing_safe(m) == 3                     # the layers are found through the PEFT wrapper
    assert max(gaps(m, row, **row['kw'])) < 1e-5
    m.train()
    out = m(input_ids=row['ids'], position_ids=row['pos'], use_cache=False, **row['kw']).logits[0]
    sum(F.cross_entropy(out[a:b - 1], row['ids'][0, a + 1:b], reduction='sum') for a, b in row['bounds']).backward()
    lora = [p for n, p in m.named_parameters() if 'lora_' in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_text_only_causal_lm(row):
    cls = getattr(transformers, family_record(HYBRID[0]).model_class)
    lm_cls = getattr(transformers, cls.__name__.replace('ForConditionalGeneration', 'ForCausalLM'))
    torch.manual_seed(0)
    lm = lm_cls(tiny_hybrid(HYBRID[0]).config.text_config).eval()
    make_packing_safe(lm)
    with pytest.raises(PackingError, match='without sample boundaries'): lm(input_ids=row['ids'], position_ids=row['pos'], use_cache=False)
    assert max(gaps(lm, row, **row['kw'])) < 1e-5
