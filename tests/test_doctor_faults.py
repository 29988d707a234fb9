"""Doctor checks under faults that cannot be produced for real on a test machine: quotas, full disks, hangs."""
import errno
import os
import sys
import time

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
