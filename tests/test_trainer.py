"""BBUTrainer: loss split, exact gradient accumulation, packed = padded, fail-fast, resume after SIGKILL, two processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from vlmlab.checkpoints import checkpoint_complete, last_good_checkpoint
from vlmlab.config import VLMLabConfig
from vlmlab.model import TrainableSetError
from vlmlab.trainer import BBUTrainer, NonFiniteError, TrainingCollator, build_trainer
from vlmlab.lm_loss import lm_loss_terms

TERMS = ('loss', 'lm_loss', 'teacher_lm_loss', 'student_lm_loss', 'detection_loss', 'bbox_l1', 'bbox_giou', 'objectness', 'caption')


def config(ds, out, **training):
    t = {'output_dir': str(out), 'max_steps': 2, 'per_device_batch_size': 4, 'logging_steps': 1, 'save_steps': 1000,
         'warmup_ratio': 0.0, **training}
    return VLMLabConfig.from_dict({
        'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(ds), 'target': 'grounding', 'teacher_ratio': 0.5},
        'stage': {'name': 'stage2', 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}}, 'training': t})


class FirstGrads(TrainerCallback):
    "Copies the gradients the optimizer sees at its first step."
    grads = None
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_split_sums_and_matches_the_models_own_loss(ds, tmp_path):
    tr = build_trainer(config(ds, tmp_path), progress=False)
    m = tr.model
    samples = [tr.train_dataset[i] for i in range(4)]
    assert any(s.spans['teacher'] for s in samples) and all(s.spans['student'] for s in samples)
    batch = TrainingCollator(m.tokenizer)(samples)
    from vlmlab.collators import model_inputs
    out = m.vlm(**model_inputs(batch))   # the model's own loss (labels included)
    t = lm_loss_terms(out.logits, batch['labels'], batch['label_kind'])
    t = {k: float(v.detach()) for k, v in t.items()}
    assert abs(t['teacher_lm_loss'] + t['student_lm_loss'] - t['lm_loss']) < 1e-6
    assert abs(t['lm_loss'] - float(out.loss.detach())) < 1e-5


def test_gradient_accumulation_is_exact(ds, tmp_path):
    grads = {}
    for name, bs, ga in (('ga1', 4, 1), ('ga4', 1, 4)):
        cap = FirstGrads()
        tr = build_trainer(config(ds, tmp_path / name, max_steps=1, per_device_batch_size=bs, gradient_accumulation_steps=ga,
                                  max_grad_norm=0.0), progress=False, callbacks=[cap])
        tr.train()
        grads[name] = cap.grads
    assert grads['ga1'].keys() == grads['ga4'].keys() and len(grads['ga1']) > 50
    total = sum(float(g.norm()) ** 2 for g in grads['ga1'].values()) ** 0.5
    worst = max((float((g - grads['ga4'][n]).norm()) / max(float(g.norm()), 1e-3 * total), n) for n, g in grads['ga1'].items())
    print('GA=1x4 vs GA=4x1, worst relative gradient difference:', worst)
    # relative to each parameter's gradient, floored at 1e-3 of the total (a key bias under softmax has a zero gradient in
    # exact arithmetic, so its float value is rounding noise)
    assert worst[0] < 1e-4, worst


def test_packed_step_equals_padded_step(ds, tmp_path):
    tr = build_trainer(config(ds, tmp_path), progress=False)
    m = tr.model
    tr.create_optimizer()
    samples = [tr.train_dataset[i] for i in range(4)]
    res = {}
    for kind, batch in (('padded', TrainingCollator(m.tokenizer, detection=True)(samples)),
                        ('packed', TrainingCollator(m.tokenizer, packed=True, spatial_merge_size=m.image_processor.merge_size,
                                                    detection=True)([samples]))):
        n_items = int((batch['labels'][..., 1:] != -100).sum())
        tr._window_boxes = torch.tensor(float(sum(len(t['boxes']) for t in batch['detection_targets'])))
        m.zero_grad(set_to_none=True)
        loss = tr.training_step(m, batch, torch.tensor(n_items))
        res[kind] = (float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert 'cu_seqlens' not in TrainingCollator(m.tokenizer)(samples)
    assert abs(res['packed'][0] - res['padded'][0]) < 1e-5 * abs(res['padded'][0])
    pad, pack = res['padded'][1], res['packed'][1]
    assert pad.keys() == pack.keys()
    total = sum(float(g.norm()) ** 2 for g in pad.values()) ** 0.5
    worst = max((float((g - pack[n]).norm()) / max(float(g.norm()), 1e-3 * total), n) for n, g in pad.items())
    print('packed vs padded, worst relative gradient difference:', worst)
    assert worst[0] < 1e-4, worst


def test_a_parameter_left_trainable_stops_the_first_step(ds, tmp_path):
    cfg = config(ds, tmp_path, max_steps=1)
    cfg.stage.lrs['vision'] = 1e-5   # so that the optimizer takes the stray parameter and only the guard can catch it
    tr = build_trainer(cfg, progress=False)
    tr.model.vlm.model.visual.blocks[0].attn.qkv.weight.requires_grad_(True)
    with pytest.raises(TrainableSetError, match=r'visual\.blocks\.0\.attn\.qkv\.weight \(vision\) should be frozen'):
        tr.train()


def test_nan_input_stops_with_diagnosis_and_keeps_the_checkpoint(ds, tmp_path):
    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2: tr._poison = True
    tr = build_trainer(config(ds, tmp_path, max_steps=4, save_steps=2), progress=False, callbacks=[PoisonAtStep3()])
    tr._poison = False
    orig = tr.compute_loss
    def poisoned(model, inputs, *a, **k):
        if tr._poison: inputs['pixel_values'][0, 0] = float('nan')
        return orig(model, inputs, *a, **k)
    tr.compute_loss = poisoned
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    msg = str(e.value)
    assert 'step 3' in msg and 'pixel_values hold 1 non-finite' in msg and 'last good step 2' in msg, msg
    ck = tmp_path / 'checkpoint-2'
    assert f'last good checkpoint: {ck}' in msg and checkpoint_complete(ck) and last_good_checkpoint(tmp_path) == str(ck)


def test_nan_gradient_names_the_group(ds, tmp_path):
    tr = build_trainer(config(ds, tmp_path, max_steps=2), progress=False)
    tr.model.head.obj_head.weight.register_hook(lambda g: g * float('inf'))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm in group\(s\) \{'head'") as e:
        tr.train()
    assert 'head.obj_head.weight' in str(e.value)


def test_fp16_warns(ds, tmp_path):
    tr = build_trainer(config(ds, tmp_path), progress=False)
    tr.args.fp16 = True   # as a GPU config would set it
    with pytest.warns(UserWarning, match='fp16 on Qwen-VL models overflows'):
        BBUTrainer(tr.model, tr.args, 'stage2', tr.lrs, train_dataset=tr.train_dataset, data_collator=tr.data_collator)


def test_incomplete_checkpoint_is_never_last(tmp_path):
    from safetensors.torch import save_file
    from vlmlab.checkpoints import _write_marker
    (tmp_path / 'checkpoint-4').mkdir()
    save_file({'w': torch.ones(8)}, str(tmp_path / 'checkpoint-4' / 'vlmlab_model.safetensors'))
    assert last_good_checkpoint(tmp_path) is None   # no marker yet: the save did not finish
    good = tmp_path / 'checkpoint-2'; good.mkdir(); save_file({'w': torch.zeros(8)}, str(good / 'vlmlab_model.safetensors'))
    _write_marker(good, 2)
    assert last_good_checkpoint(tmp_path) == str(good)
    _write_marker(tmp_path / 'checkpoint-4', 4)
    assert last_good_checkpoint(tmp_path) == str(tmp_path / 'checkpoint-4')
    f = tmp_path / 'checkpoint-4' / 'vlmlab_model.safetensors'
    f.write_bytes(f.read_bytes()[:-3])   # truncated after the marker
    assert last_good_checkpoint(tmp_path) == str(good)
    _write_marker(tmp_path / 'checkpoint-4', 4)
    f.write_bytes(f.read_bytes()[:-4] + b'\xff\xff\xff\xff')   # same size, other content
    assert last_good_checkpoint(tmp_path) == str(good)


def _write_cfg(path, ds, out, **training):
    cfg = config(ds, out, **training).to_dict()
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out, keys=TERMS):
    hist = json.loads((Path(out) / 'metrics.json').read_text())['log_history']
    return {h['step']: [h[k] for k in keys] for h in hist if 'lm_loss' in h}


def _env():
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def test_resume_after_sigkill_reproduces_the_trajectory(ds, tmp_path, vlmlab_bin):
    full = _write_cfg(tmp_path / 'full.yaml', ds, tmp_path / 'full', max_steps=8, save_steps=2, per_device_batch_size=2)
    subprocess.run([vlmlab_bin, 'train', '--config', str(full), '--quiet'], check=True, env=_env(), capture_output=True)
    cut = _write_cfg(tmp_path / 'cut.yaml', ds, tmp_path / 'cut', max_steps=8, save_steps=2, per_device_batch_size=2)
    p = subprocess.Popen([vlmlab_bin, 'train', '--config', str(cut), '--quiet'], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoint_complete(tmp_path / 'cut' / 'checkpoint-4'):
        assert p.poll() is None, 'the run ended before it could be killed'
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    last = last_good_checkpoint(tmp_path / 'cut')
    assert last is not None and int(last.rsplit('-', 1)[1]) in (4, 6)
    r = subprocess.run([vlmlab_bin, 'train', '--config', str(cut), '--resume', '--quiet'], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / 'cut' / 'metrics.json').read_text())['resumed_from'] == last
    a, b = _losses(tmp_path / 'full'), _losses(tmp_path / 'cut')
    resumed = [s for s in b if s > int(last.rsplit('-', 1)[1])]
    assert resumed == [s for s in a if s > int(last.rsplit('-', 1)[1])] and len(resumed) >= 2
    for s in resumed:
        for k, x, y in zip(TERMS, a[s], b[s]): assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (s, k, x, y)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_log_the_same_terms_as_one(ds, tmp_path, vlmlab_bin):
    one = _write_cfg(tmp_path / 'one.yaml', ds, tmp_path / 'one', max_steps=3, per_device_batch_size=4)
    subprocess.run([vlmlab_bin, 'train', '--config', str(one), '--quiet'], check=True, env=_env(), capture_output=True)
    two = _write_cfg(tmp_path / 'two.yaml', ds, tmp_path / 'two', max_steps=3, per_device_batch_size=2)
    torchrun = str(Path(sys.executable).parent / 'torchrun')
    r = subprocess.run([torchrun, '--nproc_per_node', '2', '--master_port', str(_free_port()), vlmlab_bin, 'train', '--config', str(two), '--quiet'],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / 'one', TERMS + ('data/samples',)), _losses(tmp_path / 'two', TERMS + ('data/samples',))
    assert list(a) == list(b) == [1, 2, 3]
    for s in a:   # same global batch of 4: every logged term equal to 1e-4 (relative), sample counters equal
        for k, x, y in zip(TERMS + ('data/samples',), a[s], b[s]): assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (s, k, x, y)


def test_cli_train_refuses_bad_setups_before_step_0(ds, tmp_path, vlmlab_bin):
    r = subprocess.run([vlmlab_bin, 'train'], capture_output=True, text=True)
    assert r.returncode == 2 and '--config' in r.stderr and 'required' in r.stderr, r.stderr
    bad = tmp_path / 'bad.yaml'; bad.write_text('training: {epoch: 2}\n')
    r = subprocess.run([vlmlab_bin, 'train', '--config', str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "training.epoch: unknown key (did you mean 'epochs'?)" in r.stderr
    blocker = tmp_path / 'a_file'; blocker.write_text('x')   # an output folder that cannot exist (works as root too)
    cfg = _write_cfg(tmp_path / 'blocked.yaml', ds, blocker / 'run')
    r = subprocess.run([vlmlab_bin, 'train', '--config', str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and f'output directory {blocker / "run"}: cannot create it' in r.stderr, r.stderr
    missing = _write_cfg(tmp_path / 'missing.yaml', tmp_path / 'nowhere', tmp_path / 'out')
    r = subprocess.run([vlmlab_bin, 'train', '--config', str(missing)], capture_output=True, text=True)
    assert r.returncode == 2 and 'no {split}.jsonl files' in r.stderr and not (tmp_path / 'out' / 'checkpoint-1').exists(), r.stderr



def trained_and_evaluated(cfg):
    "A trainer built from `cfg`, trained, then evaluated: its evaluation loss must be finite and positive."
    tr = build_trainer(cfg, progress=False)
    tr.train()
    ev = tr.evaluate()
    assert ev['eval_loss'] > 0 and torch.isfinite(torch.tensor(ev['eval_loss'])), ev
    return tr

@pytest.mark.slow
def test_evaluation_split_and_merged_lora_export(ds, tmp_path):
    "An eval split runs through compute_loss, and a LoRA run's export loads with from_pretrained and computes what the trainer's model does."
    from transformers import AutoModelForImageTextToText
    from vlmlab.collators import model_inputs
    from vlmlab.checkpoints import export_model
    cfg = config(ds, tmp_path / 'run', max_steps=3)
    cfg.data.eval_split, cfg.stage.lora, cfg.stage.lora_r = 'train', True, 4
    tr = trained_and_evaluated(cfg)
    vlm = tr.model.vlm.eval()
    assert any(float(p.detach().abs().max()) > 0 for n, p in vlm.named_parameters() if 'lora_B' in n), 'the adapters did not train'
    export_model(tr.model, tmp_path / 'final')
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / 'final', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    assert not any('lora_' in n for n, _ in loaded.named_parameters())
    batch = TrainingCollator(tr.model.tokenizer)([tr.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in model_inputs(batch).items() if k != 'labels'}
    with torch.no_grad():
        diff = (loaded.eval()(**inputs).logits - vlm(**inputs).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_evaluation_of_a_packed_run(ds, tmp_path):
    "With packing on, the evaluation split is collated into packed rows, and its loss is the padded evaluation's."
    cfg = config(ds, tmp_path / 'run', max_steps=1)
    cfg.data.eval_split, cfg.data.packing, cfg.data.max_tokens = 'train', True, 4096
    tr = trained_and_evaluated(cfg)
    assert tr.data_collator.packed
    packed = tr.evaluate()['eval_loss']
    tr.data_collator.packed = False   # the same samples, padded
    padded = tr.evaluate()['eval_loss']
    assert packed == pytest.approx(padded, rel=1e-5), (packed, padded)


# ---- the transformers hooks the guards live in (start-up check, and each hook seen called)

def _version():
    import re
    import transformers
    return re.escape(transformers.__version__)


def test_startup_refuses_a_transformers_without_a_hook(ds, tmp_path, monkeypatch):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    monkeypatch.delattr(Trainer, '_get_grad_norm')   # a release that renamed it
    with pytest.raises(TrainerHookError, match=rf"transformers {_version()}: Trainer\._get_grad_norm does not exist.*transformers>=5\.23,<5\.24"):
        build_trainer(config(ds, tmp_path), progress=False)


def test_startup_refuses_a_hook_with_a_new_signature(ds, tmp_path, monkeypatch):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    monkeypatch.setattr(Trainer, '_save_checkpoint', lambda self, model, trial, metrics=None: None)
    with pytest.raises(TrainerHookError, match=r"Trainer\._save_checkpoint takes \(model, trial, metrics\) where BBUTrainer's use of it takes \(model, trial\)"):
        build_trainer(config(ds, tmp_path), progress=False)


def test_startup_refuses_a_renamed_init_attribute(ds, tmp_path, monkeypatch):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    init = Trainer.__init__
    def renamed(self, *a, **k):
        init(self, *a, **k); self._loss_shifts_labels_v2 = self.__dict__.pop('_loss_shifts_labels')
    monkeypatch.setattr(Trainer, '__init__', renamed)
    with pytest.raises(TrainerHookError, match=rf"transformers {_version()}: Trainer\.__init__ no longer sets \['_loss_shifts_labels'\]"):
        build_trainer(config(ds, tmp_path), progress=False)


def _rebuilt(tr, cls):
    "The same trainer as `cls` (a BBUTrainer subclass that imitates a transformers release)."
    return cls(tr.model, tr.args, tr.stage, tr.lrs, tr.processor, train_dataset=tr.train_dataset, data_collator=tr.data_collator)


def test_grad_norm_hooks_not_called_stop_before_the_first_optimizer_step(ds, tmp_path):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    class SkipsGradNormHooks(BBUTrainer):
        "A training loop that no longer reaches BBUTrainer's overrides (the hooks were renamed upstream)."
        def _clip_grad_norm(self, model): return Trainer._clip_grad_norm(self, model)
        def _get_grad_norm(self, model, grad_norm=None): return Trainer._get_grad_norm(self, model, grad_norm)
    tr = _rebuilt(build_trainer(config(ds, tmp_path), progress=False), SkipsGradNormHooks)
    w = tr.model.head.obj_head.weight.detach().clone()
    with pytest.raises(TrainerHookError, match=rf"transformers {_version()}: optimizer step 1 ran without the Trainer calling "
                                               r"BBUTrainer\._clip_grad_norm or \._get_grad_norm, so the trainable-set check"):
        tr.train()
    assert torch.equal(w, tr.model.head.obj_head.weight.detach())   # stopped before the optimizer applied the unguarded step


def test_save_checkpoint_not_called_stops_at_the_save(ds, tmp_path):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    class SkipsSaveCheckpoint(BBUTrainer):
        _save_checkpoint = Trainer._save_checkpoint   # the loop saves through the Trainer's own: no marker, no trainable record
    tr = _rebuilt(build_trainer(config(ds, tmp_path, max_steps=2, save_steps=1), progress=False), SkipsSaveCheckpoint)
    with pytest.raises(TrainerHookError, match=r"the Trainer saved step 1 without calling BBUTrainer\._save_checkpoint"):
        tr.train()


def test_load_from_checkpoint_not_called_stops_the_resume(ds, tmp_path):
    from vlmlab.trainer import TrainerHookError
    build_trainer(config(ds, tmp_path, max_steps=1, save_steps=1), progress=False).train()
    class SkipsLoad(BBUTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None): pass   # as if the Trainer called another loader
    tr = _rebuilt(build_trainer(config(ds, tmp_path, max_steps=2, save_steps=1), progress=False), SkipsLoad)
    with pytest.raises(TrainerHookError, match=r"did not call BBUTrainer\._load_from_checkpoint"):
        tr.train(resume_from_checkpoint=str(tmp_path / 'checkpoint-1'))


def test_num_items_in_batch_not_passed_stops_the_first_window(ds, tmp_path, monkeypatch):
    from transformers import Trainer
    from vlmlab.trainer import TrainerHookError
    tr = build_trainer(config(ds, tmp_path), progress=False)
    monkeypatch.setattr(Trainer, '_get_num_items_in_batch', lambda self, batches, device: None)
    with pytest.raises(TrainerHookError, match=r"counted num_items_in_batch = None, not the \d+ label tokens .*exact gradient accumulation"):
        tr.train()


def test_a_lora_checkpoint_stores_its_settings_and_loads_back(ds, tmp_path):
    "A LoRA run's checkpoint holds vlmlab_lora.json; the eval loader rebuilds those adapters and computes what the trained model does."
    from vlmlab.checkpoints import LORA_SETTINGS, load_eval_model
    from vlmlab.collators import model_inputs
    from vlmlab.model import LORA_TARGETS
    cfg = config(ds, tmp_path / 'run', max_steps=2, save_steps=2)
    cfg.stage.lora, cfg.stage.lora_r = True, 4
    tr = build_trainer(cfg, progress=False); tr.train()
    ck = tmp_path / 'run' / 'checkpoint-2'
    s = json.loads((ck / LORA_SETTINGS).read_text())
    assert (s['r'], s['alpha'], s['target_modules']) == (4, 8, LORA_TARGETS), s
    assert checkpoint_complete(ck) and LORA_SETTINGS in json.loads((ck / 'vlmlab_complete.json').read_text())['files']
    batch = TrainingCollator(tr.model.tokenizer)([tr.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in model_inputs(batch).items() if k != 'labels'}
    with torch.no_grad():
        want = tr.model.vlm.eval()(**inputs).logits
        got = load_eval_model(ck).vlm(**inputs).logits
    assert (got - want).abs().max().item() < 1e-5


def test_an_older_lora_checkpoint_is_refused_until_its_settings_are_added(ds, tmp_path):
    "Without vlmlab_lora.json a LoRA checkpoint is refused by evaluation and by resume, naming the file; add_lora_settings mends it."
    from vlmlab.checkpoints import LORA_SETTINGS, CheckpointFileMissingError, _write_marker, add_lora_settings, load_eval_model
    from vlmlab.trainer import train_from_config
    cfg = config(ds, tmp_path / 'run', max_steps=2, save_steps=2)
    cfg.stage.lora, cfg.stage.lora_r = True, 4
    train_from_config(cfg, progress=False)
    ck = tmp_path / 'run' / 'checkpoint-2'
    (ck / LORA_SETTINGS).unlink(); _write_marker(ck, 2)   # the folder as a vlmlab that did not store the settings left it
    with pytest.raises(CheckpointFileMissingError, match=f'{LORA_SETTINGS}: missing.*never guessed.*add_lora_settings'):
        load_eval_model(ck)
    cfg.training.max_steps = 3
    with pytest.raises(CheckpointFileMissingError, match=f'checkpoint-2/{LORA_SETTINGS}: missing'):
        train_from_config(cfg, resume=True, progress=False)
    add_lora_settings(ck, r=4, alpha=8)
    assert checkpoint_complete(ck)
    res = train_from_config(cfg, resume=True, progress=False)
    assert res['resumed_from'] == str(ck) and max(h['step'] for h in res['log_history'] if 'loss' in h) == 3


def test_a_checkpoint_in_the_layout_written_before_the_checkpoints_module_still_loads(ds, tmp_path):
    "A checkpoint-N/ laid out file by file as BBUTrainer._save wrote it before (no LoRA) loads into resume and evaluation alike."
    from safetensors.torch import save_model
    from vlmlab.checkpoints import COMPLETE_MARKER, TRAINER_WEIGHTS, _write_marker, load_checkpoint_weights, load_eval_model, load_model
    tr = build_trainer(config(ds, tmp_path / 'run', max_steps=1), progress=False); tr.train()
    m = tr.model
    ck = tmp_path / 'old' / 'checkpoint-1'; ck.mkdir(parents=True)
    save_model(m, str(ck / TRAINER_WEIGHTS))                     # the module's state dict, as the old _save wrote it
    m.vlm.config.save_pretrained(ck); m.tokenizer.save_pretrained(ck); m.image_processor.save_pretrained(ck)
    torch.save(tr.args, ck / 'training_args.bin')
    _write_marker(ck, 1)
    assert sorted(p.name for p in ck.iterdir()) == sorted(['chat_template.jinja', 'config.json', 'preprocessor_config.json', 'tokenizer.json',
                                                           'tokenizer_config.json', 'training_args.bin', TRAINER_WEIGHTS, COMPLETE_MARKER])
    fresh = load_model(config(ds, tmp_path / 'x').model)
    load_checkpoint_weights(fresh, ck)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))
    ids = m.tokenizer('a red square', return_tensors='pt')['input_ids']
    with torch.no_grad():
        diff = (load_eval_model(ck).vlm(input_ids=ids).logits - m.vlm.eval()(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-6, diff


def test_training_order_is_the_trainers_own_shuffle_held_as_a_tensor(ds, tmp_path, monkeypatch):
    from transformers import Trainer
    from vlmlab.trainer import PermutationSampler
    mine = build_trainer(config(ds, tmp_path / 'mine'), progress=False).get_train_dataloader()
    monkeypatch.setattr(BBUTrainer, '_get_train_sampler', Trainer._get_train_sampler)   # the Trainer's RandomSampler, made seedable by accelerate
    theirs = build_trainer(config(ds, tmp_path / 'theirs'), progress=False).get_train_dataloader()
    a, b = mine.batch_sampler.sampler, theirs.batch_sampler.sampler
    assert isinstance(a, PermutationSampler) and type(b).__name__ == 'SeedableRandomSampler'
    for epoch in range(3):   # through the data loaders, epoch after epoch: the same records in the same order
        assert a.epoch == b.epoch == epoch
        ours, trainers = list(mine), list(theirs)   # each loader to its end (zip would leave the second one unfinished)
        assert len(ours) == 4 and all(torch.equal(x['input_ids'], y['input_ids']) for x, y in zip(ours, trainers))
    orders = [list(a) for _ in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(16))
