"""Conversion and training data at LLaVA-Pretrain scale: records/s and peak memory at 10k vs 100k records, each in a fresh process.

Synthetic text-only LLaVA records (one question, one answer; no images, so 100,000 of them convert in about a minute)
are converted three ways, each in a fresh child process whose own peak RSS (`VmHWM`; `ru_maxrss` would keep the forking parent's) is read at its end:

- `convert before`: `convert` of git revision `--before` (default 702c04b, the last one whose `convert` read every
  sample, and the whole LLaVA list, before converting the first; its vlmlab/data.py loaded beside today's modules);
- `convert`: today's `vlmlab.data.convert` on the same LLaVA JSON file (a chunk of samples at a time, the list parsed
  one item at a time);
- `convert parquet`: the same samples as a parquet file, through the Hugging Face source (rows streamed).

A child that imports the same modules and does nothing gives the baseline. The table shows peak - baseline, then its
growth from the small to the large size divided by the records between (bytes a record: flat memory reads near 0),
and records/s. Then the converted large split is read the way training starts: `validate` before and now, and the
records held as a list of dicts (what the trainer builds) and as `LazyRecords`, each in a fresh process, with
random-access reads/s; and the first training steps (pre-flight, the tiny model, 3 optimizer steps) on the small and
the large split, each in a fresh process: their peak memory growth per record.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--sizes 10000 100000] [--before REV]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CONVERTERS = ('convert before', 'convert', 'convert parquet')
BEFORE = '702c04b'   # the last revision that read every sample (and validated from a list of every record) first
HELD = ('validate before', 'validate', 'list of dicts', 'LazyRecords')



def own_peak_rss() -> int:
    "This process's peak resident bytes (VmHWM: reset at exec, unlike ru_maxrss, which keeps the forking parent's peak)."
    return 1024 * next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))

def write_inputs(folder: Path, n: int) -> tuple[Path, Path]:
    "`n` text-only LLaVA samples as a JSON list and as a parquet file (row groups of 1,000 rows: a reader decodes a row group whole)."
    import datasets
    turns = lambda i: [{'from': 'human', 'value': f'Tell me something about sample {i}.'},
                       {'from': 'gpt', 'value': f'Sample {i} is a synthetic text-only record used to measure conversion.'}]
    rows = [{'id': f's{i:07d}', 'conversations': turns(i)} for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'llava.json').write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(folder / 'llava.parquet'), batch_size=1000)   # row groups of 1,000 rows, not one of all
    return folder / 'llava.json', folder / 'llava.parquet'


def child(kind: str, src: str, out: str, before: str) -> dict:
    "One measured run in this (fresh) process: what it did, its seconds and its peak RSS."
    from vlmlab.data import convert, read_jsonl, validate
    from vlmlab.scale import LazyRecords
    old = _data_at(before) if kind.endswith(' before') else None
    t0, n, extra = time.perf_counter(), 0, {}
    if kind == 'convert for training':   # for the tiny model the first steps train (validate checks the resize spec)
        from vlmlab.tiny import tiny_kit
        from vlmlab.vision import ResizeSpec
        n = convert(src, out, ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False).inputs
    elif kind.startswith('convert'): n = (old.convert if old else convert)(src, out, progress=False).inputs
    elif kind.startswith('validate'):
        rep = (old.validate if old else validate)(Path(src).parent, progress=False)
        n = sum(rep.counts.values()); assert rep.ok, str(rep)[:500]
    elif kind == 'first steps':   # the trainer on the converted split: pre-flight, model, 3 optimizer steps of the tiny model
        from vlmlab.config import VLMLabConfig
        from vlmlab.trainer import build_trainer
        cfg = VLMLabConfig.from_dict({'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': False},
                                      'data': {'ds_output': str(Path(src).parent), 'target': 'conversation', 'teacher_ratio': 0.0},
                                      'stage': {'name': 'stage2', 'lrs': {'merger': 1e-4, 'llm': 1e-4, 'adapter': 1e-4, 'head': 1e-4}},
                                      'training': {'output_dir': out, 'max_steps': 3, 'per_device_batch_size': 2, 'save_steps': 1000}})
        tr = build_trainer(cfg, progress=False)
        n, extra['to_first_step_seconds'] = len(tr.train_dataset), time.perf_counter() - t0
        tr.train()
    elif kind in ('list of dicts', 'LazyRecords'):
        recs = [r for _, r, _ in read_jsonl(src)] if kind == 'list of dicts' else LazyRecords(src)
        import random
        rng, t0, n = random.Random(0), time.perf_counter(), len(recs)
        for _ in range(20_000): recs[rng.randrange(n)]['id']
        extra = {'accesses': 20_000}
    return {'records': n, 'seconds': time.perf_counter() - t0, 'peak_rss': own_peak_rss(), **extra}


def _data_at(rev: str):
    "vlmlab/data.py of git revision `rev` as a module beside today's vlmlab (as bench_convert loads it)."
    import importlib.util
    code = subprocess.run(['git', 'show', f'{rev}:vlmlab/data.py'], cwd=HERE.parent.parent, capture_output=True, text=True, check=True).stdout
    name = f"vlmlab._data_at_{''.join(c if c.isalnum() else '_' for c in rev)}"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None)); mod.__package__ = 'vlmlab'
    sys.modules[name] = mod
    exec(compile(code, f'{rev}:vlmlab/data.py', 'exec'), mod.__dict__)
    return mod


def measure(kind: str, src: Path | str, out: Path | str, before: str = BEFORE) -> dict:
    "`child` in a fresh Python process."
    r = subprocess.run([sys.executable, str(HERE), '--child', kind, str(src), str(out), before], capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f"{kind} on {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(quick: bool = False, sizes: tuple[int, int] | None = None, before: str = BEFORE) -> dict:
    "Peak memory and records/s of conversion at two sizes, and of the records held for training."
    small, large = sizes or ((2_000, 10_000) if quick else (10_000, 100_000))
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-scale-'))
    try:
        base = measure('baseline', '', '')['peak_rss']
        res: dict = {}
        for n in (small, large):
            llava, parquet = write_inputs(work / f'in{n}', n)
            for kind in CONVERTERS:
                res[kind, n] = measure(kind, parquet if kind == 'convert parquet' else llava, work / f'out-{kind.replace(" ", "-")}-{n}', before)
        split = work / f'out-convert-{large}' / 'train.jsonl'
        held = {kind: measure(kind, split, '', before) for kind in HELD}
        for n in (small, large): measure('convert for training', work / f'in{n}' / 'llava.json', work / f'tiny-{n}', before)
        steps = {n: measure('first steps', work / f'tiny-{n}' / 'train.jsonl', work / f'run-{n}', before) for n in (small, large)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = lambda b: b / 2**20
    print(f"text-only LLaVA records; peak RSS of a fresh process minus the baseline ({mib(base):.0f} MiB: the same imports, nothing done)")
    print(f"{'variant':16} {'records':>8} {'peak-base MiB':>14} {'records/s':>10}")
    out = {'baseline_rss_mib': mib(base), 'convert': {}, 'held': {}}
    for kind in CONVERTERS:
        for n in (small, large):
            r = res[kind, n]
            print(f"{kind:16} {n:8,} {mib(r['peak_rss'] - base):14.1f} {n / r['seconds']:10,.0f}")
        grow = (res[kind, large]['peak_rss'] - res[kind, small]['peak_rss']) / (large - small)
        print(f"{'':16} growth {small:,} -> {large:,}: {grow:,.0f} bytes a record")
        out['convert'][kind] = {'bytes_per_record': grow, **{f'{n}': {'peak_minus_base_mib': mib(res[kind, n]['peak_rss'] - base),
                                                                       'records_per_s': n / res[kind, n]['seconds']} for n in (small, large)}}
    print(f"\nthe converted {large:,}-record split read as training starts: validate, then the records held (20,000 random reads)")
    for kind, r in held.items():
        rate = f"{r['accesses'] / r['seconds']:10,.0f} reads/s" if 'accesses' in r else f"{r['records'] / r['seconds']:10,.0f} records/s"
        print(f"{kind:16} {r['records']:8,} {mib(r['peak_rss'] - base):14.1f} {rate}")
        out['held'][kind] = {'peak_minus_base_mib': mib(r['peak_rss'] - base), 'seconds': r['seconds']}
    print(f"\nthe first training steps on each converted split (pre-flight, tiny model, 3 optimizer steps), in a fresh process")
    for n, r in steps.items():
        print(f"{'first steps':16} {n:8,} {mib(r['peak_rss'] - base):14.1f} {n / r['to_first_step_seconds']:10,.0f} records/s to step 1")
    grow = (steps[large]['peak_rss'] - steps[small]['peak_rss']) / (large - small)
    print(f"{'':16} growth {small:,} -> {large:,}: {grow:,.0f} bytes a record")
    out['first_steps'] = {'bytes_per_record': grow, **{f'{n}': {'peak_minus_base_mib': mib(r['peak_rss'] - base),
                                                               'to_first_step_seconds': r['to_first_step_seconds']} for n, r in steps.items()}}
    per = lambda k: max(out['convert'][k]['bytes_per_record'], 1.0)
    held_mib = lambda k: max(out['held'][k]['peak_minus_base_mib'], 0.01)
    ratios = {'convert before / convert (bytes a record)': per('convert before') / per('convert'),
              'convert before / convert parquet (bytes a record)': per('convert before') / per('convert parquet'),
              'validate before / validate (peak memory)': held_mib('validate before') / held_mib('validate'),
              'list of dicts / LazyRecords (peak memory)': held_mib('list of dicts') / held_mib('LazyRecords')}
    for k, v in ratios.items(): print(f"{k}: {v:.1f}")
    return {**out, 'ratios': ratios, 'params': {'sizes': [small, large], 'before': before}}


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--child':
        kind, src, out, before = sys.argv[2:6]
        if kind == 'baseline':
            import vlmlab.data, vlmlab.scale  # noqa: F401  the imports every other child makes
            import datasets  # noqa: F401
            print(json.dumps({'peak_rss': own_peak_rss()}))
        else:
            import datasets  # noqa: F401  imported in every child, so the baseline subtracts it
            print(json.dumps(child(kind, src, out, before)))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='2,000 and 10,000 records (a smoke test)')
    ap.add_argument('--sizes', type=int, nargs=2, default=None, help='the two record counts')
    ap.add_argument('--before', default=BEFORE, help='the git revision whose convert and validate are measured as "before"')
    a = ap.parse_args()
    print(json.dumps(run(a.quick, tuple(a.sizes) if a.sizes else None, a.before)['ratios'], indent=1))
