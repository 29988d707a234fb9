"""Packing efficiency and collation throughput, measured side by side in one run.

Length mix as in a grounding run: text 20-400 tokens per sample, 0-2 images of 64-1,024 tokens each,
rows of max_tokens 4,096. Compared: vlmlab's best-fit-decreasing plan, plain padding (random batches of 8),
TRL's BFD packing (`trl.data_utils.pack_dataset`, benchmark-only dependency), and the lower bound
ceil(total / max_tokens) rows. Then collation throughput: vlmlab's PackedDataCollator (four-row mRoPE
positions, boundaries, pixel concatenation) against transformers' DataCollatorWithFlattening (text-only
flattening) on the same packs.

The collators alternate within every repeat; the ratios are medians of the per-repeat ratios.

    .venv/bin/python benchmarks/bench_packing.py [--quick] [--n 5000] [--collate-samples 200] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from common import alternate, medians, paired_ratio, ratio_range, set_threads, timed
from vlmlab.chat import ProcessedSample
from vlmlab.collators import PackedDataCollator, StandardDataCollator, packing_stats, plan_packs
from vlmlab.trainer import with_positions

IMG = 7


def length_mix(n: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    "Per sample: (text tokens, [image token counts])."
    rng = random.Random(seed)
    return [(rng.randint(20, 400), [rng.randint(64, 1024) for _ in range(rng.randint(0, 2))]) for _ in range(n)]


def grid_for(tokens: int) -> list[int]:
    "A (1, h, w) patch grid with h*w/4 close to `tokens`."
    a = max(1, int(math.sqrt(tokens)))
    b = max(1, round(tokens / a))
    return [1, 2 * a, 2 * b]


def fake_sample(k: int, text: int, images: list[int], patch_dim: int) -> ProcessedSample:
    "A processed sample with `text` text tokens and the given image token counts (zero pixels)."
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


FLAT = 'transformers DataCollatorWithFlattening'


def trl_bfd(lengths: list[int], cap: int) -> dict | None:
    "Rows, tokens and time of TRL's BFD packing of these lengths; None when trl is not installed (`make bench` installs it)."
    try:
        from datasets import Dataset, disable_progress_bars
        from trl.data_utils import pack_dataset
    except ImportError: return None
    disable_progress_bars()
    ds = Dataset.from_dict({'input_ids': [[1] * k for k in lengths]})
    t0 = time.perf_counter(); packed = pack_dataset(ds, cap, strategy='bfd'); ms = (time.perf_counter() - t0) * 1e3
    tokens = sum(len(r) for r in packed['input_ids'])
    assert tokens == sum(lengths)
    return {'rows': len(packed), 'non_pad_fraction': tokens / (len(packed) * cap), 'ms': ms}


def run(quick: bool = False, n: int | None = None, max_tokens: int = 4096, collate_samples: int | None = None,
        repeats: int | None = None) -> dict:
    "Rows against the lower bound for vlmlab, TRL BFD and padding; collation samples/s against DataCollatorWithFlattening."
    n = n or (500 if quick else 5000)
    collate_samples = collate_samples or (24 if quick else 200)
    repeats = repeats or (2 if quick else 5)
    mix = length_mix(n)
    lengths = [t + sum(k + 2 for k in imgs) for t, imgs in mix]
    total, cap = sum(lengths), max_tokens
    lower = math.ceil(total / cap)

    t0 = time.perf_counter(); packs = plan_packs(lengths, cap); t_plan = time.perf_counter() - t0
    ours = packing_stats(lengths, packs, cap)
    rng = random.Random(1); order = list(range(len(lengths))); rng.shuffle(order)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    pad_fraction = total / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    trl = trl_bfd(lengths, cap)

    print(f"{n} samples, {total:,} tokens, max_tokens {cap}; lower bound {lower} rows")
    print(f"{'method':38} {'rows':>6} {'rows/LB':>8} {'non-pad':>8}")
    print(f"{'lower bound ceil(total/max_tokens)':38} {lower:6d} {1:8.4f} {total / (lower * cap):8.2%}")
    print(f"{'vlmlab plan_packs (BFD)':38} {ours['rows']:6d} {ours['rows'] / lower:8.4f} {ours['non_pad_fraction']:8.2%}   plan {t_plan * 1e3:.0f} ms")
    if trl: print(f"{'TRL pack_dataset(strategy=bfd)':38} {trl['rows']:6d} {trl['rows'] / lower:8.4f} {trl['non_pad_fraction']:8.2%}   pack {trl['ms']:.0f} ms")
    else: print('TRL pack_dataset: trl is not installed (make bench installs it); no TRL comparison')
    print(f"{'plain padding, random batches of 8':38} {'-':>6} {'-':>8} {pad_fraction:8.2%}")

    # collation throughput on the same packs
    from transformers import DataCollatorWithFlattening
    samples = [fake_sample(k, *mix[k], patch_dim=1176) for k in range(collate_samples)]
    tokens_only = [fake_sample(k, *mix[k], patch_dim=1) for k in range(collate_samples)]
    sub = plan_packs([len(s) for s in samples], cap)
    flat = DataCollatorWithFlattening(return_position_ids=True)
    feats = [{'input_ids': s.input_ids.tolist(), 'labels': s.labels.tolist()} for s in samples]
    packed, standard = PackedDataCollator(0, cap), StandardDataCollator(0)
    # the trainer's Dataset computes each sample's mRoPE positions (`with_positions`, in the DataLoader workers), as a
    # tokenized dataset holds its input_ids before DataCollatorWithFlattening sees them; the last row computes them here
    for s in samples + tokens_only: with_positions(s)
    cold = [fake_sample(k, *mix[k], patch_dim=1) for k in range(collate_samples)]
    def fresh(group):   # positions computed in the collator, once per epoch: drop what an earlier repeat computed
        for s in group: s.__dict__.pop('_mrope', None)
        return group
    fns = {'vlmlab PackedDataCollator': lambda p: packed([samples[i] for i in p]),
           'vlmlab StandardDataCollator': lambda p: standard([samples[i] for i in p]),
           'vlmlab Packed, 1-dim pixels (tokens only)': lambda p: packed([tokens_only[i] for i in p]),
           'vlmlab Packed, tokens only, positions in the collator': lambda p: packed(fresh([cold[i] for i in p])),
           FLAT: lambda p: flat([feats[i] for i in p])}
    secs = alternate({k: timed(lambda fn=fn: [fn(p) for p in sub]) for k, fn in fns.items()}, repeats)
    sps = {k: [collate_samples / t for t in v] for k, v in secs.items()}
    med = medians(sps)
    print(f"\ncollation of {collate_samples} samples in {len(sub)} packs (median of {repeats} alternating repeats)")
    print(f"{'collator':42} {'samples/s':>10} {'vs flattening':>14}")
    for k in sps: print(f"{k:42} {med[k]:10.0f} {paired_ratio(sps, k, FLAT):13.2f}x")
    print("(DataCollatorWithFlattening does text only: no mRoPE positions, no pixel concatenation, no checks;\n"
          " the first two rows copy 1176-dim patch rows of every image, which dominates their time)")

    ratios = {'vlmlab rows / lower bound': ours['rows'] / lower,
              **({'TRL BFD rows / lower bound': trl['rows'] / lower, 'vlmlab rows / TRL BFD rows': ours['rows'] / trl['rows']} if trl else {}),
              'vlmlab packed non-pad / padded non-pad': ours['non_pad_fraction'] / pad_fraction}
    ratios.update({f'{k} / DataCollatorWithFlattening': paired_ratio(sps, k, FLAT) for k in sps if k != FLAT})
    meaning = {'vlmlab rows / lower bound': 'rows used by vlmlab plan_packs over ceil(total tokens / max_tokens) (1.0 is optimal)',
               'TRL BFD rows / lower bound': 'rows used by trl pack_dataset(strategy=bfd) over the lower bound (1.0 is optimal)',
               'vlmlab rows / TRL BFD rows': 'rows of vlmlab over rows of TRL BFD on the same lengths (<= 1.0: no worse)',
               'vlmlab packed non-pad / padded non-pad': 'fraction of real tokens in packed rows over that in padded random '
                                                         'batches of 8 (compute saved by packing)'}
    meaning.update({f'{k} / DataCollatorWithFlattening': 'collation samples/s over transformers DataCollatorWithFlattening '
                    '(text-only flattening) on the same packs (higher is faster)' for k in sps if k != FLAT})
    return {'ratios': ratios, 'ratio_meaning': {k: v for k, v in meaning.items() if k in ratios},
            'ratio_range': {f'{k} / DataCollatorWithFlattening': ratio_range(sps, k, FLAT) for k in sps if k != FLAT},
            'medians': {f'{k} (samples/s)': v for k, v in med.items()}, 'per_repeat': sps, 'repeats': repeats,
            'packing': {'samples': n, 'tokens': total, 'max_tokens': cap, 'lower_bound_rows': lower, 'vlmlab_rows': ours['rows'],
                        'vlmlab_non_pad_fraction': ours['non_pad_fraction'], 'padded_non_pad_fraction': pad_fraction,
                        'vlmlab_plan_ms': t_plan * 1e3, 'trl_bfd': trl},
            **({} if trl else {'note': 'trl is not installed: no TRL BFD comparison (make bench installs trl)'}),
            'params': {'samples': n, 'max_tokens': cap, 'collate_samples': collate_samples, 'collate_packs': len(sub)}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes (a smoke test)')
    ap.add_argument('--n', type=int, default=None, help='samples in the length mix')
    ap.add_argument('--max-tokens', type=int, default=4096, help='row capacity')
    ap.add_argument('--collate-samples', type=int, default=None, help='samples collated in the throughput test')
    ap.add_argument('--repeats', type=int, default=None, help='alternating repeats of the collation test (the median is kept)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    a = ap.parse_args()
    set_threads(a.threads)
    print(json.dumps(run(a.quick, a.n, a.max_tokens, a.collate_samples, a.repeats)['ratios'], indent=1))
