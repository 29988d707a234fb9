"""The prepared GPU check dry-runs its code paths on a machine without a GPU: every section runs and reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU machine run `make gpu-check` itself')
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / 'gpu.json'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'), '--out', str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'no GPU here' in r.stdout
    res = json.loads(out.read_text())
    from vlmlab.tiny import HYBRID_FAMILIES, VLM_FAMILIES
    assert res['dry_run'] and not res['errors'], res['errors']
    assert {p['family'] for p in res['packed_vs_solo']} == set(VLM_FAMILIES + HYBRID_FAMILIES)
    assert all(p['passed'] and p['max_abs_logit_diff'] <= p['tolerance'] for p in res['packed_vs_solo'])
    assert {(t['family'], t['lora']) for t in res['throughput']} >= {('qwen2_5_vl', True), ('qwen2_5_vl', False), ('qwen3_5', False)}
    for t in res['throughput']:
        assert t['tokens_per_s']['packed'] > 0 and t['tokens_per_s']['padded'] > 0 and t['peak_memory_mib']['packed'] > 0
    assert res['sync_point_cell']['ran'] is False and 'no GPU' in res['sync_point_cell']['why']
