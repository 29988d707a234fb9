import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def vlmlab_bin():
    "The `vlmlab` console script of the running environment."
    exe = Path(sys.executable).parent / 'vlmlab'
    assert exe.exists(), f'{exe} not found: install the package first (make test does)'
    return str(exe)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes tens of seconds (multi-process, subprocess training); run by make test all the same')
