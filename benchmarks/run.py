"""Run every benchmark and write results.json plus RESULTS.md (a short markdown table) with the machine described.

Every ratio compares variants measured side by side in this one run: the variants alternate within every repeat (ABBA
order) and a ratio is the median of its per-repeat ratios. Absolute numbers depend on the machine and its load; read
the ratios.

    .venv/bin/python benchmarks/run.py [--quick] [--out DIR] [--only NAME ...] [--threads 1]

`--quick` runs small sizes (a smoke test, well under a minute of compute; its numbers are not results); the default
full mode takes a few minutes on 2 CPU cores. `--out` is the folder for results.json and RESULTS.md (default: this
folder, benchmarks/).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {'packing': ('bench_packing', 'packing efficiency and collation throughput vs padding / TRL BFD / '
                                           'DataCollatorWithFlattening / the lower bound'),
              'train_packing': ('bench_train_packing', 'training tokens/s and peak memory, packed vs padded: tiny, mid_512x4, hybrid Qwen3.5'),
              'trainer': ('bench_trainer', 'BBUTrainer overhead vs a plain transformers Trainer'),
              'convert': ('bench_convert', 'conversion throughput vs bare PIL'),
              'loader': ('bench_loader', 'the training data pipeline in 2 DataLoader workers vs in the training process')}
NOT_RUN = ('bench_detection.py (held-out detection quality against trivial baselines, not a speed ratio; 1,500 training steps '
           'through BBUTrainer) runs on its own and writes results/detection.json with its own training time; gpu_check.py '
           '(`make gpu-check`) needs a GPU and writes results/gpu.json.')


def run_all(quick: bool, only: list[str] | None = None, threads: int | None = 1) -> dict:
    "Every benchmark's `run(quick)` in one process; a failing benchmark is recorded with its error and the rest still run."
    if str(HERE) not in sys.path: sys.path.insert(0, str(HERE))
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false'); os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from common import describe, machine, set_threads
    set_threads(threads)
    m = machine()
    print(f"machine: {describe(m)}\nmode: {'quick (smoke test sizes)' if quick else 'full'}", flush=True)
    out = {'machine': m, 'mode': 'quick' if quick else 'full', 'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
           'method': 'variants alternate within every repeat (ABBA order); a ratio is the median of its per-repeat ratios; '
                     'medians are over the repeats', 'not_run': NOT_RUN, 'benchmarks': {}}
    t_all = time.perf_counter()
    for name, (module, what) in BENCHMARKS.items():
        if only and name not in only: continue
        print(f"\n=== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        try: res = importlib.import_module(module).run(quick=quick)
        except Exception as e:
            traceback.print_exc()
            res = {'error': f"{type(e).__name__}: {e}"}
        out['benchmarks'][name] = {'what': what, **res, 'seconds': round(time.perf_counter() - t0, 1),
                                   'measured': {'at': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'commit': m['git_commit'],
                                                'load_average_1m_at_end': round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None}}
    out['total_seconds'] = round(time.perf_counter() - t_all, 1)
    out['machine']['load_average_1m_at_end'] = round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None
    return out


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"


def markdown(res: dict) -> str:
    "RESULTS.md: the machine, one table of ratios, one table of medians."
    from common import describe
    m = res['machine']
    lines = [f"# Benchmark results ({res['mode']} run)", '',
             f"`python benchmarks/run.py{' --quick' if res['mode'] == 'quick' else ''}` on {res['started'][:10]}, commit "
             f"{m['git_commit'] or '?'}, {res['total_seconds']:.0f} s in all. Machine: {describe(m)}; 1-minute load average "
             f"{m['load_average_1m_at_start']} at the start, {m['load_average_1m_at_end']} at the end (the machine is shared).", '',
             f"Method: {res['method']}. Absolute numbers depend on the machine and its load; the ratios are what to read. "
             "Full numbers, per-repeat values and parameters: `results.json`.", '',
             '| benchmark | ratio | value | per-repeat range | meaning |', '| --- | --- | --- | --- | --- |']
    if res.get('partial_run'):
        lines[2] += (f" This run measured {', '.join(res['partial_run'])}; the other rows are from their own last run: " + '; '.join(
            f"{n} on {b['measured']['at'][:16]} at commit {b['measured']['commit']} (load {b['measured']['load_average_1m_at_end']} at its end)"
            for n, b in res['benchmarks'].items() if n not in res['partial_run'] and b.get('measured')) + '.')
    for name, b in res['benchmarks'].items():
        if 'error' in b:
            lines.append(f"| {name} | FAILED | - | - | {b['error']} |"); continue
        for k, v in b['ratios'].items():
            lo_hi = b.get('ratio_range', {}).get(k)
            spread = f"{_fmt(lo_hi[0])} - {_fmt(lo_hi[1])}" if lo_hi else 'exact'
            lines.append(f"| {name} | {k} | {_fmt(v)} | {spread} | {b['ratio_meaning'].get(k, '')} |")
    reps = ', '.join(f"{n} {b.get('repeats', '-')}" for n, b in res['benchmarks'].items())
    lines += ['', f"Medians over the repeats (repeats: {reps}):", '',
              '| benchmark | measurement | median |', '| --- | --- | --- |']
    for name, b in res['benchmarks'].items():
        for k, v in b.get('medians', {}).items(): lines.append(f"| {name} | {k} | {_fmt(v)} |")
    notes = [b['note'] for b in res['benchmarks'].values() if b.get('note')]
    lines += [''] + [f"- {n}" for n in notes] + [f"- Not run here: {res['not_run']}", '']
    return '\n'.join(lines)


def bad_ratios(res: dict) -> list[str]:
    "Benchmarks that failed or gave a ratio that is not a finite positive number."
    bad = []
    for name, b in res['benchmarks'].items():
        if 'error' in b: bad.append(f"{name}: {b['error']}"); continue
        bad += [f"{name}: {k} = {v}" for k, v in b['ratios'].items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    return bad


def main(argv: list[str] | None = None) -> int:
    "Run, write results.json and RESULTS.md, print the ratio table; exit 1 when a benchmark failed."
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes: a smoke test, not results')
    ap.add_argument('--out', default=str(HERE), help='folder for results.json and RESULTS.md (default: benchmarks/)')
    ap.add_argument('--only', nargs='+', choices=list(BENCHMARKS), help='run only these benchmarks')
    ap.add_argument('--threads', type=int, default=1,
                    help='torch threads (default 1: on a shared machine, more threads than free cores makes timings erratic; 0: torch default)')
    a = ap.parse_args(argv)
    res = run_all(a.quick, a.only, a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.only and (out / 'results.json').is_file():   # the other benchmarks keep their last run (each entry says when and where it ran)
        old = json.loads((out / 'results.json').read_text())
        if old.get('mode') == res['mode']:
            res['benchmarks'] = {n: res['benchmarks'].get(n) or old['benchmarks'][n] for n in BENCHMARKS if n in res['benchmarks'] or n in old.get('benchmarks', {})}
            res['partial_run'] = sorted(a.only)
    (out / 'results.json').write_text(json.dumps(res, indent=1) + '\n')
    md = markdown(res)
    (out / 'RESULTS.md').write_text(md)
    print('\n' + md)
    print(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} ({res['total_seconds']:.0f} s)")
    bad = bad_ratios(res)
    if bad: print('FAILED:\n' + '\n'.join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
