"Expert counting and the load-balancing loss of vlmlab.moe, beyond the lessons of nbs/08b_moe.ipynb."
import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from vlmlab.collators import model_inputs
from vlmlab.families import family_names
from vlmlab.moe import (ExpertUsage, expert_usage_verdict, real_token_mask, router_aux_coef, router_aux_loss, router_balance_loss,
                        router_logits_kwargs, router_modules)
from vlmlab.tiny import KIT_FAMILIES, tiny_kit

MOE_KIT = [f for f in family_names(lambda f: f.moe) if f in KIT_FAMILIES]
VLM_MOE = MOE_KIT[0]   # the first MoE family of the kit: a Qwen-VL model the chat processor and collators take


def text_batch(vocab: int, lengths: list[int], seed: int = 0) -> dict:
    "Right-padded random token rows with their attention mask."
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(10, min(vocab, 500), (len(lengths), L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return {'input_ids': ids.masked_fill(~mask, 0), 'attention_mask': mask}


def reference_counts(vlm, batch) -> dict[int, list[int]]:
    "Tokens per expert from the routers' own outputs, counted by hand over the real tokens."
    got, hooks = {}, []
    def keep(layer):
        def hook(module, args, out): got[layer] = out[-1].detach()   # returns None: the output stays as it was
        return hook
    for layer, r in router_modules(vlm).items(): hooks.append(r.register_forward_hook(keep(layer)))
    with torch.no_grad(): vlm(**batch)
    for h in hooks: h.remove()
    real = batch['attention_mask'].reshape(-1)
    return {l: torch.bincount(idx[real].reshape(-1), minlength=idx.max() + 1).tolist() for l, idx in sorted(got.items())}


@pytest.fixture(scope='module')
def models():
    return {f: AutoModelForImageTextToText.from_pretrained(tiny_kit(f)).eval() for f in MOE_KIT}


@pytest.mark.parametrize('fam', MOE_KIT)
def test_counts_match_the_routers_outputs(models, fam):
    vlm = models[fam]
    vocab, runs = vlm.config.get_text_config().vocab_size, [[9, 5, 7], [12, 12], [3, 11, 6, 8]]
    batches = [text_batch(vocab, lengths, seed) for seed, lengths in enumerate(runs)]
    refs = [reference_counts(vlm, b) for b in batches]
    n_exp = vlm.config.get_text_config().num_experts
    want = {l: [sum((r[l] + [0] * n_exp)[e] for r in refs) for e in range(n_exp)] for l in refs[0]}
    with ExpertUsage(vlm) as usage:
        for b in batches:
            with torch.no_grad(): vlm(**b)
    assert usage.snapshot() == want
    assert all(sum(c) == usage.top_k * (9 + 5 + 7 + 24 + 3 + 11 + 6 + 8) for c in usage.snapshot().values())


@pytest.mark.parametrize('fam', MOE_KIT)
def test_routers_are_the_top_k_modules_of_the_router_group(models, fam):
    routers = router_modules(models[fam])
    text = models[fam].config.get_text_config()
    sparse = [i for i in range(text.num_hidden_layers) if i not in (getattr(text, 'mlp_only_layers', None) or [])]
    assert list(routers) == sparse
    assert all(r.top_k == text.num_experts_per_tok and r.num_experts == text.num_experts for r in routers.values())


def test_dense_family_has_no_routers():
    dense = next(f for f in KIT_FAMILIES if f in family_names(lambda f: not f.moe))
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(dense))
    assert router_modules(vlm) == {} and router_aux_coef(vlm) == 0.0 and router_logits_kwargs(vlm, 1e-3) == {}
    with pytest.raises(ValueError, match='routes no tokens to experts'): ExpertUsage(vlm)


@pytest.mark.parametrize('fam', MOE_KIT)
def test_balance_loss_is_transformers_own_on_a_padded_batch(models, fam):
    vlm = models[fam]
    b = text_batch(vlm.config.get_text_config().vocab_size, [10, 4, 7])
    with torch.no_grad(): out = vlm(**b, output_router_logits=True)
    assert torch.allclose(router_aux_loss(vlm, out, b), out.aux_loss, atol=1e-6)


def test_balance_loss_reaches_every_router_row(models):
    vlm = models[VLM_MOE]
    b = text_batch(vlm.config.get_text_config().vocab_size, [10, 6])
    vlm.zero_grad(set_to_none=True)
    router_aux_loss(vlm, vlm(**b, output_router_logits=True), b).backward()
    for r in router_modules(vlm).values():
        assert r.weight.grad is not None and bool((r.weight.grad.abs().sum(1) > 0).all())   # unchosen experts too
    vlm.zero_grad(set_to_none=True)


def test_eval_forwards_stay_out_of_a_training_window(models):
    vlm = models[VLM_MOE]
    b = text_batch(vlm.config.get_text_config().vocab_size, [8, 8])
    with ExpertUsage(vlm, training_only=True) as usage:
        with torch.no_grad(): vlm.eval()(**b)
        assert sum(sum(c) for c in usage.snapshot().values()) == 0
        with torch.no_grad(): vlm.train()(**b)
        vlm.eval()
        assert sum(sum(c) for c in usage.snapshot().values()) == usage.top_k * 16 * len(usage.layers)


def test_a_failed_forward_leaves_counting_consistent(models):
    vlm = models[VLM_MOE]
    b = text_batch(vlm.config.get_text_config().vocab_size, [6, 6])
    with ExpertUsage(vlm) as usage:
        def fail(module, args): raise RuntimeError('out of memory (simulated)')
        h = vlm.lm_head.register_forward_pre_hook(fail)   # after every router ran
        try:
            with pytest.raises(RuntimeError, match='simulated'), torch.no_grad(): vlm(**b)
        finally: h.remove()
        assert usage._depth == 0   # the forward hook ran although the forward raised
        usage.reset()
        with torch.no_grad(): vlm(**b)
        assert all(sum(c) == usage.top_k * 12 for c in usage.snapshot().values())


def test_windows_total_reduce_and_the_record_round_trip(models):
    vlm = models[VLM_MOE]
    b = text_batch(vlm.config.get_text_config().vocab_size, [5, 9])
    reduced = []
    with ExpertUsage(vlm) as usage:
        for _ in range(3):
            with torch.no_grad(): vlm(**b)
        logs = usage.end_window(3, reduce=lambda t: reduced.append(t.clone()) or t * 2)   # as if two processes saw the same
        with torch.no_grad(): vlm(**b)
        usage.end_window(4)
    rec = json.loads(json.dumps(usage.record()))   # as metrics.json stores it: layer keys become strings
    total = {int(k): v for k, v in rec['total'].items()}
    one = {int(k): v for k, v in rec['last_window']['counts'].items()}
    assert len(reduced) == 1 and (rec['last_window']['first_step'], rec['last_window']['last_step']) == (4, 4)
    assert total == {l: [7 * x for x in c] for l, c in one.items()}   # 3 forwards doubled by reduce, plus 1
    assert all(logs[f'moe/layer_{l}/idle_experts'] == sum(x == 0 for x in c) for l, c in one.items())
    assert sum(one[l][0] for l in one) > 0 and usage.snapshot() == {l: [0] * usage.num_experts for l in one}   # reset after the window
    v = expert_usage_verdict(rec)
    assert v is not None and v.evidence['steps'] == 1 and rec['real_tokens_only'] is True


def test_verdict_names_the_idle_experts_and_padding():
    rec = {'num_experts': 8, 'top_k': 2, 'layers': [0, 1], 'real_tokens_only': False,
           'last_window': {'first_step': 91, 'last_step': 100, 'counts': {'0': [5, 0, 5, 5, 5, 5, 5, 0], '1': [1] * 8}}}
    v = expert_usage_verdict(rec)
    assert not v.ok and v.cause.startswith('experts 1, 7 of layer 0 got no tokens in the last 10 steps (91-100), padding tokens counted too')
    rec['last_window']['counts']['0'] = [1] * 8
    assert expert_usage_verdict(rec).ok
    assert expert_usage_verdict({'last_window': None}) is None


def packed_and_padded(fam):
    "A padded batch and a packed row of the same three captioned shape images, for a Qwen-VL MoE kit model."
    from vlmlab.chat import ChatProcessor
    from vlmlab.collators import PackedDataCollator, StandardDataCollator
    from vlmlab.data import convert, make_shapes, read_jsonl
    from vlmlab.vision import ResizeSpec
    d, base = Path(tempfile.mkdtemp()), tiny_kit(fam)
    with contextlib.redirect_stdout(io.StringIO()):
        make_shapes(d / 'raw', n=3, seed=1, old_format=0, size_range=(64, 96), max_objects=1)
        convert(d / 'raw', d / 'ds', ResizeSpec.from_pretrained(base), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(base), AutoImageProcessor.from_pretrained(base)
    s = [ChatProcessor(tok, ip, fam, d / 'ds', target='caption')(r) for _, r, _ in read_jsonl(d / 'ds' / 'train.jsonl')]
    return tok, ip, StandardDataCollator(tok.pad_token_id)(s), PackedDataCollator(tok.pad_token_id, pad_to_multiple_of=64)(s)


def test_detector_counts_real_tokens_of_both_layouts(models):
    from vlmlab.detection import VLMDetector
    tok, ip, pad, row = packed_and_padded(VLM_MOE)
    det = VLMDetector(models[VLM_MOE], None, tok, ip, VLM_MOE)
    with ExpertUsage(det) as usage, torch.no_grad():
        det(pad); a = usage.snapshot(); usage.reset()
        det(row); b = usage.snapshot()
    n = int(real_token_mask(pad).sum())
    assert n == int(real_token_mask(row).sum()) < row['input_ids'].numel()
    assert all(sum(c) == usage.top_k * n for c in a.values()) and all(sum(c) == usage.top_k * n for c in b.values())
    assert usage.unmasked_calls == 0


def _detector_adds_the_balancing_loss() -> bool:
    import inspect
    from vlmlab.detection import VLMDetector
    return 'router_aux_loss_coef' in inspect.signature(VLMDetector.__init__).parameters


@pytest.mark.skipif(not _detector_adds_the_balancing_loss(), reason='VLMDetector does not add the balancing loss yet')
def test_detector_loss_carries_the_balancing_term(models):
    from vlmlab.detection import VLMDetector
    tok, ip, pad, _ = packed_and_padded(VLM_MOE)
    vlm = models[VLM_MOE]
    det = VLMDetector(vlm, None, tok, ip, VLM_MOE)
    coef = det.router_aux_loss_coef
    assert coef == router_aux_coef(vlm) > 0   # on by default, with the checkpoint's coefficient
    with torch.no_grad():
        res = det(pad)
        out = vlm(**{k: v for k, v in model_inputs(pad).items() if k != 'labels'}, **router_logits_kwargs(vlm, coef))
    assert torch.allclose(res['router_aux_loss'], router_aux_loss(vlm, out, pad), atol=1e-6)
    assert torch.allclose(res['loss'], res['lm_loss'] + coef * res['router_aux_loss'], atol=1e-6)
