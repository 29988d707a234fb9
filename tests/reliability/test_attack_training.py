"""Attacks on training, checkpoints, configs and the loaders used by eval / ablate: garbage in checkpoints, impossible config values,
interrupted and repeated runs, a full disk, pickles where weights belong, truncated safetensors, missing model folders."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from reliability_kit import case
from vlmlab.checkpoints import (COMPLETE_MARKER, TRAINER_WEIGHTS as WEIGHTS_NAME, CheckpointError, ModelNotFoundError, checkpoint_complete,
                                checkpoint_problem, last_good_checkpoint, load_checkpoint_weights, load_detector, load_model, resolve_model_path,
                                verify_checkpoint)
from vlmlab.config import CONFIG_RANGES, ConfigError, ModelConfig, VLMLabConfig, _numeric_values
from vlmlab.trainer import DataError, NonFiniteError, RunExistsError, TrainingInterrupted, build_trainer, prepare_data, train_from_config

GROUP = 'Checkpoints: integrity'
LRS = {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}


def config(root, out, stage='stage2', **training) -> VLMLabConfig:
    t = {'output_dir': str(out), 'max_steps': 4, 'save_steps': 2, 'per_device_batch_size': 2, 'logging_steps': 1, 'warmup_ratio': 0.0,
         **training}
    return VLMLabConfig.from_dict({'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': True, 'head_d_model': 16, 'num_queries': 2},
                                   'data': {'ds_output': str(root)}, 'stage': {'name': stage, 'lrs': LRS}, 'training': t})


def losses(metrics: dict) -> dict[int, float]:
    return {h['step']: h['loss'] for h in metrics['log_history'] if 'lm_loss' in h}


@pytest.fixture(scope='module')
def run(tiny_ds, tmp_path_factory):
    "A finished 4-step run (checkpoint-2, checkpoint-4, final/, metrics.json) and its metrics; copy it before changing it."
    out = tmp_path_factory.mktemp('attack_run') / 'run'
    m = train_from_config(config(tiny_ds[0], out), progress=False)
    return out, m


def copy_run(run, tmp_path) -> Path:
    dst = tmp_path / 'run'
    shutil.copytree(run[0], dst)
    return dst


def garbage(f: Path, seed: int = 0) -> None:
    "Overwrite a file with random bytes of the same size."
    g = torch.Generator().manual_seed(seed)
    f.write_bytes(bytes(torch.randint(0, 256, (f.stat().st_size,), generator=g, dtype=torch.uint8).tolist()))


# ---- Checkpoints: integrity

@pytest.mark.parametrize('name', [WEIGHTS_NAME, WEIGHTS_NAME + ' (header kept)', 'optimizer.pt', 'trainer_state.json', 'rng_state.pth'])
@case('checkpoint file overwritten with same-size garbage', 'not complete; last_good_checkpoint falls back; verify_checkpoint names the file')
def test_same_size_garbage_is_not_complete(run, tmp_path, name):
    out = copy_run(run, tmp_path)
    keep_header, name = name.endswith('(header kept)'), name.split(' ')[0]
    f = out / 'checkpoint-4' / name
    size, raw = f.stat().st_size, f.read_bytes()
    garbage(f)
    if keep_header:   # a loadable safetensors file with random tensor bytes: only the hash tells
        n = 8 + int.from_bytes(raw[:8], 'little'); f.write_bytes(raw[:n] + f.read_bytes()[n:])
        from safetensors.torch import load_file
        assert len(load_file(str(f))) > 10
    assert f.stat().st_size == size
    assert not checkpoint_complete(out / 'checkpoint-4')
    assert last_good_checkpoint(out) == str(out / 'checkpoint-2')
    with pytest.raises(CheckpointError, match=rf"{name}: content differs from the sha256"):
        verify_checkpoint(out / 'checkpoint-4')


@case('one flipped byte in the middle of the weights', 'sha256 mismatch: refused on load_checkpoint_weights, naming the file')
def test_one_flipped_byte_is_caught(run, tmp_path):
    out = copy_run(run, tmp_path)
    f = out / 'checkpoint-2' / WEIGHTS_NAME
    b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0x01; f.write_bytes(bytes(b))
    det = load_model(ModelConfig('tiny-kit/qwen2_5_vl', detection_head=True, head_d_model=16, num_queries=2))
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_checkpoint_weights(det, out / 'checkpoint-2')


@case('checkpoint with an old size-only marker', 'not trusted: "an older marker with sizes only (no sha256)"')
def test_size_only_marker_is_not_trusted(run, tmp_path):
    out = copy_run(run, tmp_path)
    ck = out / 'checkpoint-4'
    sizes = {k: v['size'] for k, v in json.loads((ck / COMPLETE_MARKER).read_text())['files'].items()}
    (ck / COMPLETE_MARKER).write_text(json.dumps({'step': 4, 'files': sizes}))
    assert 'sizes only' in checkpoint_problem(ck) and last_good_checkpoint(out) == str(out / 'checkpoint-2')


@pytest.mark.parametrize('attack', ['extra weights file', 'marker path escape', 'file deleted', 'marker garbage'])
@case('checkpoint altered around its marker', 'an unlisted weights file, a marker naming ../ paths, a deleted file or an unreadable marker: '
      'not complete, the reason names the file')
def test_marker_tampering(run, tmp_path, attack):
    out = copy_run(run, tmp_path)
    ck = out / 'checkpoint-4'
    if attack == 'extra weights file': shutil.copy(ck / WEIGHTS_NAME, ck / 'model.safetensors'); want = 'model.safetensors: not listed'
    elif attack == 'marker path escape':
        m = json.loads((ck / COMPLETE_MARKER).read_text()); m['files']['../checkpoint-2/optimizer.pt'] = {'size': 1, 'sha256': '0'}
        (ck / COMPLETE_MARKER).write_text(json.dumps(m)); want = 'a path outside the folder'
    elif attack == 'file deleted': (ck / 'scheduler.pt').unlink(); want = 'scheduler.pt: listed in vlmlab_complete.json but missing'
    else: (ck / COMPLETE_MARKER).write_bytes(b'\xff' * 40); want = 'unreadable completion marker'
    assert not checkpoint_complete(ck) and want in checkpoint_problem(ck), checkpoint_problem(ck)
    assert last_good_checkpoint(out) == str(out / 'checkpoint-2')


@case('resume when the newest checkpoint is corrupt', 'skips it with a message naming the file, resumes from the previous intact one')
def test_resume_skips_a_corrupt_checkpoint(run, tiny_ds, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    garbage(out / 'checkpoint-4' / 'optimizer.pt')
    m = train_from_config(config(tiny_ds[0], out, max_steps=5), resume=True, progress=False)
    printed = capsys.readouterr().out
    assert 'skipping checkpoint-4' in printed and 'optimizer.pt' in printed and f"resuming from {out / 'checkpoint-2'} (step 2)" in printed
    assert m['resumed_from'] == str(out / 'checkpoint-2')


@case('resume from an explicit corrupt checkpoint, or when every checkpoint is corrupt', 'CheckpointError naming the file, before the model loads')
def test_resume_refuses_when_nothing_is_intact(run, tiny_ds, tmp_path):
    out = copy_run(run, tmp_path)
    garbage(out / 'checkpoint-4' / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"checkpoint-4/{WEIGHTS_NAME}: content differs"):
        train_from_config(config(tiny_ds[0], out), resume=str(out / 'checkpoint-4'), progress=False)
    garbage(out / 'checkpoint-2' / 'trainer_state.json')
    with pytest.raises(CheckpointError, match='no intact checkpoint to resume from'):
        train_from_config(config(tiny_ds[0], out), resume=True, progress=False)


class CorruptOnSave(TrainerCallback):
    "Overwrite the weights of every checkpoint with same-size garbage right after it is saved."
    def on_save(self, args, state, control, **kw):
        garbage(Path(args.output_dir) / f'checkpoint-{state.global_step}' / WEIGHTS_NAME)


@case('NaN stop after the last checkpoint was corrupted on disk', 'the diagnosis never calls the corrupt checkpoint intact')
def test_nan_stop_does_not_vouch_for_a_corrupt_checkpoint(tiny_ds, tmp_path):
    tr = build_trainer(config(tiny_ds[0], tmp_path / 'nan'), progress=False, callbacks=[CorruptOnSave()])
    p = next(p for n, p in tr.model.named_parameters() if p.requires_grad and 'merger' in n)
    p.register_hook(lambda g: g * float('nan') if tr.state.global_step >= 2 else g)
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    assert 'last good checkpoint: none intact yet' in str(e.value) and 'checkpoint-2 (' not in str(e.value), str(e.value)


# ---- Evaluation inputs (the loaders eval / ablate / report use)

@case('final/ export with same-size garbage weights', 'load_detector / load_model refuse it, naming model.safetensors', group='Evaluation inputs')
def test_export_garbage_refused(run, tmp_path):
    out = copy_run(run, tmp_path)
    assert (out / 'final' / COMPLETE_MARKER).is_file()
    garbage(out / 'final' / 'model.safetensors')
    with pytest.raises(CheckpointError, match=r'final/model.safetensors: content differs'):
        load_detector(out / 'final', config('x', 'y').model)


@pytest.mark.parametrize('cut', [0.5, 0.999, 4])
@case('truncated safetensors in a model folder without a marker', 'CheckpointError naming the file: "truncated ... header declares N bytes"',
      group='Evaluation inputs')
def test_truncated_safetensors_named(run, tmp_path, cut):
    out = copy_run(run, tmp_path)
    (out / 'final' / COMPLETE_MARKER).unlink()
    f = out / 'final' / 'model.safetensors'
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * cut)] if cut < 1 else data[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(CheckpointError, match=r'final/model.safetensors: truncated'):
            load_model(ModelConfig(str(out / 'final')))


@case('final/ without its completion marker', 'loads with a one-line warning that its files are unverified', group='Evaluation inputs')
def test_export_without_marker_warns(run, tmp_path):
    out = copy_run(run, tmp_path)
    (out / 'final' / COMPLETE_MARKER).unlink()
    with pytest.warns(UserWarning, match=r'no vlmlab_complete.json: its files are unverified'):
        load_detector(out / 'final', config('x', 'y').model)


@case('checkpoint-N/ without its completion marker', 'refused: "the save did not finish"', group='Evaluation inputs')
def test_checkpoint_without_marker_refused(run, tmp_path):
    out = copy_run(run, tmp_path)
    (out / 'checkpoint-4' / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match=r'checkpoint-4: no vlmlab_complete.json: the save did not finish'):
        verify_checkpoint(out / 'checkpoint-4')


@pytest.mark.parametrize('name', ['./no/such/model', '/nonexistent/qwen', '~/no_such_model_dir', 'a/b/c', 'models\\qwen', '{tmp}/missing',
                                  '{tmp}/sub/missing'])
@case('model path that does not exist', 'ModelNotFoundError "no such model folder", no Hub call (tokenizer never loaded)', group='Evaluation inputs')
def test_missing_model_folder_is_named_without_hub(name, tmp_path, monkeypatch):
    import transformers
    def no_hub(*a, **k): raise AssertionError('from_pretrained called: the path went to the Hub')
    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', no_hub)
    (tmp_path / 'sub').mkdir()
    name = name.format(tmp=tmp_path)
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match='no such model folder') as e:
        load_model(ModelConfig(name))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ConfigError) and time.perf_counter() - t < 2
    with pytest.raises(ModelNotFoundError):
        resolve_model_path(name)


@case('hub ids and tiny-kit names', "'org/name' hub ids pass through unchanged; tiny-kit/<family> resolves to its folder", group='Evaluation inputs')
def test_hub_ids_still_pass():
    for hub in ('Qwen/Qwen2.5-VL-3B-Instruct', 'Qwen/Qwen3-VL-2B-Instruct', 'gpt2'):
        assert resolve_model_path(hub) == hub
    assert (Path(resolve_model_path('tiny-kit/qwen2_5_vl')) / 'config.json').is_file()


# ---- Configs: bad values

DEFAULTS = {k.rsplit('.', 1)[0] + '.*' if k.startswith('stage.lrs.') else k: v for k, v in _numeric_values(VLMLabConfig())}


def _field_type(key: str) -> str:
    "The annotation of a config field, as written (for fields whose default is None, e.g. `float | None`)."
    import dataclasses
    obj = VLMLabConfig()
    *path, name = key.split('.')
    for p in path: obj = getattr(obj, p)
    return str(next(f.type for f in dataclasses.fields(obj) if f.name == name))


def _bad_values(key: str, rng) -> list:
    "Values just outside the range (the bound itself when open), and NaN / inf for float fields."
    is_float = isinstance(DEFAULTS[key], float) if key in DEFAULTS else _field_type(key).startswith('float')
    cast = float if is_float else int
    out = [float('nan'), float('inf')] if is_float else []
    if rng.lo is not None: out.append(cast(rng.lo) if rng.lo_open else cast(rng.lo - 1))
    if rng.hi is not None: out.append(cast(rng.hi) if rng.hi_open else cast(rng.hi + 1))
    return [v for v in out if v not in rng.also]


def _set(d: dict, key: str, v):
    parts = key.split('.')
    for p in parts[:-1]: d = d.setdefault(p, {})
    d[parts[-1]] = v


BAD = [(k, v) for k, r in CONFIG_RANGES.items() for v in _bad_values(k, r)]


@pytest.mark.parametrize('key,value', BAD, ids=[f'{k}={v}' for k, v in BAD])
@case('numeric config value out of its range', 'ConfigError naming the key, the value and the allowed range', group='Configs: bad values')
def test_every_numeric_field_refuses_impossible_values(key, value):
    d = {}
    _set(d, key.replace('.*', '.merger'), value)
    if key.startswith('stage.lrs'): d['stage']['name'] = 'stage1'
    with pytest.raises(ConfigError, match=rf"^{key.replace('.*', '.merger').replace('.', '[.]')}: .* \(allowed: "):
        VLMLabConfig.from_dict(d)


@case('every numeric config field has a range', 'a new int / float field without a CONFIG_RANGES entry fails this test', group='Configs: bad values')
def test_every_numeric_field_has_a_range():
    keys = [k for k, _ in _numeric_values(VLMLabConfig())]
    missing = [k for k in keys if k not in CONFIG_RANGES and k.rsplit('.', 1)[0] + '.*' not in CONFIG_RANGES]
    assert not missing and len(keys) >= 25, missing


@pytest.mark.parametrize('field,value', [('per_device_batch_size', 0), ('gradient_accumulation_steps', 0), ('max_steps', 0), ('max_steps', -5)])
@case('impossible value set after loading (CLI override)', 'build_trainer checks the config again: ConfigError before the model loads',
      group='Configs: bad values')
def test_overrides_are_checked_again(tiny_ds, tmp_path, field, value):
    cfg = config(tiny_ds[0], tmp_path / 'o')
    setattr(cfg.training, field, value)
    with pytest.raises(ConfigError, match=f'training.{field}: {value} is out of range'):
        build_trainer(cfg, progress=False)


# ---- Runs: lifecycle

@case('second train into a folder that holds a run', 'RunExistsError saying --resume or --overwrite; nothing is written', group='Runs: lifecycle')
def test_existing_run_needs_resume_or_overwrite(run, tiny_ds, tmp_path):
    out = copy_run(run, tmp_path)
    before = sorted(str(p.relative_to(out)) for p in out.rglob('*'))
    with pytest.raises(RunExistsError, match='pass --resume to continue it or --overwrite to replace it'):
        train_from_config(config(tiny_ds[0], out), progress=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*')) == before
    with pytest.raises(ConfigError, match='exclude each other'):
        train_from_config(config(tiny_ds[0], out), resume=True, overwrite=True, progress=False)


@case('overwrite an existing run', "removes only vlmlab's files (checkpoints, final/, metrics, ablation.json, report/); user files and symlink "
      "targets survive", group='Runs: lifecycle')
def test_overwrite_removes_only_vlmlab_files(run, tiny_ds, tmp_path):
    out = copy_run(run, tmp_path)
    (out / 'ablation.json').write_text('{}'); (out / 'report').mkdir(); (out / 'report' / 'index.html').write_text('old')
    (out / 'notes.txt').write_text('mine'); (out / 'checkpoint-best').mkdir()
    outside = tmp_path / 'outside'; outside.mkdir(); (outside / 'keep.txt').write_text('keep')
    (out / 'checkpoint-9').symlink_to(outside, target_is_directory=True)
    m = train_from_config(config(tiny_ds[0], out, max_steps=2, save_steps=1000), overwrite=True, progress=False)
    assert (out / 'notes.txt').read_text() == 'mine' and (out / 'checkpoint-best').is_dir() and (outside / 'keep.txt').exists()
    assert not (out / 'ablation.json').exists() and not (out / 'report').exists() and not (out / 'checkpoint-9').exists()
    assert not (out / 'checkpoint-4').exists() and list(losses(m)) == [1, 2] and m['resumed_from'] is None


class SignalAt(TrainerCallback):
    "Send a signal to this process during optimizer step `step` (what Ctrl-C or a scheduler's SIGTERM does)."
    def __init__(self, signum, step): self.signum, self.step = signum, step
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step - 1: os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
@case('Ctrl-C (SIGINT) or SIGTERM in the middle of a step', 'stops after that step with a complete checkpoint (TrainingInterrupted); the '
      'resumed run says so and logs the same losses as an uninterrupted run', group='Runs: lifecycle')
def test_signal_stops_cleanly_and_resumes_the_same(run, tiny_ds, tmp_path, capsys, signum):
    out = tmp_path / 'cut'
    with pytest.raises(TrainingInterrupted, match=rf'stopped by {signal.Signals(signum).name} after step 3 of 4') as e:
        train_from_config(config(tiny_ds[0], out), progress=False, callbacks=[SignalAt(signum, 3)])
    assert e.value.checkpoint == str(out / 'checkpoint-3') and checkpoint_complete(out / 'checkpoint-3') and e.value.step == 3
    assert not (out / 'final').exists() and not (out / 'metrics.json').exists()
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)   # handlers restored
    capsys.readouterr()
    m = train_from_config(config(tiny_ds[0], out), resume=True, progress=False)
    assert f"resuming from {out / 'checkpoint-3'} (step 3)" in capsys.readouterr().out
    a, b = losses(run[1]), losses(m)
    assert list(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= 1e-5 * max(1, abs(a[s])) for s in b), (a, b)   # step 4 trained after the resume


SIGINT_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from transformers import TrainerCallback
    from vlmlab.config import VLMLabConfig
    from vlmlab.trainer import TrainingInterrupted, train_from_config
    cfg = VLMLabConfig.from_dict(json.loads(sys.argv[1]))
    class Beat(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): Path(sys.argv[2]).write_text(str(state.global_step))
    try: train_from_config(cfg, progress=False, callbacks=[Beat()])
    except TrainingInterrupted as e: print(json.dumps({'checkpoint': e.checkpoint, 'step': e.step, 'signal': e.signal_name})); sys.exit(130)
''')


@case('Ctrl-C sent from outside to a training process', 'exits with the interruption, a complete checkpoint at the step it stopped',
      group='Runs: lifecycle')
def test_external_sigint(tiny_ds, tmp_path):
    cfg = config(tiny_ds[0], tmp_path / 'ext', max_steps=200, save_steps=1000).to_dict()
    beat = tmp_path / 'beat'
    p = subprocess.Popen([sys.executable, '-c', SIGINT_SCRIPT, json.dumps(cfg), str(beat)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.time() + 240
    while time.time() < deadline and not (beat.exists() and beat.read_text().strip() not in ('', '0')):
        assert p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    o, err = p.communicate(timeout=240)
    assert p.returncode == 130, err[-2000:]
    r = json.loads(o.strip().splitlines()[-1])
    assert r['signal'] == 'SIGINT' and checkpoint_complete(r['checkpoint']) and r['checkpoint'].endswith(f"checkpoint-{r['step']}")
    assert 'stopping after step' in err and 'Traceback' not in err


@pytest.mark.parametrize('change', ['stage', 'lora', 'stage, older checkpoint'])
@case('trainable set changed on resume (stage or LoRA)', 'CheckpointError naming the groups / LoRA that differ, before any step',
      group='Runs: lifecycle')
def test_trainable_set_change_on_resume(run, tiny_ds, tmp_path, change):
    from vlmlab.checkpoints import TRAINABLE_NAME, _write_marker
    out = copy_run(run, tmp_path)
    cfg = config(tiny_ds[0], out, max_steps=6)
    if change.startswith('stage'): cfg.stage.name = 'head'
    else: cfg.stage.lora, cfg.stage.lora_r = True, 2
    msg = r"groups \['merger', 'llm'\] trained in the checkpoint but are frozen now" if change == 'stage' else 'LoRA off in the checkpoint, on now'
    if change == 'stage, older checkpoint':   # no record of what trained: the optimizer state that does not fit is named
        (out / 'checkpoint-4' / TRAINABLE_NAME).unlink(); _write_marker(out / 'checkpoint-4', 4)
        with pytest.raises(CheckpointError, match=r'checkpoint-4: its optimizer / scheduler state does not fit this run'):
            train_from_config(cfg, resume=True, progress=False)
        return
    with pytest.raises(CheckpointError, match=rf"checkpoint-4: the trainable set changed since this checkpoint: .*{msg}"):
        train_from_config(cfg, resume=True, progress=False)


@pytest.mark.parametrize('how', ['ENOSPC', 'torch.save'])
@case('disk full while a checkpoint is written', 'CheckpointError naming the folder and "disk full"; the half-written folder is removed; '
      'resume picks the previous checkpoint', group='Runs: lifecycle')
def test_disk_full_while_saving(tiny_ds, tmp_path, monkeypatch, how):
    import safetensors.torch as st
    import vlmlab.trainer as T
    out = tmp_path / 'full'
    real_save, real_torch_save, real_usage, failed = st.save_model, torch.save, shutil.disk_usage, []
    def save_model(model, filename, *a, **k):
        if '/checkpoint-4' in str(filename) and how == 'ENOSPC':
            Path(filename).write_bytes(b'\0' * 100); failed.append(filename)
            raise OSError(errno.ENOSPC, 'No space left on device', str(filename))
        return real_save(model, filename, *a, **k)
    def tsave(obj, f, *a, **k):
        if '/checkpoint-4' in str(f) and how == 'torch.save':
            Path(f).write_bytes(b'\0' * 10); failed.append(f)
            raise RuntimeError('[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed')
        return real_torch_save(obj, f, *a, **k)
    monkeypatch.setattr(st, 'save_model', save_model); monkeypatch.setattr(torch, 'save', tsave)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000) if failed else real_usage(p))
    with pytest.raises(CheckpointError, match=rf"{out / 'checkpoint-4'}: disk full .* resume would use {out / 'checkpoint-2'}"):
        train_from_config(config(tiny_ds[0], out), progress=False)
    assert not (out / 'checkpoint-4').exists() and last_good_checkpoint(out) == str(out / 'checkpoint-2')


@pytest.fixture
def small_disk(tmp_path):
    "A 64 MiB tmpfs (root with mount rights only): a real disk that fills up."
    mnt = tmp_path / 'small'; mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('needs root and mount rights for a small tmpfs')
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)])


class FillDisk(TrainerCallback):
    "After the checkpoint of step `step`, fill the disk to within `keep` bytes."
    def __init__(self, mnt, step, keep=300_000): self.mnt, self.step, self.keep = mnt, step, keep
    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            st = os.statvfs(self.mnt)
            with open(self.mnt / 'ballast', 'wb') as f: f.write(b'\0' * (st.f_bavail * st.f_frsize - self.keep))


@pytest.mark.parametrize('step,max_steps', [(2, 4), (4, 4)], ids=['next checkpoint', 'final export'])
@case('a real disk (tmpfs) filling up during a checkpoint or the final export', 'CheckpointError naming the folder and "disk full '
      '(ENOSPC)"; nothing half-written remains; the previous checkpoint stays intact and is what resume picks', group='Runs: lifecycle')
def test_real_disk_full(tiny_ds, small_disk, step, max_steps):
    out = small_disk / 'run'
    with pytest.raises(CheckpointError, match=r'disk full \(ENOSPC\) while writing') as e:
        train_from_config(config(tiny_ds[0], out, max_steps=max_steps), progress=False, callbacks=[FillDisk(small_disk, step)])
    assert last_good_checkpoint(out) == str(out / f'checkpoint-{step}') and checkpoint_complete(out / f'checkpoint-{step}')
    assert not (out / f'checkpoint-{step + 2}').exists() and not (out / 'final').exists(), sorted(p.name for p in out.iterdir())
    assert not [p for p in out.iterdir() if p.name.startswith('.final')], str(e.value)


@case('pickled (code-running) optimizer.pt in a checkpoint whose marker vouches for it', 'CheckpointError naming optimizer.pt: '
      '"not a weights-only checkpoint file"', group='Runs: lifecycle')
def test_pickled_checkpoint_file_named(run, tiny_ds, tmp_path):
    from vlmlab.checkpoints import _write_marker
    out = copy_run(run, tmp_path)
    ck = out / 'checkpoint-4'
    torch.save({'state': {}, 'param_groups': [], 'evil': Path('/tmp')}, ck / 'optimizer.pt')   # a non-allowlisted global
    _write_marker(ck, 4)
    with pytest.raises(CheckpointError, match=r'checkpoint-4/optimizer.pt: refused by torch.load\(weights_only=True\): not a weights-only'):
        train_from_config(config(tiny_ds[0], out, max_steps=6), resume=True, progress=False)


@case('sample longer than the packing budget', 'DataError naming the sample id, its length, the budget and data.max_tokens', group='Runs: lifecycle')
def test_sample_over_packing_budget(tiny_ds, tmp_path):
    cfg = config(tiny_ds[0], tmp_path / 'pack')
    cfg.data.packing, cfg.data.max_tokens = True, 64
    det = load_model(cfg.model)
    with pytest.raises(DataError, match=r"sample '[^']+' has \d+ tokens, over the packing budget data.max_tokens = 64.*raise data.max_tokens to at least \d+"):
        prepare_data(cfg, det, progress=False)
