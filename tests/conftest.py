import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def ds(tmp_path_factory):
    "16 synthetic shapes images converted for the tiny Qwen2.5-VL (a module's own `ds` fixture replaces it)."
    from vlmlab.data import convert, make_shapes
    from vlmlab.tiny import tiny_kit
    from vlmlab.vision import ResizeSpec
    work = tmp_path_factory.mktemp('shapes')
    make_shapes(work / 'raw', n=16, seed=3, old_format=0, size_range=(112, 200), max_objects=3)
    convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False)
    return work / 'ds'


@pytest.fixture(scope='session')
def vlmlab_bin():
    "The `vlmlab` console script of the running environment."
    exe = Path(sys.executable).parent / 'vlmlab'
    assert exe.exists(), f'{exe} not found: install the package first (make test does)'
    return str(exe)


def pytest_configure(config):
    # a background job of a non-interactive shell, and every pytest-xdist worker, starts with SIGINT ignored, and the
    # commands the tests start would inherit that: Ctrl-C tests need the default handler, as in a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line('markers', 'slow: takes tens of seconds (multi-process, subprocess training); run by make test all the same')
