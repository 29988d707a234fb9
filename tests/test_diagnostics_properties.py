"""Diagnostics under arbitrary inputs: curve detectors on noisy synthetic shapes, span metrics against set arithmetic,
NF-marker contract, update-ratio bands, gradient-norm topology, paired statistics, near-duplicates, sequential evaluation."""
import gc
import io
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.data import make_shapes
from vlmlab.diagnostics import (FROZEN_BELOW, GOLDILOCKS, UNSTABLE_ABOVE, compare_paired, diagnose_loss_curve,
                                evaluate_checkpoints, grad_norm_verdicts, group_norms, paired_bootstrap_ci, paired_power,
                                paired_sample_size, update_ratio_class, update_ratio_verdicts, weight_snapshot)
from vlmlab.leakage import find_near_duplicates, image_fingerprint
from vlmlab.spans import NFMarkerError, check_nf_marker, highlight_span, span_iou, token_span_to_chars

# ---- loss curves: each detector flags its own shape, the healthy curve passes --------------------------------------
# The domain is where the shape is identifiable from the data: per-point noise up to 3% and at least 150 points
# (the notebook shows where detection degrades beyond it).
NOISE, POINTS, SEEDS = st.floats(0.0, 0.03), st.integers(150, 400), st.integers(0, 2 ** 32 - 1)


def noisy(y, noise, seed):
    return y * (1 + noise * np.random.default_rng(seed).standard_normal(len(y)))


@settings(max_examples=60, deadline=None)
@given(l0=st.floats(2, 10), lf=st.floats(.05, .3), tau=st.floats(.03, .2), n=POINTS, noise=NOISE, seed=SEEDS)
def test_healthy_curve_passes(l0, lf, tau, n, noise, seed):
    x = np.linspace(0, 1, n)
    v = diagnose_loss_curve(noisy(l0 * (lf + (1 - lf) * np.exp(-x / tau)), noise, seed))
    assert v.verdict == 'healthy' and v.ok, v


@settings(max_examples=60, deadline=None)
@given(l0=st.floats(2, 10), lf=st.floats(.05, .5), x0=st.floats(.4, .8), width=st.floats(.005, .03), n=POINTS, noise=NOISE, seed=SEEDS)
def test_hockey_stick_flagged(l0, lf, x0, width, n, noise, seed):
    x = np.linspace(0, 1, n)
    v = diagnose_loss_curve(noisy(l0 * (lf + (1 - lf) / (1 + np.exp((x - x0) / width))), noise, seed))
    assert v.verdict == 'hockey_stick' and not v.ok, v


@settings(max_examples=60, deadline=None)
@given(l0=st.floats(2, 10), a=st.floats(.2, .6), tau=st.floats(1, 5), n=POINTS, noise=NOISE, seed=SEEDS)
def test_slow_burn_flagged(l0, a, tau, n, noise, seed):
    x = np.linspace(0, 1, n)
    v = diagnose_loss_curve(noisy(l0 * (1 - a * (1 - np.exp(-x / tau)) / (1 - np.exp(-1 / tau))), noise, seed))
    assert v.verdict == 'slow_burn' and not v.ok, v


@settings(max_examples=60, deadline=None)
@given(l0=st.floats(2, 10), lp=st.floats(.6, 1.0), tau=st.floats(.01, .1), n=POINTS, noise=NOISE, seed=SEEDS)
def test_plateau_flagged(l0, lp, tau, n, noise, seed):
    x = np.linspace(0, 1, n)
    v = diagnose_loss_curve(noisy(l0 * (lp + (1 - lp) * np.exp(-x / tau)), noise, seed))
    assert v.verdict == 'plateau' and not v.ok, v


@settings(max_examples=60, deadline=None)
@given(at=st.floats(.1, .95), bad=st.sampled_from([math.nan, math.inf]), n=POINTS, noise=NOISE, seed=SEEDS)
def test_nan_death_flagged_at_its_step(at, bad, n, noise, seed):
    x = np.linspace(0, 1, n)
    y = noisy(5 * (.1 + .9 * np.exp(-x / .1)), noise, seed)
    k = max(1, int(at * n)); y[k] = bad
    v = diagnose_loss_curve([(10 * i, l) for i, l in enumerate(y)])
    assert v.verdict == 'nan_death' and v.evidence['first_bad_step'] == 10 * k, v


def test_rising_curve_is_diverging_and_flat_curve_a_plateau():
    x = np.linspace(0, 1, 200)
    assert diagnose_loss_curve(noisy(2 + x, .02, 0)).verdict == 'diverging'
    assert diagnose_loss_curve(noisy(np.full(200, 3.0), .02, 0)).verdict == 'plateau'


# ---- span metrics --------------------------------------------------------------------------------------------------
SPAN = st.tuples(st.integers(0, 30), st.integers(0, 30)).map(sorted).map(tuple)


def set_iou(a, b):
    A, B = set(range(*a)), set(range(*b))
    return len(A & B) / len(A | B) if A | B else 1.0


@settings(max_examples=500, deadline=None)
@given(a=SPAN, b=SPAN)
def test_span_iou_is_the_iou_of_covered_positions(a, b):
    got = span_iou(*a, *b)
    assert math.isclose(got, set_iou(a, b)) and got == span_iou(*b, *a) and 0 <= got <= 1


@settings(max_examples=500, deadline=None)
@given(a=SPAN, b=SPAN)
def test_seed_inclusive_formula_never_underestimates_exclusive_spans(a, b):
    """The seed called its old IoU 'pessimistic': on exclusive spans it is never below the truth."""
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
    old = inter / max(1, max(a[1], b[1]) - min(a[0], b[0]) + 1)
    assert old >= set_iou(a, b) - 1e-12 or (a[0] == a[1] and b[0] == b[1])


def test_span_iou_refuses_inverted_spans():
    with pytest.raises(ValueError, match='ends before it starts'): span_iou(5, 2, 1, 3)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=12), data=st.data())
def test_token_span_to_chars_with_bos(lengths, data):
    text = ''.join(chr(97 + i % 26) * n for i, n in enumerate(lengths))
    ends = np.cumsum(lengths).tolist()
    offsets = [(0, 0)] + [(e - n, e) for e, n in zip(ends, lengths)] + [(0, 0)]   # BOS ... EOS, as a fast tokenizer gives
    s = data.draw(st.integers(1, len(lengths)))
    e = data.draw(st.integers(s + 1, len(lengths) + 1))
    a, b = token_span_to_chars(s, e, offsets)
    assert text[a:b] == ''.join(text[x:y] for x, y in offsets[s:e])
    if all(n == 1 for n in lengths): assert (a, b) == (s - 1, e - 1)              # the seed's "-1 on both ends"
    assert highlight_span(text, a, b) == text[:a] + '⟨' + text[a:b] + '⟩' + text[b:]


@settings(max_examples=500, deadline=None)
@given(total=st.integers(1, 12), k=st.integers(-2, 14), first=st.sampled_from([0, 1]), nf=st.booleans())
def test_nf_marker_contract(total, k, first, nf):
    ex = {'trace_id': 'tr', 'target_span': (0, 0) if nf else (2, 5), 'step_k': k, 'steps_total': total}
    last = first + total - 1
    if not first <= k <= last or (nf and k != last):
        with pytest.raises(NFMarkerError, match='trace tr'): check_nf_marker(ex, first_step=first)
    else: assert check_nf_marker(ex, first_step=first) is nf


# ---- gradient physiology -------------------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(r=st.floats(1e-9, 10))
def test_update_ratio_bands(r):
    expected = ('frozen' if r < FROZEN_BELOW else 'too_slow' if r < GOLDILOCKS[0] else 'goldilocks' if r <= GOLDILOCKS[1]
                else 'too_fast' if r <= UNSTABLE_ABOVE else 'unstable')
    assert update_ratio_class(r) == expected
    assert update_ratio_verdicts({'g': [r] * 3})[0].verdict == expected


@settings(max_examples=300, deadline=None)
@given(norms=st.lists(st.floats(1e-3, 9.9), min_size=2, max_size=30), data=st.data())
def test_grad_norm_topology_names_the_first_bad_step(norms, data):
    k = data.draw(st.integers(0, len(norms) - 1))
    log = [{'step': 5 * i, 'grad_norm/ok': n, 'grad_norm/nan': math.nan if i >= k else n, 'grad_norm/zero': 0.0,
            'grad_norm/big': n if i != k else 11.0, 'grad_norm/some_zero': 0.0 if i == k else n} for i, n in enumerate(norms)]
    got = {v.subject: v for v in grad_norm_verdicts(log)}
    assert {s: v.verdict for s, v in got.items()} == {'ok': 'healthy', 'nan': 'overflow', 'zero': 'broken_graph',
                                                       'big': 'exploding', 'some_zero': 'intermittent'}
    assert got['nan'].evidence['first_bad_step'] == 5 * k and got['big'].evidence['at_step'] == 5 * k


def test_sgd_step_ratio_equals_the_seed_formula_and_adam_does_not():
    torch.manual_seed(0)
    for opt_cls, lr, same in ((torch.optim.SGD, 0.05, True), (torch.optim.Adam, 1e-3, False)):
        m = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
        groups = {'a': list(m[0].parameters()), 'b': list(m[2].parameters())}
        opt = opt_cls(m.parameters(), lr=lr)
        m(torch.randn(16, 6)).pow(2).mean().backward()
        before = weight_snapshot(groups); opt.step()
        logs = group_norms(groups, lr, before)
        for g in groups:
            assert math.isclose(logs[f'update_ratio/{g}'], logs[f'step_ratio/{g}'], rel_tol=1e-4) is same, logs


# ---- paired statistics ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 60), shift=st.floats(-1, 1), seed=SEEDS)
def test_paired_bootstrap_interval_contains_the_sample_mean(n, shift, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, n); b = a - shift - rng.normal(0, .3, n)
    mean, lo, hi = paired_bootstrap_ci(a, b, n_resamples=999, seed=seed)
    assert math.isclose(mean, float(np.mean(a - b))) and lo <= mean <= hi
    c = compare_paired(a, b, n_resamples=999)
    assert c.t_ci[0] <= mean <= c.t_ci[1] and c.n == n


@settings(max_examples=40, deadline=None)
@given(d=st.floats(.15, 2.0), power=st.sampled_from([.8, .9]), alpha=st.sampled_from([.05, .01]))
def test_paired_sample_size_is_the_smallest_that_reaches_power(d, power, alpha):
    n = paired_sample_size(d, 1.0, power, alpha)
    assert paired_power(n, d, 1.0, alpha) >= power
    assert n == 2 or paired_power(n - 1, d, 1.0, alpha) < power
    assert paired_sample_size(d, 1.0, power, alpha, method='normal') <= n


# ---- leakage: near-duplicate images --------------------------------------------------------------------------------
def test_reencoded_copies_are_near_duplicates_and_distinct_images_are_not(tmp_path):
    make_shapes(tmp_path, n=10, seed=3, old_format=0, exif_rotated=0)
    imgs = [Image.open(p).convert('RGB') for p in sorted(tmp_path.glob('*.[jp][pn]g'))]
    copies = []
    for im in imgs:
        buf = io.BytesIO(); im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(buf, 'JPEG', quality=60)
        copies.append(Image.open(buf))
    found = find_near_duplicates([image_fingerprint(i) for i in imgs], [image_fingerprint(c) for c in copies])
    assert sorted((i, j) for i, j, _, _ in found) == [(i, i) for i in range(len(imgs))]


# ---- sequential evaluation -----------------------------------------------------------------------------------------
def test_evaluate_checkpoints_frees_each_model_and_refuses_leaks():
    refs = []
    def load(path):
        m = nn.Linear(4, int(path)); refs.append(weakref.ref(m)); return m
    def evaluate(m):
        return {'alive': sum(r() is not None for r in refs), 'out': m(torch.ones(1, 4)).sum().item()}
    res = evaluate_checkpoints(['2', '3', '5'], evaluate, load)
    assert [r['alive'] for r in res.values()] == [1, 1, 1] and all(r() is None for r in refs)
    kept = []
    with pytest.raises(RuntimeError, match="3: the model is still referenced"):
        evaluate_checkpoints(['3'], lambda m: kept.append(m), load)
    kept.clear()
    with pytest.raises(RuntimeError, match=r"result\[0\]"):
        evaluate_checkpoints(['3'], lambda m: [m(torch.ones(1, 4)).sum()], load)
    gc.collect()


def test_connector_ablation_hooks_change_the_visual_tokens_and_an_untrained_model_does_not_pass(tmp_path):
    import contextlib, io
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from vlmlab.chat import ChatProcessor
    from vlmlab.data import convert, make_shapes, read_jsonl
    from vlmlab.diagnostics import connector_ablation
    from vlmlab.tiny import tiny_kit
    from vlmlab.vision import ResizeSpec
    with contextlib.redirect_stdout(io.StringIO()):
        make_shapes(tmp_path / 'raw', n=8, seed=1, old_format=0, size_range=(112, 200), max_objects=2)
        convert(tmp_path / 'raw', tmp_path / 'ds', ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit('qwen2_5_vl')), AutoImageProcessor.from_pretrained(tiny_kit('qwen2_5_vl'))
    items = [ChatProcessor(tok, ip, 'qwen2_5_vl', tmp_path / 'ds', target='caption')(r) for _, r, _ in read_jsonl(tmp_path / 'ds' / 'train.jsonl')]
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit('qwen2_5_vl'))
    res = connector_ablation(vlm, items, tok.pad_token_id, batch_size=4, progress=False)
    assert len(res.losses['correct']) == 8 and set(res.deltas) == {'shuffled', 'zero', 'noise'}
    assert any(abs(a - b) > 1e-6 for a, b in zip(res.losses['zero'], res.losses['correct']))   # the hook reaches the LLM
    assert not res.passed
    assert not vlm.model.visual._forward_hooks   # hooks removed
