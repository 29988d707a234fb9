"""Data loading beside the training loop: samples/s of the trainer's data pipeline with 2 DataLoader workers against 0.

The dataset is the one BBUTrainer trains on (`SampleDataset`: each item read from the JSONL lazily, its images
decoded, resized and processed by `ChatProcessor` in `__getitem__`), collated by `TrainingCollator` in the workers.
Variants alternate within every repeat; the ratio is the median of the per-repeat ratios.

    .venv/bin/python benchmarks/bench_loader.py [--quick] [--n 96] [--repeats 4] [--out benchmarks/results/loader.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoTokenizer

from common import alternate, machine, medians, paired_ratio, ratio_range, set_threads
from vlmlab.chat import ChatProcessor
from vlmlab.data import convert, make_shapes
from vlmlab.scale import LazyRecords
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import SampleDataset, TrainingCollator
from vlmlab.vision import ResizeSpec

FAMILY = 'qwen2_5_vl'


def run(quick: bool = False, n: int | None = None, repeats: int | None = None, batch: int = 8) -> dict:
    "Samples/s through DataLoader(num_workers=0) and DataLoader(num_workers=2) over the same dataset, alternating."
    n, repeats = n or (24 if quick else 96), repeats or (1 if quick else 4)
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-loader-'))
    try:
        kit = tiny_kit(FAMILY)
        make_shapes(work / 'raw', n=n, seed=0, old_format=0, size_range=(224, 896), max_objects=4)
        convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(kit), progress=False)
        tok, ip = AutoTokenizer.from_pretrained(kit), AutoImageProcessor.from_pretrained(kit)
        ds = SampleDataset(LazyRecords(work / 'ds' / 'train.jsonl'), ChatProcessor(tok, ip, FAMILY, work / 'ds', target='grounding'))
        collate = TrainingCollator(tok)

        def loader(workers: int) -> float:
            t0, seen = time.perf_counter(), 0
            for b in DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate):
                seen += len(b['sample_ids'])
            assert seen == len(ds)
            return seen / (time.perf_counter() - t0)

        per = alternate({'0 workers': lambda: loader(0), '2 workers': lambda: loader(2)}, repeats,
                        log=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    key = 'loader 2 workers / 0 workers samples/s'
    res = {'ratios': {key: paired_ratio(per, '2 workers', '0 workers')}, 'ratio_range': {key: ratio_range(per, '2 workers', '0 workers')},
           'ratio_meaning': {key: 'samples/s of the training data pipeline (JSONL read, images decoded, resized and processed, '
                                  'collated) with 2 DataLoader workers over the same with none (higher is better; at most the free cores)'},
           'medians': {f'{k} (samples/s)': v for k, v in medians(per).items()}, 'per_repeat': per, 'repeats': repeats,
           'params': {'samples': n, 'batch': batch, 'image_sides': [224, 896], 'family': FAMILY}}
    print(f"{key}: {res['ratios'][key]:.2f} (medians {res['medians']})")
    return res


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true'); ap.add_argument('--n', type=int); ap.add_argument('--repeats', type=int)
    ap.add_argument('--threads', type=int, default=1, help='torch threads per process')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'loader.json'))
    a = ap.parse_args()
    set_threads(a.threads)
    out = {'machine': machine(), **run(a.quick, a.n, a.repeats)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + '\n')
    print(f"wrote {a.out}")
