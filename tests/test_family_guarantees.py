"""The guarantees vlmlab gives the older families, through the trainer, for the families added in 2026-12: Qwen3-VL-MoE,
Qwen3.5 (hybrid Gated DeltaNet) and Qwen3.5-MoE / Qwen3.6: packed == padded steps with vlmlab's packing set-up, exact
gradient accumulation, the stage guard with experts and router, the detection head, the connector ablation, export and
reload, and the data counters with two dataloader workers."""
import pytest
import torch
from transformers import TrainerCallback

from vlmlab.checkpoints import load_detector
from vlmlab.collators import model_inputs
from vlmlab.config import VLMLabConfig
from vlmlab.data import convert, make_shapes
from vlmlab.diagnostics import connector_ablation
from vlmlab.families import family_record
from vlmlab.tiny import HYBRID_FAMILIES, tiny_kit
from vlmlab.trainer import TrainingCollator, build_trainer, train_from_config
from vlmlab.vision import ResizeSpec

NEW_FAMILIES = ('qwen3_vl_moe',) + HYBRID_FAMILIES


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp('fam')
    make_shapes(d / 'raw', n=8, seed=11, old_format=0, size_range=(64, 128), max_objects=2)
    return d


def dataset(raw, family):
    ds = raw / f'ds-{family}'
    if not ds.exists(): convert(raw / 'raw', ds, ResizeSpec.from_pretrained(tiny_kit(family)), progress=False)
    return ds


def config(ds, family, out, packing=False, stage='stage2', **training):
    t = {'output_dir': str(out), 'max_steps': 1, 'per_device_batch_size': 2, 'logging_steps': 1, 'save_steps': 1000,
         'warmup_ratio': 0.0, 'max_grad_norm': 0.0, **training}
    return VLMLabConfig.from_dict({
        'model': {'name_or_path': f'tiny-kit/{family}', 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(ds), 'target': 'grounding', 'packing': packing, **({'max_tokens': 1024} if packing else {})},
        'stage': {'name': stage, 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'experts': 1e-3, 'router': 1e-3, 'adapter': 1e-3, 'head': 1e-3}},
        'training': t})


def relative_difference(a: dict, b: dict) -> float:
    "Largest gradient difference, relative to each gradient (floored at 1e-3 of the total norm)."
    assert a.keys() == b.keys() and a
    total = sum(float(g.norm()) ** 2 for g in a.values()) ** 0.5
    return max(float((g - b[n]).norm()) / max(float(g.norm()), 1e-3 * total) for n, g in a.items())


class FirstGrads(TrainerCallback):
    "The gradients the optimizer sees at its first step."
    grads = None
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None: self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('family', NEW_FAMILIES)
def test_packed_step_equals_padded_step_with_vlmlab_packing(family, raw, tmp_path):
    "The trainer's packing set-up (packed attention, boundary-aware linear attention) gives the padded step's loss and gradients."
    tr = build_trainer(config(dataset(raw, family), family, tmp_path, packing=True), progress=False)
    m, hybrid = tr.model, family_record(family).packing == 'linear_attention'
    assert m.vlm.config.get_text_config()._attn_implementation == 'vlmlab_packed'
    samples = [tr.train_dataset.processor(r, 0) for r in tr.train_dataset.records[:3]]
    res = {}
    for kind, batch in (('padded', TrainingCollator(m.tokenizer, detection=True)(samples)),
                        ('packed', TrainingCollator(m.tokenizer, packed=True, spatial_merge_size=m.image_processor.merge_size,
                                                    detection=True, seq_idx=hybrid)([samples]))):
        n_items = int((batch['labels'][..., 1:] != -100).sum())
        tr._window_boxes = torch.tensor(float(sum(len(t['boxes']) for t in batch['detection_targets'])))
        m.zero_grad(set_to_none=True)
        loss = tr.training_step(m, batch, torch.tensor(n_items))
        res[kind] = (float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert abs(res['packed'][0] - res['padded'][0]) < 1e-5 * abs(res['padded'][0]), (res['packed'][0], res['padded'][0])
    assert relative_difference(res['padded'][1], res['packed'][1]) < 1e-4


@pytest.mark.parametrize('family', NEW_FAMILIES)
def test_gradient_accumulation_is_exact(family, raw, tmp_path):
    """LM and detection losses accumulate exactly. The MoE balancing loss is a statistic of each micro-batch's routing (as in
    transformers), so it is not additive over micro-batches: it is switched off here (router_aux_loss_coef 0)."""
    grads = {}
    for name, bs, ga in (('ga1', 2, 1), ('ga2', 1, 2)):
        cap = FirstGrads()
        build_trainer(config(dataset(raw, family), family, tmp_path / name, per_device_batch_size=bs, gradient_accumulation_steps=ga,
                             router_aux_loss_coef=0.0),
                      progress=False, callbacks=[cap]).train()
        grads[name] = cap.grads
    if family_record(family).moe:   # experts and router train in stage 2 and got gradients
        assert any('.mlp.experts.' in n for n in grads['ga1']) and any('.mlp.gate.' in n for n in grads['ga1'])
    assert relative_difference(grads['ga1'], grads['ga2']) < 1e-4


@pytest.mark.parametrize('family', NEW_FAMILIES)
def test_stage1_trains_the_merger_alone(family, raw, tmp_path):
    "The trainable-set guard runs on the first step: in stage 1 only merger parameters move, experts and router stay put."
    tr = build_trainer(config(dataset(raw, family), family, tmp_path, stage='stage1'), progress=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all('.visual.merger.' in n or '.visual.deepstack_merger_list.' in n for n in moved), sorted(moved)[:5]


@pytest.mark.parametrize('family', NEW_FAMILIES)
def test_export_reload_and_connector_ablation(family, raw, tmp_path):
    "A packed run with the detection head exports; the reloaded model gives the same logits and boxes; the ablation runs on it."
    cfg = config(dataset(raw, family), family, tmp_path / 'run', packing=True, max_steps=2)
    train_from_config(cfg, progress=False)
    det = load_detector(tmp_path / 'run' / 'final', cfg.model)
    tr = build_trainer(config(dataset(raw, family), family, tmp_path / 'probe'), progress=False)   # the data pipeline only
    samples = [tr.train_dataset[i] for i in range(3)]
    batch = TrainingCollator(det.tokenizer)(samples)
    again = load_detector(tmp_path / 'run' / 'final', cfg.model)
    with torch.no_grad():
        a, b = det(batch), again(batch)
        la, lb = det.vlm(**model_inputs(batch)).logits, again.vlm(**model_inputs(batch)).logits
    assert torch.equal(la, lb) and torch.equal(a['pred_boxes'], b['pred_boxes'])
    res = connector_ablation(det, samples, det.tokenizer.pad_token_id, batch_size=3, progress=False)
    assert len(res.losses['correct']) == 3 and set(res.deltas) >= {'shuffled'}, res
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res.losses.values())
    assert any(abs(a - b) > 1e-6 for a, b in zip(res.losses['correct'], res.losses['shuffled']))   # the image reaches the loss


def data_logs(out) -> list[dict]:
    import json
    hist = json.loads((out / 'metrics.json').read_text())['log_history']
    return [{k: v for k, v in h.items() if k.startswith('data/')} for h in hist if 'loss' in h]


@pytest.mark.parametrize('packing', [False, True])
def test_counters_and_losses_with_two_dataloader_workers(raw, tmp_path, packing):
    "The runbook counters travel with the samples: two worker processes log the same data/* values and losses as none."
    family = 'qwen2_5_vl'
    ds = dataset(raw, family)
    logs, losses = {}, {}
    for w in (0, 2):
        out = tmp_path / f'w{w}'
        m = train_from_config(config(ds, family, out, packing=packing, max_steps=3, dataloader_num_workers=w), progress=False)
        logs[w] = data_logs(out)
        losses[w] = [h['loss'] for h in m['log_history'] if 'loss' in h]
    assert logs[0] and logs[0][0].get('data/samples', 0) > 0, logs[0]
    assert logs[2] == logs[0], (logs[0], logs[2])
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
