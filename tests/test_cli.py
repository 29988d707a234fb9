"""The `vlmlab` command as a user runs it: exit codes, --help, JSON output, failures that name the problem."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlmlab.tiny import tiny_kit, tokenizer_with_moved_token
from vlmlab.tokens import IMAGE_PAD, VISION_START


def run(vlmlab_bin, *args, timeout=300):
    return subprocess.run([vlmlab_bin, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_and_options(vlmlab_bin):
    r = run(vlmlab_bin, '--help')
    assert r.returncode == 0 and 'doctor' in r.stdout and 'demo' in r.stdout
    r = run(vlmlab_bin, 'doctor', '--help')
    assert r.returncode == 0
    for flag in ('--out', '--cache-dir', '--model', '--timeout', '--json'):
        assert flag in r.stdout
    assert 'writability' in r.stdout  # the docment became help text


def test_no_command_prints_help_and_fails(vlmlab_bin):
    r = run(vlmlab_bin)
    assert r.returncode == 2 and 'COMMAND' in r.stdout


def test_doctor_json_ok(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--json', '--out', str(tmp_path / 'runs'), '--model', str(tiny_kit('qwen2_vl')))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep['ok'] is True
    names = [c['name'] for c in rep['checks']]
    assert {'versions', 'torch import', 'output directory writable', 'model tokens'} <= set(names)
    torch_check = next(c for c in rep['checks'] if c['name'] == 'torch import')
    assert torch_check['data']['torch'].startswith('2.')


def test_doctor_fails_on_unwritable_output(vlmlab_bin, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    r = run(vlmlab_bin, 'doctor', '--out', str(blocker / 'runs'))
    assert r.returncode == 1
    assert 'FAIL' in r.stdout and 'instead' in r.stdout and 'check(s) FAILED' in r.stdout


def test_doctor_fails_on_moved_special_token(vlmlab_bin, tmp_path):
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(tiny_kit('qwen2_5_vl'), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    moved_to = tok.convert_tokens_to_ids(VISION_START)
    tokenizer_with_moved_token(tok, IMAGE_PAD, moved_to).save_pretrained(ckpt)
    r = run(vlmlab_bin, 'doctor', '--json', '--out', str(tmp_path / 'runs'), '--model', str(ckpt))
    assert r.returncode == 1
    bad = [c for c in json.loads(r.stdout)['checks'] if not c['ok']]
    assert len(bad) == 1 and f'<|image_pad|> has id {moved_to}' in bad[0]['detail'] and 'image_token_id' in bad[0]['detail']


def test_doctor_reports_missing_model(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--out', str(tmp_path), '--model', str(tmp_path / 'nope'))
    assert r.returncode == 2 and f"{tmp_path / 'nope'}: no such model folder" in r.stderr and r.stderr.count('\n') == 1


@pytest.mark.slow
def test_demo_pipeline_writes_every_artifact(vlmlab_bin, tmp_path):
    "A short demo (a few steps: too short to read the image) writes every artifact and says the ablation did not pass."
    r = subprocess.run([vlmlab_bin, 'demo', '--out', str(tmp_path / 'runs'), '--align-steps', '3', '--grounding-steps', '3',
                        '--n-train', '16', '--n-heldout', '4', '--quiet'], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'vlmlab demo: FAILED: align connector ablation' in r.stdout and 'FAIL: correct image loss' in r.stdout
    out = tmp_path / 'runs' / 'demo'
    for run in ('language', 'align', 'grounding'):
        for f in ('metrics.json', 'ablation.json', 'config.yaml', 'final/config.json', 'report/index.html'):
            assert (out / run / f).is_file(), (run, f)
        assert any((out / run / 'tensorboard').iterdir())
    assert (out / 'grounding' / 'final' / 'detection_head.safetensors').is_file()
    summary = json.loads((out / 'demo.json').read_text())
    assert set(summary['mAP']) == {'head', 'text_path', 'baseline_whole_image'}
    ev = json.loads((out / 'eval.json').read_text())
    assert ev['images'] == 4 and ev['boxes'] >= 4


def test_demo_refuses_bad_options(vlmlab_bin, tmp_path):
    for args, msg in ((['--model', 'tiny-kit/llava'], 'unknown --model'), (['--raw', str(tmp_path / 'nope')], 'no such folder'),
                      (['--align-steps', '0'], 'must be >= 1')):
        r = subprocess.run([vlmlab_bin, 'demo', '--out', str(tmp_path / 'runs'), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count('\n') == 1, (args, r.stdout, r.stderr)


# --- one grammar, checked over the real parser -------------------------------------------------------------------------

def _subparsers():
    from vlmlab.cli import build_parser
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_output_is_out_and_nothing_read_is_out():
    from vlmlab.cli import COMMANDS
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    for name, sp in subs.items():
        shown = [a.option_strings[0] for a in sp._actions if a.option_strings]
        outputs = [o for o in shown if {'out', 'output'} & set(o.lstrip('-').split('-'))]
        assert outputs in ([], ['--out']), (name, outputs)
        h = sp.format_help()
        for old in ('--output-dir', '--out-dir'): assert old not in h, (name, old)
    for name in ('doctor', 'demo', 'make-shapes', 'convert', 'train', 'report', 'ablate', 'eval', 'bench', 'detect', 'export'):
        assert '--out' in [a.option_strings[0] for a in subs[name]._actions if a.option_strings], name
    assert '--data' in [a.option_strings[0] for a in subs['validate']._actions if a.option_strings]
    # validate's old --out is a hidden alias of what it reads: it fills `data`, never an output
    assert vars(subs['validate'].parse_args(['--out', 'X']))['data'] == 'X'
    assert '--out' in next(a for a in subs['validate']._actions if a.dest == 'data').deprecated


def test_required_options_are_required_in_argparse_and_help():
    subs = _subparsers()
    req = {name: sorted(a.option_strings[0] for a in sp._actions if a.required and a.option_strings) for name, sp in subs.items()}
    assert req['train'] == ['--config'] and req['ablate'] == ['--data', '--model'] and req['eval'] == ['--checkpoints', '--data']
    for name, flags in req.items():
        if flags:
            section = subs[name].format_help().split('required options:')[1]
            assert all(f in section for f in flags), (name, flags)
    positional = {name: [a.metavar for a in sp._actions if not a.option_strings] for name, sp in subs.items()}
    assert positional['convert'] == ['INPUT'] and positional['report'] == ['RUN_DIR'] and positional['clean-raw-json'] == ['FOLDER']


@pytest.mark.parametrize('args,flag', [(['train'], '--config'), (['ablate', '--data', 'ds'], '--model'),
                                       (['eval', '--data', 'ds'], '--checkpoints'), (['ablate', '--model', 'm'], '--data')])
def test_missing_required_option_is_one_line_exit_2(vlmlab_bin, args, flag):
    r = run(vlmlab_bin, *args)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert f'{flag} is required: ' in r.stderr and 'usage' not in r.stderr


def test_version(vlmlab_bin):
    from vlmlab import __version__
    r = run(vlmlab_bin, '--version')
    assert r.returncode == 0 and r.stdout.strip() == f'vlmlab {__version__}'


def test_old_spellings_still_work_with_a_note(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--json', '--output-dir', str(tmp_path / 'runs'))
    assert r.returncode == 0 and json.loads(r.stdout)['ok'], r.stderr
    assert r.stderr.strip() == 'vlmlab doctor: note: --output-dir is deprecated, use --out'
    assert (tmp_path / 'runs').is_dir()
    r = run(vlmlab_bin, 'make-shapes', '--out-dir=' + str(tmp_path / 'raw'), '--n', '3')
    assert r.returncode == 0 and len(list((tmp_path / 'raw').glob('*.json'))) == 3
    assert 'note: --out-dir is deprecated, use --out' in r.stderr
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'ds'), '--migrate-old', '--quiet')
    assert r.returncode == 0, r.stderr
    r = run(vlmlab_bin, 'validate', '--out', str(tmp_path / 'ds'), '--quiet')   # validate --out named the folder it reads
    assert r.returncode == 0 and 'note: --out is deprecated, use --data' in r.stderr, r.stdout + r.stderr
    r = run(vlmlab_bin, 'validate', '--out', str(tmp_path / 'nowhere'), '--quiet')
    assert r.returncode != 0   # the alias really is --data: another folder, another answer


# --- errors: one line, exit 2 -------------------------------------------------------------------------------------------

def test_doctor_accepts_tiny_kit(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--json', '--out', str(tmp_path / 'runs'), '--model', 'tiny-kit/qwen2_vl')
    assert r.returncode == 0, r.stdout + r.stderr
    assert next(c for c in json.loads(r.stdout)['checks'] if c['name'] == 'model tokens')['data']['model_type'] == 'qwen2_vl'


@pytest.mark.parametrize('cmd', ['doctor', 'convert', 'validate', 'ablate', 'eval', 'demo'])
def test_missing_model_folder_is_named_without_a_hub_call(vlmlab_bin, tmp_path, cmd):
    "With the Hub allowed (no HF_HUB_OFFLINE) a missing folder would be retried for a minute as a repo id."
    (tmp_path / 'runs').mkdir()
    missing = 'runs/stage1-typo'   # one slash, like a hub id, but under an existing local folder
    args = {'doctor': ['--model', missing], 'convert': [str(tmp_path), '--out', str(tmp_path / 'ds'), '--model', missing],
            'validate': ['--data', str(tmp_path), '--model', missing], 'ablate': ['--model', missing, '--data', str(tmp_path)],
            'eval': ['--checkpoints', missing, '--data', str(tmp_path)], 'demo': ['--out', str(tmp_path), '--model', missing]}[cmd]
    env = {k: v for k, v in os.environ.items() if k != 'HF_HUB_OFFLINE'}
    t0 = time.time()
    r = subprocess.run([vlmlab_bin, cmd, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stdout + r.stderr
    assert 'runs/stage1-typo' in r.stderr and 'no such model folder' in r.stderr and 'Traceback' not in r.stderr
    assert time.time() - t0 < 60


def _raw(tmp_path, n=4):
    from vlmlab.data import make_shapes
    make_shapes(tmp_path / 'raw', n, 0, 0.0, 0.0)
    return tmp_path / 'raw'


def test_convert_all_rejected_exits_2_with_reasons_and_image_root_hint(vlmlab_bin, tmp_path):
    raw = _raw(tmp_path)
    for img in list(raw.glob('*.jpg')) + list(raw.glob('*.png')): img.rename(tmp_path / img.name)   # images moved away
    r = run(vlmlab_bin, 'convert', str(raw), '--out', str(tmp_path / 'ds'), '--quiet')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'all 4 inputs were rejected (4 file not found)' in r.stderr and '--image-root' in r.stderr
    assert str(tmp_path / 'ds' / 'train.rejects.jsonl') in r.stderr
    (tmp_path / 'empty').mkdir()
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'empty'), '--out', str(tmp_path / 'ds2'), '--quiet')
    assert r.returncode == 2 and 'no annotation inputs' in r.stderr


def test_convert_other_reasons_exit_2_without_the_image_hint(vlmlab_bin, tmp_path):
    raw = _raw(tmp_path)
    for f in raw.glob('*.json'): f.write_text('{not json')
    r = run(vlmlab_bin, 'convert', str(raw), '--out', str(tmp_path / 'ds'), '--quiet')
    assert r.returncode == 2 and 'all 4 inputs were rejected' in r.stderr and '--image-root' not in r.stderr, r.stderr


def test_convert_some_rejected_exit_0_strict_1(vlmlab_bin, tmp_path):
    raw = _raw(tmp_path)
    sorted(raw.glob('*.json'))[0].write_text('{not json')
    assert run(vlmlab_bin, 'convert', str(raw), '--out', str(tmp_path / 'ds'), '--quiet').returncode == 0
    assert run(vlmlab_bin, 'convert', str(raw), '--out', str(tmp_path / 'ds'), '--quiet', '--strict').returncode == 1


def test_pixel_limits_with_model_must_agree(tmp_path, capsys):
    from vlmlab.cli import main, resize_spec
    raw, kit = _raw(tmp_path), 'tiny-kit/qwen2_5_vl'
    own = resize_spec(model=kit)
    for flag, value in (('--max-pixels', own.max_pixels // 2), ('--min-pixels', own.min_pixels * 2), ('--family', 'qwen3_vl')):
        assert main(['convert', str(raw), '--out', str(tmp_path / 'ds'), '--model', kit, flag, str(value), '--quiet']) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value} (the model's: " in err and err.count('\n') == 1, err
        assert not (tmp_path / 'ds' / 'train.jsonl').exists()
    assert main(['convert', str(raw), '--out', str(tmp_path / 'ds'), '--model', kit, '--max-pixels', str(own.max_pixels), '--quiet']) == 0
    assert main(['validate', '--data', str(tmp_path / 'ds'), '--max-pixels', '1000', '--quiet']) == 2
    assert 'need --family' in capsys.readouterr().err


def _lib_errors():
    "Every exception class the library defines, plus the run-folder errors by the names the trainer gives them."
    import importlib, pkgutil, vlmlab
    found = {}
    for m in pkgutil.iter_modules(vlmlab.__path__):
        if m.name.startswith('_'): continue
        mod = importlib.import_module(f'vlmlab.{m.name}')
        for v in vars(mod).values():
            if isinstance(v, type) and issubclass(v, Exception) and v.__module__.startswith('vlmlab'): found[v.__name__] = v
    for name in ('ConfigError', 'DataError', 'CheckpointError', 'RunExistsError', 'ManifestError'):
        found.setdefault(name, type(name, (Exception,), {'__module__': 'vlmlab.trainer'}))   # whatever its base class
    return found


def test_every_library_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from vlmlab import cli
    errors = _lib_errors()
    assert {'ConfigError', 'DataError', 'ResizeError'} <= set(errors)
    for name, cls in errors.items():
        if name == 'NonFiniteError': continue   # train's own status 3 (below)
        def boom(*a, **k): raise _make(cls, f"{name}: key training.lr: -1 is negative\nuse a positive value")
        monkeypatch.setattr('vlmlab.report.write_report', boom)
        assert cli.main(['report', str(tmp_path)]) == 2, name
        err = capsys.readouterr().err
        assert err == f"vlmlab report: {name}: key training.lr: -1 is negative; use a positive value\n", (name, err)


def _make(cls, msg):
    try: return cls(msg)
    except TypeError:   # an error class with its own constructor
        e = cls.__new__(cls); Exception.__init__(e, msg); return e


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from vlmlab import cli
    monkeypatch.setattr('vlmlab.report.write_report', lambda *a, **k: {}['bug'])
    with pytest.raises(KeyError): cli.main(['report', str(tmp_path)])


def _fake_train(seen, exc=None):
    def train_from_config(cfg, resume=False, progress=True, callbacks=(), overwrite=False, **overrides):
        seen.update(resume=resume, overwrite=overwrite, out=cfg.training.output_dir, max_steps=cfg.training.max_steps)
        if exc: raise exc
        return {'final_model': 'f', 'tensorboard': 't'}
    return train_from_config


def _config(tmp_path, ds='ds_output', **training):
    "A small stage-1 run config of the tiny kit model (the shipped configs change with the demo's recipe)."
    import yaml
    cfg = {'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': False},
           'data': {'ds_output': str(ds), 'train_split': 'train', 'target': 'caption', 'max_length': 1024},
           'stage': {'name': 'stage1', 'lrs': {'merger': 1.0e-3}},
           'training': {'output_dir': str(tmp_path / 'run'), 'epochs': 1, 'per_device_batch_size': 2, **training}}
    (tmp_path / 'c.yaml').write_text(yaml.safe_dump(cfg))
    return str(tmp_path / 'c.yaml')


def test_train_overwrite_resume_and_ctrl_c(tmp_path, monkeypatch, capsys):
    from vlmlab import cli
    cfg, seen = _config(tmp_path), {}
    monkeypatch.setattr('vlmlab.trainer.train_from_config', _fake_train(seen))
    assert cli.main(['train', '--config', cfg, '--overwrite', '--out', str(tmp_path / 'o')]) == 0
    assert seen == dict(resume=False, overwrite=True, out=str(tmp_path / 'o'), max_steps=seen['max_steps'])
    assert cli.main(['train', '--config', cfg, '--resume']) == 0 and seen['resume'] is True and seen['overwrite'] is False
    capsys.readouterr()
    assert cli.main(['train', '--config', cfg, '--resume', '--overwrite']) == 2
    assert 'exclude each other' in capsys.readouterr().err
    monkeypatch.setattr('vlmlab.trainer.train_from_config', _fake_train(seen, KeyboardInterrupt()))
    assert cli.main(['train', '--config', cfg, '--out', str(tmp_path / 'o o'), '--max-steps', '9']) == 130
    err = capsys.readouterr().err
    assert err == f"vlmlab train: interrupted (Ctrl-C); resume with: vlmlab train --config {cfg} --resume --out '{tmp_path / 'o o'}' --max-steps 9\n"
    from vlmlab.trainer import NonFiniteError
    monkeypatch.setattr('vlmlab.trainer.train_from_config', _fake_train(seen, NonFiniteError('loss is nan at step 3')))
    assert cli.main(['train', '--config', cfg]) == 3 and 'stopped: loss is nan at step 3' in capsys.readouterr().err


def test_train_overwrite_reaches_the_trainer(tmp_path, monkeypatch):
    from vlmlab import cli
    seen = {}
    def fake(cfg, resume=False, progress=True, overwrite=False, **kw):
        seen.update(resume=resume, overwrite=overwrite); return {'final_model': 'f', 'tensorboard': 't'}
    monkeypatch.setattr('vlmlab.trainer.train_from_config', fake)
    assert cli.main(['train', '--config', _config(tmp_path), '--overwrite']) == 0
    assert seen == {'resume': False, 'overwrite': True}


def test_ctrl_c_is_one_line_exit_130(vlmlab_bin, tmp_path):
    "A real SIGINT to a running command (as the terminal sends on Ctrl-C)."
    p = subprocess.Popen([vlmlab_bin, 'make-shapes', '--out', str(tmp_path / 'raw'), '--n', '100000'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (tmp_path / 'raw').is_dir() or not any((tmp_path / 'raw').glob('*.json')):   # it is running
        assert time.time() - t0 < 120 and p.poll() is None
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == 'vlmlab make-shapes: interrupted (Ctrl-C)\n', err


# --- progress bars -----------------------------------------------------------------------------------------------------

def test_eval_shows_progress_and_quiet_hides_it(tmp_path, capsys):
    from vlmlab.cli import main
    raw, kit = _raw(tmp_path), 'tiny-kit/qwen2_5_vl'
    shutil.copytree(tiny_kit('qwen2_5_vl'), tmp_path / 'copy')
    assert main(['convert', str(raw), '--out', str(tmp_path / 'ds'), '--model', kit, '--split', 'heldout', '--quiet']) == 0
    args = ['eval', '--checkpoints', kit, str(tmp_path / 'copy'), '--data', str(tmp_path / 'ds'), '--n', '4', '--batch-size', '2']
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert 'checkpoints' in err and '2/2' in err and 'batches' in err, err
    assert main(args + ['--quiet']) == 0
    assert capsys.readouterr().err == ''


def test_train_stopped_at_a_clean_point_prints_checkpoint_and_resume(tmp_path, monkeypatch, capsys):
    from vlmlab import cli
    from vlmlab.trainer import TrainingInterrupted
    cfg, seen = _config(tmp_path), {}
    stop = TrainingInterrupted('stopped by SIGTERM after step 4 of 90', str(tmp_path / 'o' / 'checkpoint-4'), 4, 'SIGTERM')
    monkeypatch.setattr('vlmlab.trainer.train_from_config', _fake_train(seen, stop))
    assert cli.main(['train', '--config', cfg, '--out', str(tmp_path / 'o')]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == (f"vlmlab train: interrupted (SIGTERM) after step 4; {tmp_path / 'o' / 'checkpoint-4'} is complete; "
                   f"resume with: vlmlab train --config {cfg} --resume --out {tmp_path / 'o'}\n")


@pytest.mark.slow
def test_ctrl_c_in_a_real_training_run_then_resume(vlmlab_bin, tmp_path):
    "SIGINT to a running `vlmlab train`: exit 130, one line with the resume command, and that command resumes."
    from vlmlab.cli import main
    raw = _raw(tmp_path, 8)
    assert main(['convert', str(raw), '--out', str(tmp_path / 'ds'), '--model', 'tiny-kit/qwen2_5_vl', '--quiet']) == 0
    _config(tmp_path, tmp_path / 'ds', epochs=1000, save_steps=2, logging_steps=1)
    out = tmp_path / 'run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([vlmlab_bin, 'train', '--config', str(tmp_path / 'c.yaml'), '--out', str(out), '--quiet'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not list(out.glob('checkpoint-*')):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and 'Traceback' not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('vlmlab train: interrupted (Ctrl-C) after step') and last.endswith(
        f"resume with: vlmlab train --config {tmp_path / 'c.yaml'} --resume --out {out}"), err
    r = subprocess.run([vlmlab_bin, 'train', '--config', str(tmp_path / 'c.yaml'), '--resume', '--out', str(out), '--quiet',
                        '--max-steps', str(max(int(c.name.split('-')[1]) for c in out.glob('checkpoint-*')) + 1)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and 'resuming from' in r.stdout + r.stderr, r.stdout + r.stderr


def _llava_box(tmp_path, box=(333, 250, 667, 750)):
    "A LLaVA file whose answer holds a box written in 0..1000 relative coordinates, over a 1800x1200 image."
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (1800, 1200), (240, 240, 240))
    ImageDraw.Draw(img).rectangle([600, 300, 1199, 899], fill=(220, 30, 30)); img.save(tmp_path / 'a.png')
    answer = json.dumps([{'bbox_2d': list(box), 'label': 'red square'}])
    turns = [{'from': 'human', 'value': '<image>\nFind it.'}, {'from': 'gpt', 'value': answer}]
    (tmp_path / 'l.json').write_text(json.dumps([{'id': 'a', 'image': 'a.png', 'conversations': turns}]))
    return tmp_path / 'l.json'


def test_convert_box_space_and_max_decode_pixels(vlmlab_bin, tmp_path):
    "--box-space says how answer boxes are written; --max-decode-pixels caps what is decoded; bad values are one line, exit 2."
    src = _llava_box(tmp_path)
    r = run(vlmlab_bin, 'convert', str(src), '--out', str(tmp_path / 'px'), '--max-pixels', '200704', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr   # the default reads [333, 250, ...] as pixels of the original: another box
    as_pixels = json.loads(json.loads((tmp_path / 'px' / 'train.jsonl').read_text())['conversations'][1]['content'])[0]['bbox_2d']
    r = run(vlmlab_bin, 'convert', str(src), '--out', str(tmp_path / 'rel'), '--max-pixels', '200704', '--box-space', 'rel1000', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((tmp_path / 'rel' / 'train.jsonl').read_text())
    w, h = rec['size']
    assert rec['box_space'] == 'rel1000' and json.loads(rec['conversations'][1]['content'])[0]['bbox_2d'] == \
        [round(v) for v in (600 * w / 1800, 300 * h / 1200, 1200 * w / 1800, 900 * h / 1200)] != as_pixels, (rec, as_pixels)
    assert [o['label'] for o in rec['objects']] == ['red square']
    r = run(vlmlab_bin, 'convert', str(src), '--out', str(tmp_path / 'cap'), '--box-space', 'rel1000', '--max-decode-pixels', '1000000', '--quiet')
    assert r.returncode == 2 and 'max_decode_pixels' in r.stderr and r.stderr.count('\n') == 1, r.stderr
    for flag, value in (('--box-space', 'percent'), ('--max-decode-pixels', '0')):
        r = run(vlmlab_bin, 'convert', str(src), '--out', str(tmp_path / 'bad'), flag, value, '--quiet')
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and flag.lstrip('-').replace('-', '_') in r.stderr, r.stderr
        assert not (tmp_path / 'bad').exists()


def _kit_with_added_token(tmp_path, token='zqxtoken'):
    "A copy of the tiny kit whose tokenizer has one more added token."
    kit = tmp_path / 'kit'
    shutil.copytree(tiny_kit('qwen2_5_vl'), kit)
    tok = AutoTokenizer.from_pretrained(kit)
    assert tok.add_tokens([token]) == 1
    tok.save_pretrained(kit)
    return kit, token


def test_convert_and_validate_with_model_refuse_its_added_tokens(vlmlab_bin, tmp_path):
    from vlmlab.data import make_shapes
    kit, token = _kit_with_added_token(tmp_path)
    make_shapes(tmp_path / 'raw', 3, 0, 0.0, 0.0)
    first = sorted((tmp_path / 'raw').glob('*.json'))[0]
    raw = json.loads(first.read_text()); raw['objects'][0]['desc'] = f"red {token} square"; first.write_text(json.dumps(raw))
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'ds'), '--model', str(kit), '--quiet')
    assert r.returncode == 0, r.stderr
    rejects = [json.loads(l) for l in (tmp_path / 'ds' / 'train.rejects.jsonl').read_text().splitlines()]
    assert [x['id'] for x in rejects] == [first.stem] and token in rejects[0]['reason'], rejects
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'plain'), '--family', 'qwen2_5_vl', '--quiet')
    assert r.returncode == 0 and not (tmp_path / 'plain' / 'train.rejects.jsonl').read_text().strip()   # without --model: accepted
    assert run(vlmlab_bin, 'validate', '--data', str(tmp_path / 'plain'), '--quiet').returncode == 0
    r = run(vlmlab_bin, 'validate', '--data', str(tmp_path / 'plain'), '--model', str(kit), '--quiet')
    assert r.returncode == 1 and token in r.stdout, r.stdout + r.stderr


def test_convert_while_another_holds_the_lock_is_one_line_exit_2(vlmlab_bin, tmp_path):
    from vlmlab.commit import output_lock
    raw, out = _raw(tmp_path, 2), tmp_path / 'ds'
    out.mkdir()
    with output_lock(out, 'holder-run'):
        r = run(vlmlab_bin, 'convert', str(raw), '--out', str(out), '--quiet')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'is being converted by' in r.stderr and 'holder-run' in r.stderr and not (out / 'train.jsonl').exists(), r.stderr
    assert run(vlmlab_bin, 'convert', str(raw), '--out', str(out), '--quiet').returncode == 0   # released: converts


def test_convert_with_no_inputs_leaves_the_split_alone(vlmlab_bin, tmp_path):
    raw, out = _raw(tmp_path, 2), tmp_path / 'ds'
    assert run(vlmlab_bin, 'convert', str(raw), '--out', str(out), '--quiet').returncode == 0
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    (tmp_path / 'empty').mkdir()
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'empty'), '--out', str(out), '--quiet')
    assert r.returncode == 2 and 'no annotation inputs' in r.stderr and str(tmp_path / 'empty') in r.stderr and r.stderr.count('\n') == 1
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before


def _split_with_a_near_copy(tmp_path) -> tuple[Path, str]:
    "ds_output with a train split and a test split holding a resized JPEG copy of one training image; that image's id."
    from PIL import Image
    from vlmlab.data import make_shapes
    raw, test = tmp_path / 'raw', tmp_path / 'raw_test'
    make_shapes(raw, 8, 4, 0.0, 0.0); make_shapes(test, 3, 5, 0.0, 0.0)
    src = next(p for p in sorted(raw.glob('*.json')) if json.loads(p.read_text())['image'].endswith('.png'))
    d = json.loads(src.read_text())
    im = Image.open(raw / d['image']).convert('RGB')
    im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(test / 'copy.jpg', quality=70)
    d['image'], d['objects'] = 'copy.jpg', [dict(o, bbox=[int(v * 0.8) for v in o['bbox']]) for o in d['objects']]
    (test / 'copy.json').write_text(json.dumps(d))
    return raw, src.stem


def test_validate_exits_1_on_a_near_duplicate_and_names_the_pair(vlmlab_bin, tmp_path):
    raw, source = _split_with_a_near_copy(tmp_path)
    ds = str(tmp_path / 'ds')
    assert run(vlmlab_bin, 'convert', str(raw), '--out', ds, '--quiet').returncode == 0
    assert run(vlmlab_bin, 'convert', str(tmp_path / 'raw_test'), '--out', ds, '--split', 'test', '--quiet').returncode == 0
    r = run(vlmlab_bin, 'validate', '--data', ds, '--quiet')
    leak = [l for l in r.stdout.splitlines() if 'near-duplicate image' in l]
    assert r.returncode == 1 and len(leak) == 1 and leak[0].startswith('  LEAK'), r.stdout + r.stderr
    assert 'test:copy' in leak[0] and f'train:{source}' in leak[0] and 'FAILED: 0 errors, 1 leaks' in r.stdout, r.stdout
    r = run(vlmlab_bin, 'validate', '--data', ds, '--quiet', '--allow-near-duplicates')
    assert r.returncode == 0 and '  WARN' in r.stdout and 'test:copy' in r.stdout and 'OK: 0 errors, 0 leaks, 1 warnings' in r.stdout, r.stdout
    r = run(vlmlab_bin, 'validate', '--data', ds, '--quiet', '--near-duplicate-difference', '-1')
    assert r.returncode == 2 and 'near_duplicate_difference must be >= 0' in r.stderr and r.stderr.count('\n') == 1, r.stderr


def test_convert_in_shards_then_merge_shards_equals_one_run(vlmlab_bin, tmp_path):
    from vlmlab.data import make_shapes
    make_shapes(tmp_path / 'raw', n=10, seed=2, old_format=0.3)
    assert run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'one'), '--quiet').returncode == 0
    for i in range(2):
        r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'two'), '--shard', f'{i}/2', '--quiet')
        assert r.returncode == 0 and f'vlmlab merge-shards --out {tmp_path / "two"} --split train' in r.stdout, r.stdout + r.stderr
    r = run(vlmlab_bin, 'merge-shards', '--out', str(tmp_path / 'two'), '--strict')
    assert r.returncode == 1 and 'train: 10 inputs' in r.stdout and '(balanced)' in r.stdout, r.stdout + r.stderr   # old-format files rejected
    for name in ('train.jsonl', 'train.rejects.jsonl'):
        assert (tmp_path / 'two' / name).read_bytes() == (tmp_path / 'one' / name).read_bytes(), name
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'gap'), '--shard', '1/3', '--quiet')
    assert r.returncode == 0
    r = run(vlmlab_bin, 'merge-shards', '--out', str(tmp_path / 'gap'))
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'shard(s) 0/3, 2/3 of split' in r.stderr, r.stderr
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'raw'), '--out', str(tmp_path / 'bad'), '--shard', '3/3', '--quiet')
    assert r.returncode == 2 and 'I must lie in 0..N-1' in r.stderr, r.stderr


def test_convert_a_saved_hugging_face_dataset(vlmlab_bin, tmp_path):
    datasets = pytest.importorskip('datasets')
    import io
    from PIL import Image
    def png(c):
        b = io.BytesIO(); Image.new('RGB', (80, 60), c).save(b, 'PNG'); return b.getvalue()
    datasets.Dataset.from_dict({'image': [{'bytes': png((200, 0, 0)), 'path': None}, {'bytes': png((0, 0, 200)), 'path': None}],
                                'caption': ['red', 'blue']},
                               features=datasets.Features({'image': datasets.Image(), 'caption': datasets.Value('string')})).save_to_disk(str(tmp_path / 'hf'))
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'hf'), '--out', str(tmp_path / 'ds'), '--quiet')
    assert r.returncode == 2 and "need the question they answer: pass prompt (--prompt)" in r.stderr, r.stderr
    r = run(vlmlab_bin, 'convert', str(tmp_path / 'hf'), '--out', str(tmp_path / 'ds'), '--prompt', 'What colour is it?', '--quiet')
    assert r.returncode == 0 and 'train: 2 inputs = 2 written' in r.stdout, r.stdout + r.stderr
    assert run(vlmlab_bin, 'validate', '--data', str(tmp_path / 'ds'), '--quiet').returncode == 0
