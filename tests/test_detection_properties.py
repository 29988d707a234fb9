"""Detection building blocks under arbitrary inputs: finite values and gradients, optimal matching, robust parsing."""
import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from vlmlab.detection import DetectionHead
from vlmlab.detection_loss import DetectionLoss, HungarianMatcher, sigmoid_focal_loss
from vlmlab.evaluation import evaluate_detections
from vlmlab.inference import GroundingParseError, parse_grounding

COORD = st.floats(-2, 3, allow_nan=False, width=32)
BOXES = st.lists(st.tuples(COORD, COORD, COORD, COORD), min_size=1, max_size=6)


@settings(max_examples=1000, deadline=None)
@given(a=BOXES, b=BOXES)
def test_giou_finite_bounded_with_finite_gradients(a, b):
    ta = torch.tensor(a, dtype=torch.float32, requires_grad=True)
    g = generalized_box_iou(ta, torch.tensor(b, dtype=torch.float32))
    assert torch.isfinite(g).all() and (g <= 1 + 1e-5).all() and (g >= -1 - 1e-5).all()
    g.sum().backward()
    assert torch.isfinite(ta.grad).all()


@settings(max_examples=500, deadline=None)
@given(b=BOXES)
def test_box_format_round_trip(b):
    t = torch.tensor(b, dtype=torch.float64)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(t)), t, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(x=st.lists(st.floats(-20, 20), min_size=1, max_size=20), alpha=st.sampled_from([0.25, 0.5, -1.0]), gamma=st.sampled_from([0.0, 1.0, 2.0]))
def test_focal_loss_formula(x, alpha, gamma):
    lg = torch.tensor(x, dtype=torch.float64)
    y = (torch.arange(len(x)) % 2).double()
    p = torch.sigmoid(lg)
    p_t = torch.where(y == 1, p, 1 - p)
    a_t = 1.0 if alpha < 0 else torch.where(y == 1, torch.tensor(alpha, dtype=torch.float64), torch.tensor(1 - alpha, dtype=torch.float64))
    ref = -a_t * (1 - p_t) ** gamma * torch.log(p_t.clamp(min=1e-300))
    got = sigmoid_focal_loss(lg, y, alpha, gamma)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-8)


@settings(max_examples=200, deadline=None)
@given(n_q=st.integers(1, 6), n_t=st.integers(0, 6), seed=st.integers(0, 10**6))
def test_matcher_is_optimal(n_q, n_t, seed):
    n_t = min(n_t, n_q)
    g = torch.Generator().manual_seed(seed)
    out = {'pred_boxes': torch.rand(1, n_q, 4, generator=g) * .5 + .1, 'pred_logits': torch.randn(1, n_q, generator=g),
           'query': torch.randn(1, n_q, 7, generator=g)}
    tgt = [{'boxes': torch.rand(n_t, 4, generator=g) * .5 + .1, 'captions': [torch.randint(0, 7, (2,), generator=g) for _ in range(n_t)]}]
    nll = lambda q, caps: torch.stack([-q.log_softmax(-1)[:, c].mean(-1) for c in caps], 1)
    m = HungarianMatcher()
    (q, j), = m(out, tgt, nll)
    assert len(q) == n_t and len(set(q.tolist())) == n_t
    if n_t:
        C = m.cost_matrix(out, 0, tgt[0], nll)
        best = min(sum(C[p[k], k] for k in range(n_t)) for p in itertools.permutations(range(n_q), n_t))
        assert abs(float(C[q, j].sum()) - float(best)) < 1e-4


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 3), min_size=1, max_size=3), degenerate=st.booleans(), seed=st.integers(0, 1000))
def test_loss_finite_and_every_parameter_gets_a_gradient(counts, degenerate, seed):
    torch.manual_seed(seed)
    head = DetectionHead(16, 30, 1, 2, d_model=16, num_queries=4, num_layers=1, num_heads=2)
    crit = DetectionLoss(head)
    B, L = len(counts), 10
    xy = torch.rand(B, L, 2); xy[:, :2] = -1
    out = head(torch.randn(B, L, 16), torch.ones(B, L, dtype=torch.bool), xy)
    if degenerate: out['pred_boxes'] = out['pred_boxes'] * torch.tensor([1, 1, 0, 0.])   # zero-size predictions
    targets = [{'boxes': torch.rand(n, 4) * .4 + .1, 'captions': [torch.randint(3, 30, (2,)) for _ in range(n)]} for n in counts]
    terms = crit(out, targets)
    assert all(torch.isfinite(v) for v in terms.values())
    if sum(counts) == 0: assert terms['bbox_l1'] == 0 and terms['bbox_giou'] == 0 and terms['caption'] == 0
    terms['loss'].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f'{name} is not in the graph (DDP would fail)'
        assert torch.isfinite(p.grad).all(), name


@settings(max_examples=2000, deadline=None)
@given(text=st.text(max_size=120), family=st.sampled_from(['qwen2_vl', 'qwen2_5_vl', 'qwen3_vl']))
def test_parser_only_raises_its_own_error(text, family):
    try:
        objs = parse_grounding(text, family)
    except GroundingParseError:
        return
    assert all(len(o['bbox']) == 4 for o in objs)


def test_evaluator_perfect_and_empty():
    gts = [{'boxes': [[5, 5, 20, 20]], 'labels': ['red square'], 'size': (32, 32)}, {'boxes': [], 'labels': [], 'size': (32, 32)}]
    perfect = [{'boxes': [[5, 5, 20, 20]], 'scores': [0.9], 'labels': ['red square']}, {'boxes': [], 'scores': [], 'labels': []}]
    r = evaluate_detections(gts, perfect)
    assert abs(r['class_agnostic']['AP50'] - 1) < 1e-9 and r['by_label']['mAP'] > 0.99 and r['captions']['exact_match'] == 1.0
    none = evaluate_detections(gts, [{'boxes': [], 'scores': [], 'labels': []}] * 2)
    assert none['class_agnostic']['AP50'] == 0.0


def _num_boxes_worker(rank, world, port, out):
    import torch.distributed as dist
    from vlmlab.detection_loss import num_boxes_global
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        targets = [{'boxes': torch.zeros(2 + 2 * rank, 4)}]          # rank 0: 2 boxes, rank 1: 4 boxes
        out[rank] = num_boxes_global(targets, 'cpu')
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_all_reduced_across_two_processes():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_num_boxes_worker, args=(2, port, out), nprocs=2, join=True)
    assert dict(out) == {0: 3.0, 1: 3.0}   # (2 + 4) / 2 processes, the same normalizer on both
