"""The reliability suite's table: every test marked `case` (and every cited test that ran in the session) becomes a row.

With `$VLMLAB_RELIABILITY_REPORT` set, the rows of the cases that ran are written there as JSON at the end of the
session (`make reliability-report` writes nbs/reliability_results.json, which nbs/95_reliability.ipynb renders).
Without it nothing is written, so `make test` leaves the tree as it found it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest

from reliability_kit import CITED, FUZZ_ENV, REPORT_ENV

GROUPS = {'test_bad_input': 'Bad input: conversion', 'test_faults': 'Faults', 'test_fuzz': 'Fuzz and properties',
          'test_security': 'Security'}   # table section of a module's cases, unless the case names its own


class ReliabilityTable:
    "A pytest plugin that pairs each case with its outcome; registered globally so it also sees the cited tests."
    def __init__(self):
        self.rows: dict[str, dict] = {}   # node id -> row (cited tests: several rows share one node id)
        self.cited: dict[str, list[dict]] = {}
        self.started = time.time()

    def pytest_collection_modifyitems(self, session, config, items):
        for item in items:
            marks = list(item.iter_markers('case'))
            if marks:   # a pytest.param's own mark comes after the function's: the param's wins
                m = marks[-1]
                name, expected = m.args[0], m.args[1]
                group = m.kwargs.get('group') or getattr(item.module, 'GROUP', None) or \
                        GROUPS.get(item.module.__name__.rsplit('.', 1)[-1], 'Other')
                self.rows[item.nodeid] = {'group': group, 'case': name, 'expected': expected, 'test': item.nodeid,
                                          'origin': 'suite', 'result': None, 'detail': '', 'seconds': 0.0}
            base = item.nodeid.split('[', 1)[0]
            for nodeid, group, name, expected in CITED:
                if base == nodeid:
                    self.cited.setdefault(item.nodeid, []).append(
                        {'group': group, 'case': name, 'expected': expected, 'test': item.nodeid, 'origin': 'cited',
                         'result': None, 'detail': '', 'seconds': 0.0})

    def _targets(self, nodeid: str) -> list[dict]:
        return ([self.rows[nodeid]] if nodeid in self.rows else []) + self.cited.get(nodeid, [])

    def pytest_runtest_logreport(self, report):
        for row in self._targets(report.nodeid):
            row['seconds'] = round(row['seconds'] + report.duration, 2)
            if hasattr(report, 'wasxfail'):
                row['result'] = 'xpassed' if report.passed else 'xfailed'; row['detail'] = report.wasxfail
            elif report.skipped:
                row['result'] = 'skipped'
                row['detail'] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            elif report.failed:
                row['result'] = 'failed' if report.when == 'call' else 'error'
                row['detail'] = (report.longreprtext or '').strip().splitlines()[-1][:300] if report.longreprtext else ''
            elif report.when == 'call' and row['result'] is None:
                row['result'] = 'passed'

    def pytest_sessionfinish(self, session, exitstatus):
        path = os.environ.get(REPORT_ENV)
        if not path: return
        ran = [r for r in list(self.rows.values()) + [r for rs in self.cited.values() for r in rs] if r['result'] is not None]
        counts = {k: sum(r['result'] == k for r in ran) for k in ('passed', 'failed', 'error', 'xfailed', 'xpassed', 'skipped')}
        import hypothesis, torch, transformers
        report = {'generated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  'command': ' '.join(['pytest'] + sys.argv[1:]), 'seconds': round(time.time() - self.started, 1),
                  'fuzz_examples': os.environ.get(FUZZ_ENV) or 'CI defaults',
                  'platform': f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                              f"torch {torch.__version__}, transformers {transformers.__version__}, hypothesis {hypothesis.__version__}",
                  'counts': counts, 'cases': ran}
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f'.{out.name}.tmp')
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
        os.replace(tmp, out)


def pytest_configure(config):
    config.addinivalue_line('markers', 'case(name, expected): one row of the reliability table (tests/reliability)')
    if not config.pluginmanager.has_plugin('vlmlab-reliability-table'):
        config.pluginmanager.register(ReliabilityTable(), 'vlmlab-reliability-table')


# ---- fixtures shared by the reliability tests

@pytest.fixture(scope='session')
def tiny_spec():
    "The resize spec of the tiny Qwen2.5-VL kit model (what training on it would use)."
    from vlmlab.tiny import tiny_kit
    from vlmlab.vision import ResizeSpec
    return ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl'))


@pytest.fixture(scope='session')
def tiny_ds(tmp_path_factory, tiny_spec):
    "A small converted ds_output for the tiny Qwen2.5-VL kit: (folder, records)."
    from vlmlab.data import convert, make_shapes, read_jsonl
    work = tmp_path_factory.mktemp('tiny_ds')
    make_shapes(work / 'raw', n=8, seed=11, old_format=0, exif_rotated=0, size_range=(80, 160), max_objects=3)
    s = convert(work / 'raw', work / 'ds_output', tiny_spec, progress=False)
    assert s.written == 8, str(s)
    return work / 'ds_output', [r for _, r, _ in read_jsonl(work / 'ds_output' / 'train.jsonl')]


@pytest.fixture(scope='session')
def tiny_processors():
    "Tokenizer and image processor of the tiny Qwen2.5-VL kit."
    from transformers import AutoImageProcessor, AutoTokenizer
    from vlmlab.tiny import tiny_kit
    return AutoTokenizer.from_pretrained(tiny_kit('qwen2_5_vl')), AutoImageProcessor.from_pretrained(tiny_kit('qwen2_5_vl'))


@pytest.fixture(scope='session')
def nan_gradient_run(tiny_ds, tmp_path_factory):
    "A 4-step tiny training (checkpoint every 2 steps) whose gradients turn NaN at step 3: (trainer, error, output folder, NaN parameter)."
    from vlmlab.config import VLMLabConfig
    from vlmlab.trainer import NonFiniteError, build_trainer
    root, _ = tiny_ds
    out = tmp_path_factory.mktemp('nan_run')
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': 'tiny-kit/qwen2_5_vl'}, 'data': {'ds_output': str(root)},
        'stage': {'name': 'stage2', 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}},
        'training': {'output_dir': str(out), 'max_steps': 4, 'save_steps': 2, 'per_device_batch_size': 2, 'logging_steps': 1,
                     'warmup_ratio': 0.0}})
    tr = build_trainer(cfg, progress=False)
    name, param = next((n, p) for n, p in tr.model.named_parameters() if p.requires_grad and 'merger' in n)
    param.register_hook(lambda g: g * float('nan') if tr.state.global_step >= 2 else g)
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    return tr, e.value, out, name
