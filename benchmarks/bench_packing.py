"""Packing efficiency and collation throughput, measured side by side in one run.

Length mix as in a grounding run: text 20-400 tokens per sample, 0-2 images of 64-1,024 tokens each,
rows of max_tokens 4,096. Compared: vlmlab's best-fit-decreasing plan, plain padding (random batches of 8),
TRL's BFD packing (`trl.data_utils.pack_dataset`, benchmark-only dependency), and the lower bound
ceil(total / max_tokens) rows. Then collation throughput: vlmlab's PackedDataCollator (four-row mRoPE
positions, boundaries, pixel concatenation) against transformers' DataCollatorWithFlattening (text-only
flattening) on the same packs.

    .venv/bin/python benchmarks/bench_packing.py [--n 5000]
"""
import argparse
import math
import random
import time

import torch

from vlmlab.chat import ProcessedSample
from vlmlab.collators import PackedDataCollator, StandardDataCollator, packing_stats, plan_packs

IMG = 7


def length_mix(n, seed=0):
    "Per sample: (text tokens, [image token counts])."
    rng = random.Random(seed)
    return [(rng.randint(20, 400), [rng.randint(64, 1024) for _ in range(rng.randint(0, 2))]) for _ in range(n)]


def grid_for(tokens):
    "A (1, h, w) patch grid with h*w/4 close to `tokens`."
    a = max(1, int(math.sqrt(tokens)))
    b = max(1, round(tokens / a))
    return [1, 2 * a, 2 * b]


def fake_sample(k, text, images, patch_dim):
    ids, mm, grids = [], [], []
    ids += list(range(10, 10 + text // 2)); mm += [0] * (text // 2)
    for n in images:
        g = grid_for(n); grids.append(g); m = g[1] * g[2] // 4
        ids += [3] + [IMG] * m + [4]; mm += [0] + [1] * m + [0]
    ids += list(range(10, 10 + text - text // 2)); mm += [0] * (text - text // 2)
    ids = torch.tensor(ids); mm = torch.tensor(mm, dtype=torch.int32)
    kind = torch.zeros_like(mm); kind[-(text - text // 2):] = 2
    g = torch.tensor(grids) if grids else None
    pv = torch.zeros(int(g.prod(-1).sum()), patch_dim) if grids else None
    return ProcessedSample(f's{k}', ids, torch.where(kind > 0, ids, -100), mm, kind, pv, g, {}, [])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=5000, help='samples in the length mix')
    ap.add_argument('--max-tokens', type=int, default=4096, help='row capacity')
    ap.add_argument('--collate-samples', type=int, default=600, help='samples collated in the throughput test')
    args = ap.parse_args()
    mix = length_mix(args.n)
    lengths = [t + sum(n + 2 for n in imgs) for t, imgs in mix]
    total, cap = sum(lengths), args.max_tokens
    lower = math.ceil(total / cap)

    t0 = time.perf_counter(); packs = plan_packs(lengths, cap); t_plan = time.perf_counter() - t0
    ours = packing_stats(lengths, packs, cap)
    rng = random.Random(1); order = list(range(len(lengths))); rng.shuffle(order)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    pad_fraction = total / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    from datasets import Dataset
    from trl.data_utils import pack_dataset
    ds = Dataset.from_dict({'input_ids': [[1] * n for n in lengths]})
    t0 = time.perf_counter(); trl_packed = pack_dataset(ds, cap, strategy='bfd'); t_trl = time.perf_counter() - t0
    trl_rows = len(trl_packed)
    trl_tokens = sum(len(r) for r in trl_packed['input_ids'])

    print(f"{args.n} samples, {total:,} tokens, max_tokens {cap}; lower bound {lower} rows")
    print(f"{'method':38} {'rows':>6} {'rows/LB':>8} {'non-pad':>8}")
    print(f"{'lower bound ceil(total/max_tokens)':38} {lower:6d} {1:8.4f} {total / (lower * cap):8.2%}")
    print(f"{'vlmlab plan_packs (BFD)':38} {ours['rows']:6d} {ours['rows'] / lower:8.4f} {ours['non_pad_fraction']:8.2%}   plan {t_plan * 1e3:.0f} ms")
    print(f"{'TRL pack_dataset(strategy=bfd)':38} {trl_rows:6d} {trl_rows / lower:8.4f} {trl_tokens / (trl_rows * cap):8.2%}   pack {t_trl * 1e3:.0f} ms")
    print(f"{'plain padding, random batches of 8':38} {'-':>6} {'-':>8} {pad_fraction:8.2%}")
    assert trl_tokens == total

    # collation throughput on the same packs
    from transformers import DataCollatorWithFlattening
    samples = [fake_sample(k, *mix[k], patch_dim=1176) for k in range(args.collate_samples)]
    tokens_only = [fake_sample(k, *mix[k], patch_dim=1) for k in range(args.collate_samples)]
    sub = plan_packs([len(s) for s in samples], cap)
    flat = DataCollatorWithFlattening(return_position_ids=True)
    feats = [{'input_ids': s.input_ids.tolist(), 'labels': s.labels.tolist()} for s in samples]
    packed, standard = PackedDataCollator(0, cap), StandardDataCollator(0)
    res = {}
    for name, fn in [('vlmlab PackedDataCollator', lambda p: packed([samples[i] for i in p])),
                     ('vlmlab StandardDataCollator', lambda p: standard([samples[i] for i in p])),
                     ('vlmlab Packed, 1-dim pixels (tokens only)', lambda p: packed([tokens_only[i] for i in p])),
                     ('transformers DataCollatorWithFlattening', lambda p: flat([feats[i] for i in p]))]:
        best = float('inf')
        for _ in range(3):
            t0 = time.perf_counter()
            for p in sub: fn(p)
            best = min(best, time.perf_counter() - t0)
        res[name] = args.collate_samples / best
    ref = res['transformers DataCollatorWithFlattening']
    print(f"\ncollation of {args.collate_samples} samples in {len(sub)} packs (best of 3)")
    print(f"{'collator':40} {'samples/s':>10} {'vs flattening':>14}")
    for k, v in res.items(): print(f"{k:40} {v:10.0f} {v / ref:13.2f}x")
    print("(DataCollatorWithFlattening does text only: no mRoPE positions, no pixel concatenation, no checks;\n"
          " the first two rows copy 1176-dim patch rows of every image, which dominates their time)")


if __name__ == '__main__':
    main()
