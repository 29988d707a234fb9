"""Conversion throughput against its bound, measured side by side in one run.

The bound is bare PIL on the same images: decode, EXIF transpose, RGB, bicubic resize to the spec's
size, encode in the same format, with nothing else (no checks, no JSON, no atomic writes). vlmlab's
`convert` is timed with 1 and 2 worker processes. Ratios are what to read: absolute images/s depend on
the machine and its load.

    .venv/bin/python benchmarks/bench_convert.py [--n 200] [--repeats 3]
"""
import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from vlmlab.data import convert, make_shapes
from vlmlab.vision import ResizeSpec


def bare_pil(paths, spec, image_format):
    "The bound: decode + EXIF + RGB + resize + encode of every image, in this process."
    for p in paths:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert('RGB')
            h, w = spec.resize(im.height, im.width)
            buf = io.BytesIO()
            im.resize((w, h), Image.Resampling.BICUBIC).save(buf, format=image_format)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=200, help='number of synthetic images')
    ap.add_argument('--repeats', type=int, default=3, help='timed repeats per variant (best is kept)')
    ap.add_argument('--format', default='png', choices=['png', 'jpg'], help='stored image format')
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-'))
    try:
        make_shapes(work / 'raw', n=args.n, seed=0, old_format=0.0, size_range=(480, 1280))
        images = sorted(p for p in (work / 'raw').iterdir() if p.suffix != '.json')
        spec = ResizeSpec.for_family('qwen2_5_vl', max_pixels=401408)
        fmt = 'PNG' if args.format == 'png' else 'JPEG'
        res = {'bare PIL bound (1 process)': best_of(lambda: bare_pil(images, spec, fmt), args.repeats)}
        for w in (1, 2):
            out = work / f'out{w}'
            res[f'vlmlab convert, {w} worker{"s" if w > 1 else ""}'] = best_of(
                lambda: convert(work / 'raw', out, spec, workers=w, image_format=args.format, progress=False), args.repeats)
        bound = res['bare PIL bound (1 process)']
        print(f"{args.n} images, {args.format}, spec {spec.fingerprint} (max_pixels {spec.max_pixels}); best of {args.repeats}")
        print(f"{'variant':34} {'seconds':>8} {'images/s':>9} {'vs bound':>9}")
        for k, t in res.items(): print(f"{k:34} {t:8.2f} {args.n / t:9.1f} {bound / t:8.2f}x")
        print(json.dumps({k: round(args.n / t, 2) for k, t in res.items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
