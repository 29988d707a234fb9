"""Training tokens/s with packed rows against padded batches: the tiny Qwen2.5-VL, BBUTrainer, the same samples.

Both runs train the same converted shapes samples (grounding target, images of 56-448 px so lengths vary) with
BBUTrainer from the same initial weights: padded = `SampleDataset` in batches of `batch` samples
(`TrainingCollator`, padded to the batch's longest); packed = `PackDataset` rows of capacity about `batch` mean
samples (`TrainingCollator(packed=True)`, one row per step), so that both take about the same real tokens per
optimizer step. Tokens/s counts real tokens only (no padding) from the end of the first step to the end of the last,
so it covers data processing, collation, forward, backward and optimizer step. Packed and padded runs alternate
within every repeat; the ratio is the median of the per-repeat ratios.

Models (one result key each): `tiny` (the kit's Qwen2.5-VL, hidden 32), `mid_512x4` (a random Qwen2.5-VL with a
hidden-512, 4-layer language model and the kit's vision tower), and `hybrid_qwen3_5` (the kit's Qwen3.5: Gated DeltaNet
and full-attention layers, packed through vlmlab's boundary-aware linear attention) where the kit has it. Packed rows
use vlmlab's packed attention (`vlmlab.attention`: sdpa per sample, no T x T mask); for the tiny model the old path
(sdpa through the dense block-diagonal mask) runs beside it as `packed_mask`. Peak memory is the resident set above
the run's start, sampled every 5 ms (CPU).

    .venv/bin/python benchmarks/bench_train_packing.py [--quick] [--models tiny mid_512x4] [--n 48] [--batch 8] [--epochs 2] [--repeats 4]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from common import alternate, medians, paired_ratio, ratio_range, set_threads
from vlmlab.chat import ChatProcessor
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.detection import VLMDetector
from vlmlab.hybrid import prepare_for_packing
from vlmlab.model import apply_stage
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import BBUTrainer, PackDataset, SampleDataset, TrainingCollator
from vlmlab.vision import ResizeSpec

FAMILY = 'qwen2_5_vl'
MODELS = ('tiny', 'mid_512x4', 'hybrid_qwen3_5')


def model_source(name: str):
    "(kit family, function building the random model) of a benchmark model name."
    from transformers import AutoConfig
    if name == 'tiny': return FAMILY, lambda: AutoModelForImageTextToText.from_pretrained(tiny_kit(FAMILY))
    if name == 'mid_512x4':
        def build():
            cfg = AutoConfig.from_pretrained(tiny_kit(FAMILY))
            t = cfg.text_config
            t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = 512, 1376, 4, 8, 4
            t.layer_types = ['full_attention'] * 4
            t.rope_parameters = dict(t.rope_parameters, mrope_section=[8, 12, 12])   # head_dim 64: 32 rotary pairs
            cfg.vision_config.out_hidden_size = 512
            return AutoModelForImageTextToText.from_config(cfg)
        return FAMILY, build
    if name == 'hybrid_qwen3_5':
        return 'qwen3_5', lambda: AutoModelForImageTextToText.from_pretrained(tiny_kit('qwen3_5'))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def packing_ready(vlm, mask: bool = False) -> None:
    "What vlmlab's trainer does before packed rows (`prepare_for_packing`); `mask` leaves transformers' sdpa and its block mask."
    if not mask: prepare_for_packing(vlm)


class StepEnds(TrainerCallback):
    "The wall clock at the end of every optimizer step."
    def __init__(self): self.ends: list[float] = []
    def on_step_end(self, args, state, control, **kw): self.ends.append(time.perf_counter())


class CountingCollator:
    "A TrainingCollator that records, for every batch it makes, its real tokens, its row slots and its attention cells."
    def __init__(self, collator: TrainingCollator):
        self.collator, self.batches = collator, []

    def __call__(self, items: list) -> dict:
        "Collate and count."
        b = self.collator(items)
        rows, L = b['input_ids'].shape
        real = int(b['attention_mask'].sum()) if b.get('attention_mask') is not None else int(b['cu_seqlens'][len(b['sample_ids'])])
        self.batches.append({'real': real, 'slots': rows * L, 'cells': rows * L * L})
        return b


def measure(name: str, n: int, batch: int, epochs: int, repeats: int, size_max: int, work: Path,
            kinds: list[str] | None = None, memory: bool = True) -> dict:
    "Real tokens/s and peak memory of BBUTrainer on padded batches and packed rows of one model, alternating."
    family, build = model_source(name)
    kit = tiny_kit(family)
    raw = work / f'raw-{n}-{size_max}'
    if not raw.exists(): make_shapes(raw, n=n, seed=0, old_format=0, size_range=(56, size_max), max_objects=6)
    ds = work / f'ds-{family}-{n}-{size_max}'
    if not ds.exists(): convert(raw, ds, ResizeSpec.from_pretrained(kit), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(kit), AutoImageProcessor.from_pretrained(kit)
    proc = ChatProcessor(tok, ip, family, ds, target='grounding')
    records = [r for _, r, _ in read_jsonl(ds / 'train.jsonl')]
    lengths = [len(proc(r, 0)) for r in records]
    cap = max(max(lengths), -(-batch * sum(lengths) // len(lengths) // 64) * 64)
    datasets = {'padded': SampleDataset(records, proc), 'packed': PackDataset(records, proc, lengths, cap)}
    counts: dict[str, list[dict]] = {}

    def train(kind: str) -> float:
        torch.manual_seed(0)
        model = VLMDetector(build(), None, tok, ip, family)
        packed = kind != 'padded'
        if packed: packing_ready(model.vlm, mask=kind == 'packed_mask')
        apply_stage(model, 'stage2')
        collate = CountingCollator(TrainingCollator(tok, packed=packed, max_tokens=cap if packed else None,
                                                    spatial_merge_size=ip.merge_size, seq_idx=name.startswith('hybrid')))
        args = TrainingArguments(output_dir=str(work / name / kind), num_train_epochs=epochs, per_device_train_batch_size=1 if packed else batch,
                                 learning_rate=1e-3, logging_steps=10, save_strategy='no', report_to='none',
                                 remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True, seed=0,
                                 data_seed=0)
        steps = StepEnds()
        trainer = BBUTrainer(model, args, 'stage2', {'merger': 1e-3, 'llm': 1e-3}, proc,
                             train_dataset=datasets['padded' if kind == 'padded' else 'packed'], data_collator=collate, callbacks=[steps])
        trainer.train()
        assert len(collate.batches) == len(steps.ends), (len(collate.batches), len(steps.ends))
        counts[kind] = collate.batches
        return sum(b['real'] for b in collate.batches[1:]) / (steps.ends[-1] - steps.ends[0])   # the first step warms up

    kinds = kinds or ['padded', 'packed'] + (['packed_mask'] if name == 'tiny' else [])
    per = alternate({k: (lambda k=k: train(k)) for k in kinds}, repeats, log=lambda m: print(f"  {name}{m}", flush=True))
    med = medians(per)
    shape = {k: {'steps_per_epoch': len(v) // epochs, 'real_tokens_per_step': sum(b['real'] for b in v) / len(v),
                 'non_pad_fraction': sum(b['real'] for b in v) / sum(b['slots'] for b in v)} for k, v in counts.items()}
    print(f"{name}: {n} samples of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}), {epochs} epochs; padded batches "
          f"of {batch}, packed rows of <= {cap} tokens; median of {repeats} alternating repeats")
    peak = {k: peak_rss_child(name, k, n, batch, epochs, size_max, work) for k in ('padded', 'packed')} if memory else {}
    for k in kinds:
        print(f"  {k:12} {med[k]:9.0f} real tokens/s  non-pad {shape[k]['non_pad_fraction']:6.1%}"
              + (f"  peak RSS {peak[k]:7.0f} MiB" if k in peak else ''))
    return {'family': family, 'per_repeat': per, 'medians': med, 'batches': shape, 'peak_rss_mib': peak,
            'params': {'samples': n, 'epochs': epochs, 'padded_batch': batch, 'pack_capacity': cap,
                       'sample_tokens': {'min': min(lengths), 'mean': sum(lengths) / n, 'max': max(lengths)}}}


def peak_rss_child(name: str, kind: str, n: int, batch: int, epochs: int, size_max: int, work: Path) -> float:
    "Peak resident memory (MiB) of a fresh process that trains `name` once in `kind` mode on the data already converted in `work`."
    import subprocess, sys
    r = subprocess.run([sys.executable, __file__, '--memory-child', name, kind, str(n), str(batch), str(epochs), str(size_max), str(work)],
                       capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent)
    if r.returncode: raise RuntimeError(f"memory run {name} {kind} failed: {r.stderr[-1500:]}")
    return float(r.stdout.strip().splitlines()[-1])


def _memory_child(name: str, kind: str, n: int, batch: int, epochs: int, size_max: int, work: str) -> None:
    "Train once on the parent's converted data (so conversion's memory is not counted) and print this process's peak RSS in MiB."
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    measure(name, n, batch, epochs, 1, size_max, Path(work), kinds=[kind], memory=False)
    # VmHWM: this process's own high-water mark (ru_maxrss keeps the forking parent's across exec on Linux)
    hwm = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))
    print(hwm / 1024)


def run(quick: bool = False, n: int | None = None, batch: int | None = None, epochs: int | None = None,
        repeats: int | None = None, models: tuple[str, ...] = MODELS) -> dict:
    "packed / padded real tokens/s of BBUTrainer for every model, with peak memory; the models the kit lacks are noted."
    n = n or (12 if quick else 48)
    batch = batch or (4 if quick else 8)
    epochs = epochs or (1 if quick else 2)
    repeats = repeats or (1 if quick else 4)
    size_max = 280 if quick else 336
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-'))
    ratios, ranges, meaning, per_model = {}, {}, {}, {}
    try:
        for name in (models if not quick else [m for m in models if m != 'mid_512x4']):
            res = measure(name, n, batch, epochs, repeats, size_max, work)
            per_model[name] = res
            key = f'packed / padded training tokens/s ({name})'
            ratios[key], ranges[key] = paired_ratio(res['per_repeat'], 'packed', 'padded'), ratio_range(res['per_repeat'], 'packed', 'padded')
            meaning[key] = (f"real (non-pad) tokens per second of BBUTrainer on packed rows (vlmlab packed attention"
                            f"{', boundary-aware linear attention' if name.startswith('hybrid') else ''}) over padded batches of the same "
                            f"samples, {name} model (higher is better)")
            pm = res['peak_rss_mib']
            mkey = f'packed / padded peak memory ({name})'
            ratios[mkey], ranges[mkey] = pm['packed'] / pm['padded'], None
            meaning[mkey] = f"peak resident memory of a process that trains the {name} model once, packed over padded (lower is better)"
            if 'packed_mask' in res['per_repeat']:
                k2 = f'packed, sdpa block mask / padded training tokens/s ({name})'
                ratios[k2], ranges[k2] = paired_ratio(res['per_repeat'], 'packed_mask', 'padded'), ratio_range(res['per_repeat'], 'packed_mask', 'padded')
                meaning[k2] = f"the same packed rows through transformers' sdpa with its dense block-diagonal mask (the path before vlmlab's packed attention), {name} model"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in ratios.items(): print(f"{k}: {v:.3f}")
    return {'ratios': ratios, 'ratio_range': {k: v for k, v in ranges.items() if v}, 'ratio_meaning': meaning,
            'medians': {f"{m} {k} (real tokens/s)": v for m, r in per_model.items() for k, v in r['medians'].items()},
            'per_model': per_model, 'repeats': repeats, 'note': None,
            'params': {'attention': 'padded: sdpa; packed: vlmlab_packed (sdpa per sample)', 'models': list(per_model)}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes (a smoke test)')
    ap.add_argument('--n', type=int, default=None, help='training samples')
    ap.add_argument('--batch', type=int, default=None, help='padded batch size (the pack capacity is this many mean samples)')
    ap.add_argument('--epochs', type=int, default=None, help='epochs per run')
    ap.add_argument('--repeats', type=int, default=None, help='alternating repeats (the median is kept)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    ap.add_argument('--models', nargs='+', default=list(MODELS), help=f'models to measure ({", ".join(MODELS)})')
    ap.add_argument('--memory-child', nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    set_threads(a.threads)
    if a.memory_child:
        m = a.memory_child; _memory_child(m[0], m[1], *map(int, m[2:6]), m[6]); raise SystemExit(0)
    print(json.dumps(run(a.quick, a.n, a.batch, a.epochs, a.repeats, tuple(a.models))['ratios'], indent=1))
