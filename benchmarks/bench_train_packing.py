"""Training tokens/s with packed rows against padded batches: the tiny Qwen2.5-VL, BBUTrainer, the same samples.

Both runs train the same converted shapes samples (grounding target, images of 56-448 px so lengths vary) with
BBUTrainer from the same initial weights: padded = `SampleDataset` in batches of `batch` samples
(`TrainingCollator`, padded to the batch's longest); packed = `PackDataset` rows of capacity about `batch` mean
samples (`TrainingCollator(packed=True)`, one row per step), so that both take about the same real tokens per
optimizer step. Tokens/s counts real tokens only (no padding) from the end of the first step to the end of the last,
so it covers data processing, collation, forward, backward and optimizer step. Packed and padded runs alternate
within every repeat; the ratio is the median of the per-repeat ratios.

What the ratio depends on: packing removes the padding (the padded batches' non-pad fraction is reported), but
with `sdpa` a packed row is one sequence of T tokens with a block-diagonal mask, so attention costs T^2 against
sum(B x L_max^2) for the padded batch (the ratio of the two is reported as `attention_cells`). With hidden size 32, the
tiny model's attention outweighs its linear layers at these lengths, so on a CPU packing can lose here; varlen kernels
(flash_attention_2, `PackedDataCollator(flash_attn_kwargs=True)`) on a GPU skip the masked blocks.

    .venv/bin/python benchmarks/bench_train_packing.py [--quick] [--n 48] [--batch 8] [--epochs 2] [--repeats 4] [--threads 1]
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
from vlmlab.model import apply_stage
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import BBUTrainer, PackDataset, SampleDataset, TrainingCollator
from vlmlab.vision import ResizeSpec

FAMILY = 'qwen2_5_vl'


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


def run(quick: bool = False, n: int | None = None, batch: int | None = None, epochs: int | None = None,
        repeats: int | None = None) -> dict:
    "Real tokens/s of BBUTrainer on packed rows and on padded batches of the same samples, alternating."
    n = n or (12 if quick else 48)
    batch = batch or (4 if quick else 8)
    epochs = epochs or 2
    repeats = repeats or (1 if quick else 4)
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix='vlmlab-bench-'))
    try:
        kit = tiny_kit(FAMILY)
        make_shapes(work / 'raw', n=n, seed=0, old_format=0, size_range=(56, 280 if quick else 336), max_objects=6)
        convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(kit), progress=False)
        tok, ip = AutoTokenizer.from_pretrained(kit), AutoImageProcessor.from_pretrained(kit)
        proc = ChatProcessor(tok, ip, FAMILY, work / 'ds', target='grounding')
        records = [r for _, r, _ in read_jsonl(work / 'ds' / 'train.jsonl')]
        lengths = [len(proc(r, 0)) for r in records]
        cap = max(max(lengths), -(-batch * sum(lengths) // len(lengths) // 64) * 64)
        datasets = {'padded': SampleDataset(records, proc), 'packed': PackDataset(records, proc, lengths, cap)}
        counts: dict[str, list[dict]] = {}

        def train(kind: str) -> float:
            torch.manual_seed(0)
            model = VLMDetector(AutoModelForImageTextToText.from_pretrained(kit), None, tok, ip, FAMILY)
            apply_stage(model, 'stage2')
            packed = kind == 'packed'
            collate = CountingCollator(TrainingCollator(tok, packed=packed, max_tokens=cap if packed else None,
                                                        spatial_merge_size=ip.merge_size))
            args = TrainingArguments(output_dir=str(work / kind), num_train_epochs=epochs, per_device_train_batch_size=1 if packed else batch,
                                     learning_rate=1e-3, logging_steps=10, save_strategy='no', report_to='none',
                                     remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True, seed=0,
                                     data_seed=0)
            steps = StepEnds()
            BBUTrainer(model, args, 'stage2', {'merger': 1e-3, 'llm': 1e-3}, proc, train_dataset=datasets[kind],
                       data_collator=collate, callbacks=[steps]).train()
            assert len(collate.batches) == len(steps.ends), (len(collate.batches), len(steps.ends))
            counts[kind] = collate.batches
            return sum(b['real'] for b in collate.batches[1:]) / (steps.ends[-1] - steps.ends[0])   # the first step warms up

        per = alternate({'padded': lambda: train('padded'), 'packed': lambda: train('packed')}, repeats,
                        log=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = medians(per)
    ratio = paired_ratio(per, 'packed', 'padded')
    shape = {k: {'steps_per_epoch': len(v) // epochs, 'real_tokens_per_step': sum(b['real'] for b in v) / len(v),
                 'non_pad_fraction': sum(b['real'] for b in v) / sum(b['slots'] for b in v),
                 'attention_cells_per_step': sum(b['cells'] for b in v) / len(v)} for k, v in counts.items()}
    cells = sum(b['cells'] for b in counts['packed']) / sum(b['cells'] for b in counts['padded'])
    print(f"{n} samples of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}), {epochs} epochs; padded batches of "
          f"{batch}, packed rows of <= {cap} tokens; median of {repeats} alternating repeats")
    print(f"{'mode':8} {'tokens/s':>9} {'steps/epoch':>12} {'tokens/step':>12} {'non-pad':>8} {'attn cells/step':>16}")
    for k in ('padded', 'packed'):
        s = shape[k]
        print(f"{k:8} {med[k]:9.0f} {s['steps_per_epoch']:12d} {s['real_tokens_per_step']:12.0f} {s['non_pad_fraction']:8.2%} "
              f"{s['attention_cells_per_step']:16,.0f}")
    print(f"packed / padded tokens/s: {ratio:.3f} (attention cells packed / padded over the epoch: {cells:.2f})")
    loses = '; with hidden size 32, attention outweighs the linear layers at these lengths, so packing loses here' if ratio < 1 else ''
    note = (f"train_packing: the padded batches hold {shape['padded']['non_pad_fraction']:.0%} real tokens, the packed rows 100%, "
            f"but a packed row under sdpa attends through a dense block-diagonal mask over up to {cap} tokens: {cells:.2f}x the "
            f"attention cells of the padded batches{loses}. Varlen kernels (flash_attention_2 on a GPU) skip the masked blocks; "
            f"this CPU cannot measure that.")
    return {'ratios': {'packed / padded training tokens/s': ratio},
            'ratio_range': {'packed / padded training tokens/s': ratio_range(per, 'packed', 'padded')}, 'note': note,
            'ratio_meaning': {'packed / padded training tokens/s': 'real (non-pad) tokens per second of BBUTrainer on packed rows over '
                              'that on padded batches of the same samples, tiny model, sdpa attention (higher is better)'},
            'medians': {f'{k} (real tokens/s)': v for k, v in med.items()}, 'per_repeat': per, 'repeats': repeats,
            'batches': shape, 'attention_cells_packed_over_padded': cells,
            'params': {'model': f'tiny {FAMILY}', 'attention': 'sdpa', 'samples': n, 'epochs': epochs, 'padded_batch': batch,
                       'pack_capacity': cap, 'sample_tokens': {'min': min(lengths), 'mean': sum(lengths) / n, 'max': max(lengths)}}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes (a smoke test)')
    ap.add_argument('--n', type=int, default=None, help='training samples')
    ap.add_argument('--batch', type=int, default=None, help='padded batch size (the pack capacity is this many mean samples)')
    ap.add_argument('--epochs', type=int, default=None, help='epochs per run')
    ap.add_argument('--repeats', type=int, default=None, help='alternating repeats (the median is kept)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    a = ap.parse_args()
    set_threads(a.threads)
    print(json.dumps(run(a.quick, a.n, a.batch, a.epochs, a.repeats)['ratios'], indent=1))
