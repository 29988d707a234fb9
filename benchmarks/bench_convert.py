"""Conversion throughput against its bound, measured side by side in one run.

The bound is bare PIL on the same images: decode, EXIF transpose, RGB, bicubic resize to the spec's
size, encode in the same format, with nothing else (no checks, no JSON, no atomic writes). vlmlab's
`convert` is timed with 1 and 2 worker processes. With `--before REV`, the `convert` of git revision REV (its
vlmlab/data.py, loaded beside today's modules) runs in the same alternation, so the cost of a change (the lock, the
manifest hashing, the text and header checks, per-task futures) reads as one paired ratio: after / before. The
variants alternate within every repeat; the ratios (median of the per-repeat ratios) are what to read: absolute
images/s depend on the machine and its load.

    .venv/bin/python benchmarks/bench_convert.py [--quick] [--n 48] [--repeats 5] [--format png] [--threads 1] [--before REV]
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from common import alternate, medians, paired_ratio, ratio_range, set_threads, timed
from vlmlab.data import convert, make_shapes
from vlmlab.vision import ResizeSpec

BOUND = 'bare PIL bound (1 process)'


def bare_pil(paths: list[Path], spec: ResizeSpec, image_format: str) -> None:
    "The bound: decode + EXIF + RGB + resize + encode of every image, in this process."
    for p in paths:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert('RGB')
            h, w = spec.resize(im.height, im.width)
            buf = io.BytesIO()
            im.resize((w, h), Image.Resampling.BICUBIC).save(buf, format=image_format)


def convert_at(rev: str):
    "`convert` of vlmlab/data.py at git revision `rev`, loaded as a module beside today's vlmlab (its relative imports)."
    repo = Path(__file__).resolve().parent.parent
    code = subprocess.run(['git', 'show', f'{rev}:vlmlab/data.py'], cwd=repo, capture_output=True, text=True, check=True).stdout
    name = f"vlmlab._data_at_{''.join(c if c.isalnum() else '_' for c in rev)}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec); mod.__package__ = 'vlmlab'
    sys.modules[name] = mod   # worker processes fork: they find it here
    exec(compile(code, f'{rev}:vlmlab/data.py', 'exec'), mod.__dict__)
    return mod.convert


def run(quick: bool = False, n: int | None = None, repeats: int | None = None, image_format: str = 'png',
        before: str | None = None) -> dict:
    "Images/s of bare PIL and of `convert` with 1 and 2 workers (and of revision `before`'s), alternating; ratios."
    n = n or (12 if quick else 48)
    repeats = repeats or (3 if quick else 5)
    sizes = (240, 480) if quick else (480, 1280)
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-'))
    try:
        make_shapes(work / 'raw', n=n, seed=0, old_format=0.0, size_range=sizes)
        images = sorted(p for p in (work / 'raw').iterdir() if p.suffix != '.json')
        spec = ResizeSpec.for_family('qwen2_5_vl', max_pixels=401408)
        fmt = 'PNG' if image_format == 'png' else 'JPEG'
        variants = {BOUND: timed(lambda: bare_pil(images, spec, fmt))}
        for w in (1, 2):
            variants[f'vlmlab convert, {w} worker{"s" if w > 1 else ""}'] = timed(
                lambda w=w: convert(work / 'raw', work / f'out{w}', spec, workers=w, image_format=image_format, progress=False))
        if before:
            old = convert_at(before)
            for w in (1, 2):
                variants[f'convert at {before}, {w} worker{"s" if w > 1 else ""}'] = timed(
                    lambda w=w: old(work / 'raw', work / f'old{w}', spec, workers=w, image_format=image_format, progress=False))
        secs = alternate(variants, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ips = {k: [n / t for t in v] for k, v in secs.items()}
    med = medians(ips)
    name = lambda k: k.replace('vlmlab convert, ', 'convert ') + ' / bare PIL'
    ratios = {name(k): paired_ratio(ips, k, BOUND) for k in ips if k != BOUND}
    if before:
        for w in ('1 worker', '2 workers'):
            ratios[f'convert {w} / convert at {before}'] = paired_ratio(ips, f'vlmlab convert, {w}', f'convert at {before}, {w}')
    print(f"{n} images {sizes[0]}-{sizes[1]} px, {image_format}, spec {spec.fingerprint} (max_pixels {spec.max_pixels}); "
          f"median of {repeats} alternating repeats")
    print(f"{'variant':34} {'images/s':>9} {'vs bound':>9}")
    for k in ips: print(f"{k:34} {med[k]:9.1f} {(paired_ratio(ips, k, BOUND) if k != BOUND else 1.0):8.2f}x")
    return {'ratios': ratios, 'ratio_range': {name(k): ratio_range(ips, k, BOUND) for k in ips if k != BOUND},
            'ratio_meaning': {k: 'images/s of convert over images/s of bare PIL on the same images (higher is better; 1 worker '
                                 'cannot pass 1.0, it does the same work plus checks, JSON and atomic writes)' for k in ratios},
            'medians': {f'{k} (images/s)': v for k, v in med.items()}, 'per_repeat': ips, 'repeats': repeats,
            'params': {'images': n, 'size_range': list(sizes), 'format': image_format, 'max_pixels': spec.max_pixels,
                       'before': before}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes (a smoke test)')
    ap.add_argument('--n', type=int, default=None, help='number of synthetic images')
    ap.add_argument('--repeats', type=int, default=None, help='alternating repeats (the median is kept)')
    ap.add_argument('--format', default='png', choices=['png', 'jpg'], help='stored image format')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    ap.add_argument('--before', default=None, help='a git revision whose convert runs side by side (after / before ratios)')
    a = ap.parse_args()
    set_threads(a.threads)
    print(json.dumps(run(a.quick, a.n, a.repeats, a.format, a.before)['ratios'], indent=1))
