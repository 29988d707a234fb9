"""Faults: conversion SIGKILLed at chosen points of its writes, NaN gradients, unwritable and full output folders, and one of
two torchrun processes killed. Training kill/resume is tests/test_trainer.py's (cited in the table, not re-run here)."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from reliability_kit import case, raw_sample
from vlmlab.data import convert, make_shapes, validate
from vlmlab.vision import ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)
FAULT_SEED = int(os.environ.get('VLMLAB_FAULT_SEED', '0'))   # the kill points are drawn from this seed (printed on failure)

# Runs `convert` in a fresh process and SIGKILLs the process group at the k-th atomic write: before it starts ('start'),
# with half of the temporary file written ('half'), or with the temporary file complete but not yet renamed ('rename').
KILLER = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import vlmlab.data as data
    from vlmlab.vision import ResizeSpec
    src, out, k, mode, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    real, calls = data.write_atomic, [0]
    def die(): os.killpg(os.getpgid(0), signal.SIGKILL)
    def write_atomic(path, payload):
        calls[0] += 1
        if calls[0] == k:
            path = Path(path)
            if mode == 'start': die()
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            if mode == 'half':
                with open(tmp, 'wb') as f: f.write(payload[: len(payload) // 2]); f.flush(); os.fsync(f.fileno())
                die()
            if mode == 'rename':
                with open(tmp, 'wb') as f: f.write(payload); f.flush(); os.fsync(f.fileno())
                die()
        real(path, payload)
    data.write_atomic = write_atomic
    data.convert(src, out, ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704), workers=workers, progress=False)
''')


def _visible_state(out: Path) -> dict:
    "What a reader of `out` can see: the non-hidden files and their bytes."
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob('*') if p.is_file() and not p.name.startswith('.')}


@pytest.mark.slow
@case('conversion SIGKILLed at random write points (start, half-written, before rename; also with 2 workers)',
      'every visible file equals the uninterrupted run\'s; the re-run gives byte-identical JSONL and images, no temporary files left')
def test_conversion_killed_at_random_writes(tmp_path):
    src = tmp_path / 'raw'
    make_shapes(src, n=16, seed=4, old_format=0.2, size_range=(60, 140))
    ref = tmp_path / 'ref'
    s = convert(src, ref, SPEC, progress=False)
    expected = _visible_state(ref)
    # one write per image, then train.rejects.jsonl, train.summary.json and the manifest (train.jsonl is the spooled
    # file itself, renamed after them: a kill before the manifest's rename leaves it complete and unpublished)
    n_writes = s.written + 3
    rng = random.Random(FAULT_SEED)
    points = [(rng.randrange(1, n_writes - 2), rng.choice(['start', 'half', 'rename']), 1),   # while writing images
              (rng.randrange(2, 5), rng.choice(['half', 'rename']), 2),                          # in a pool worker (its k-th write)
              (rng.choice([n_writes - 2, n_writes - 1]), rng.choice(['start', 'half', 'rename']), 1),  # rejects / summary
              (n_writes, rng.choice(['half', 'rename']), 1)]                                     # the manifest: nothing renamed yet
    out = tmp_path / 'killed'
    for k, mode, workers in points:
        p = subprocess.run([sys.executable, '-c', KILLER, str(src), str(out), str(k), mode, str(workers)], capture_output=True,
                           text=True, start_new_session=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert p.returncode == -signal.SIGKILL, (FAULT_SEED, k, mode, p.returncode, p.stderr[-2000:])
        for rel, data in _visible_state(out).items():   # nothing visible is partial; the summary never lies about a missing file
            assert rel in expected, (FAULT_SEED, k, mode, rel)
            if rel.endswith('summary.json'):
                assert json.loads(data)['inputs'] == s.inputs and (out / 'train.jsonl').exists()
            elif rel.endswith('manifest.json'):   # run id and time differ per run; the files it names must be there
                assert json.loads(data)['split'] == 'train' and (out / 'train.jsonl').exists()
            else:
                assert data == expected[rel], (FAULT_SEED, k, mode, rel)
        assert any(f.name.startswith('.') for f in out.rglob('*.tmp-*')) or mode == 'start', (k, mode)
    final = convert(src, out, SPEC, progress=False)
    assert final.balanced and (final.written, final.rejected) == (s.written, s.rejected)
    got = _visible_state(out)
    assert got.keys() == expected.keys()
    assert all(got[k] == v for k, v in expected.items() if not k.endswith(('summary.json', 'manifest.json')))
    assert not list(out.rglob('.*.tmp-*')), 'the re-run removes the temporary files of killed runs'
    assert validate(out, SPEC, progress=False).ok


@pytest.mark.slow
@case('NaN injected into a gradient at step 3 (checkpoint at step 2)', 'NonFiniteError names step 3, the group and the parameter; '
      'checkpoint-2 stays complete and the weights equal it (no step taken on NaN)')
def test_nan_gradient_keeps_the_last_good_checkpoint(nan_gradient_run):
    import torch
    from safetensors.torch import load_file
    from vlmlab.checkpoints import TRAINER_WEIGHTS as WEIGHTS_NAME, checkpoint_complete, last_good_checkpoint
    tr, err, out, name = nan_gradient_run
    msg, ck = str(err), out / 'checkpoint-2'
    assert 'step 3: non-finite gradient norm' in msg and "'merger'" in msg and name in msg, msg
    assert f'last good step 2; last good checkpoint: {ck}' in msg, msg
    assert checkpoint_complete(ck) and last_good_checkpoint(out) == str(ck) and not (out / 'checkpoint-4').exists()
    saved = load_file(str(ck / WEIGHTS_NAME))
    now = {k: v.detach() for k, v in tr.model.state_dict().items() if k in saved}
    assert len(now) == len(saved) > 10
    assert all(torch.equal(now[k], saved[k]) and bool(torch.isfinite(saved[k]).all()) for k in saved)


@case('output folder under a regular file (cannot be created)', 'convert raises before reading any input: "output directory ...: '
      'cannot create it" naming the folder; nothing written')
def test_output_dir_cannot_be_created(tmp_path):
    raw = tmp_path / 'raw'; raw.mkdir(); raw_sample(raw, 'a')
    blocker = tmp_path / 'a_file'; blocker.write_text('x')
    with pytest.raises(OSError, match=rf"output directory {blocker / 'ds'}: cannot create it"):
        convert(raw, blocker / 'ds', SPEC, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'raw'] and blocker.read_text() == 'x'


@case('vlmlab convert into an output folder that cannot be created', 'exit status 2 and one line "vlmlab convert: output directory ...", '
      'no traceback')
def test_cli_convert_unwritable_output(tmp_path, capsys):
    from vlmlab.cli import main
    raw = tmp_path / 'raw'; raw.mkdir(); raw_sample(raw, 'a')
    blocker = tmp_path / 'a_file'; blocker.write_text('x')
    assert main(['convert', str(raw), '--out', str(blocker / 'ds'), '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.startswith('vlmlab convert: ') and f"output directory {blocker / 'ds'}: cannot create it" in err and 'Traceback' not in err


def _mount(*args: str) -> bool:
    "Run mount with `args`; False where this machine does not allow it (no root / no CAP_SYS_ADMIN)."
    try: return subprocess.run(['mount', *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError): return False


@pytest.fixture
def mountpoint(tmp_path):
    "An empty folder to mount on, unmounted (lazily) afterwards."
    mp = tmp_path / 'mnt'; mp.mkdir()
    yield mp
    subprocess.run(['umount', '-l', str(mp)], capture_output=True)


@case('read-only output folder (read-only bind mount)', 'convert raises before reading any input: "output directory ... is not '
      'writable: Read-only file system"')
def test_read_only_output_dir(tmp_path, mountpoint):
    raw = tmp_path / 'raw'; raw.mkdir(); raw_sample(raw, 'a')
    target = tmp_path / 'target'; (target / 'images' / 'train').mkdir(parents=True)
    if not (_mount('--bind', str(target), str(mountpoint)) and _mount('-o', 'remount,bind,ro', str(mountpoint))):
        pytest.skip('mount is not permitted here (needs root with CAP_SYS_ADMIN)')
    with pytest.raises(OSError, match=rf'output directory {mountpoint}: not writable \(EROFS: Read-only file system\)'):
        convert(raw, mountpoint, SPEC, progress=False)
    assert sorted(p.name for p in target.rglob('*')) == ['images', 'train']


@case('disk full during conversion (64 KiB tmpfs)', 'OSError ENOSPC naming the file being written; no half-written or temporary file, '
      'no JSONL; after space is freed a re-run matches an uninterrupted run byte for byte')
def test_disk_full_during_conversion(tmp_path, mountpoint):
    import errno
    src = tmp_path / 'raw'
    make_shapes(src, n=12, seed=6, old_format=0, size_range=(100, 160))
    if not _mount('-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(mountpoint)):
        pytest.skip('mount is not permitted here (needs root with CAP_SYS_ADMIN)')
    out = mountpoint / 'ds'
    with pytest.raises(OSError) as e:
        convert(src, out, SPEC, progress=False)
    assert e.value.errno == errno.ENOSPC and f'cannot write {out}' in str(e.value), str(e.value)
    assert not list(out.rglob('.*.tmp-*')) and not list(out.glob('*.jsonl'))
    for img in (out / 'images' / 'train').glob('*.png'): Image.open(img).load()   # every visible image is whole
    assert _mount('-o', 'remount,size=16m', str(mountpoint))
    convert(src, out, SPEC, progress=False)
    convert(src, tmp_path / 'ref', SPEC, progress=False)
    assert (out / 'train.jsonl').read_bytes() == (tmp_path / 'ref' / 'train.jsonl').read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    "Direct child processes of `pid` (from /proc)."
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid: out.append(int(stat.parent.name))
    return out


def _rank(pid: int) -> int | None:
    try: env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError: return None
    return next((int(e.split(b'=', 1)[1]) for e in env if e.startswith(b'RANK=')), None)


@pytest.mark.slow
@case('one of two torchrun training processes SIGKILLed mid-run', 'torchrun exits non-zero within 90 s naming the killed rank and '
      'signal; the other process is gone (no hang); the last complete checkpoint stays usable')
def test_torchrun_survivor_exits(tiny_ds, tmp_path, vlmlab_bin):
    from vlmlab.checkpoints import checkpoint_complete, last_good_checkpoint
    root, _ = tiny_ds
    out = tmp_path / 'run'
    cfg = {'model': {'name_or_path': 'tiny-kit/qwen2_5_vl'}, 'data': {'ds_output': str(root)},
           'stage': {'name': 'stage1', 'lrs': {'merger': 1e-3}},
           'training': {'output_dir': str(out), 'max_steps': 10_000, 'save_steps': 1, 'per_device_batch_size': 1, 'logging_steps': 50,
                        'warmup_ratio': 0.0}}
    (tmp_path / 'run.yaml').write_text(yaml.safe_dump(cfg))
    torchrun = str(Path(sys.executable).parent / 'torchrun')
    p = subprocess.Popen([torchrun, '--nproc_per_node', '2', '--master_port', str(_free_port()), vlmlab_bin, 'train', '--config',
                          str(tmp_path / 'run.yaml'), '--quiet'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        deadline = time.time() + 300
        while not checkpoint_complete(out / 'checkpoint-1'):   # both ranks are in the training loop
            assert p.poll() is None and time.time() < deadline, p.stdout.read()[-3000:] if p.poll() is not None else 'no checkpoint-1'
            time.sleep(0.2)
        workers = {_rank(c): c for c in _children(p.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        try: log = p.communicate(timeout=90)[0]
        except subprocess.TimeoutExpired: pytest.fail('torchrun still running 90 s after one of its two workers was killed (hang)')
        waited = time.time() - t0
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode != 0 and waited < 90
    assert f'Signal 9 (SIGKILL) received by PID {workers[1]}' in log or 'exitcode  : -9' in log, log[-3000:]
    assert not Path(f'/proc/{workers[0]}').exists() or 'Z' in Path(f'/proc/{workers[0]}/stat').read_text().split()[2]
    last = last_good_checkpoint(out)
    assert last is not None and checkpoint_complete(last)
