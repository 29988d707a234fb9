"""Doctor checks under faults that cannot be produced for real on a test machine: quotas, full disks, hangs."""
import errno
import os
import sys
import time
from pathlib import Path

import pytest

from vlmlab import doctor


@pytest.mark.parametrize('code,name', [(errno.EDQUOT, 'EDQUOT'), (errno.ENOSPC, 'ENOSPC'), (errno.EROFS, 'EROFS')])
def test_write_errors_are_named_with_an_alternative(tmp_path, monkeypatch, code, name):
    target = tmp_path / 'quota'
    real_fdopen = os.fdopen

    def failing_fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        if str(target) in os.readlink(f'/proc/self/fd/{fd}'):
            f.close()
            raise OSError(code, os.strerror(code))
        return f

    monkeypatch.setattr(doctor.os, 'fdopen', failing_fdopen)
    c = doctor.check_writable(target)
    assert not c.ok and name in c.detail
    assert c.data['alternative'] and 'instead' in c.fix
    assert not list(target.glob('.vlmlab-doctor-*')), 'the probe file must not be left behind'


def test_low_free_space_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.shutil, 'disk_usage', lambda p: type('U', (), {'free': 10 * 2**20})())
    c = doctor.check_writable(tmp_path, min_free_gib=1.0)
    assert not c.ok and '0.0 GiB free' in c.detail


def test_hanging_import_is_killed_quickly():
    t0 = time.time()
    c = doctor.check_torch(timeout=2, code='import time; time.sleep(600)')
    assert not c.ok and 'did not finish within 2 s' in c.detail
    assert time.time() - t0 < 15


def test_probe_without_marker_fails():
    c = doctor.check_torch(code='print("hello")')
    assert not c.ok and 'failed' in c.detail


def test_model_check_is_skipped_when_torch_does_not_import(tmp_path, monkeypatch):
    "The model check imports torch in-process: after a hung probe it must not run (it would hang the doctor)."
    monkeypatch.setattr(doctor, 'check_torch', lambda timeout: doctor.Check('torch import', False, 'hung'))
    monkeypatch.setattr(doctor, 'check_model', lambda name: pytest.fail('check_model ran although torch does not import'))
    checks = doctor.run_doctor(tmp_path / 'runs', tmp_path / 'cache', model='tiny-kit/qwen2_vl')
    assert checks[-1].name == 'model tokens' and not checks[-1].ok and 'not checked' in checks[-1].detail


@pytest.mark.parametrize('name', ['./runs/x', 'runs/x', '/abs/nowhere', '~/nowhere', 'owner/name/extra'])
def test_path_like_model_names_never_reach_the_hub(tmp_path, monkeypatch, name):
    "Checked with the Hub allowed: a lookup of a missing folder as a repo id would take a minute of retries, or fail differently."
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    (tmp_path / 'runs').mkdir()
    t0 = time.time()
    c = doctor.check_model(name)
    assert not c.ok and 'no such model folder' in c.detail and time.time() - t0 < 10


def test_kit_names_pass():
    c = doctor.check_model('tiny-kit/qwen2_vl')
    assert c.ok and c.data['model_type'] == 'qwen2_vl'
