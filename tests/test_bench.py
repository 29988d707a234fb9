"""`benchmarks/run.py --quick` as a smoke test: every benchmark runs and reports finite positive ratios, the machine is described, the table is written."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

BENCHMARKS = ('packing', 'train_packing', 'trainer', 'convert', 'loader')


@pytest.mark.slow
def test_quick_run_writes_every_benchmark(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'run.py'), '--quick', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / 'results.json').read_text())
    assert res['mode'] == 'quick'
    m = res['machine']
    assert m['cpu'] and m['cores'] >= 1 and m['torch_threads'] >= 1
    assert m['versions']['torch'] and m['versions']['transformers']
    assert set(res['benchmarks']) == set(BENCHMARKS)
    for name, b in res['benchmarks'].items():
        assert 'error' not in b, (name, b.get('error'))
        assert b['ratios'] and b['repeats'] >= 1 and b['medians'], name
        for k, v in b['ratios'].items():
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (name, k, v)
            assert b['ratio_meaning'][k], (name, k)
        for k, v in b['medians'].items(): assert math.isfinite(v) and v > 0, (name, k, v)
    md = (tmp_path / 'RESULTS.md').read_text()
    assert '| benchmark | ratio | value | per-repeat range | meaning |' in md
    for name in BENCHMARKS: assert f'| {name} |' in md
    assert m['cpu'] in md
