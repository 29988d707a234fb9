"""Trainer overhead: BBUTrainer with every diagnostic on (norms, update and step ratios, NaN checks, loss split, logged every
step) against a plain transformers Trainer, same tiny model, same processed batches, same optimizer settings.

Runs alternate (plain, vlmlab, vlmlab, plain, ...) so that machine noise hits both; each run's step time is the median of
its steps after the first three; the ratio is the median of the per-repeat ratios.
Usage: python benchmarks/bench_trainer.py [--quick] [--steps 30] [--repeats 4] [--batch 8] [--threads 1] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from common import alternate, medians, paired_ratio, ratio_range, set_threads
from vlmlab.chat import ChatProcessor
from vlmlab.collators import model_inputs
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.detection import VLMDetector
from vlmlab.model import apply_stage
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import BBUTrainer, TrainingCollator
from vlmlab.vision import ResizeSpec


class StepTimes(TrainerCallback):
    "Wall time of every optimizer step."
    def __init__(self): self.times, self.t = [], None
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): self.times.append(time.perf_counter() - self.t)


def run(quick: bool = False, steps: int | None = None, repeats: int | None = None, batch: int | None = None) -> dict:
    "Median step time of a plain Trainer and of BBUTrainer (all diagnostics), logging every step and every 10 steps."
    steps = steps or (6 if quick else 30)
    repeats = repeats or (1 if quick else 4)
    batch = batch or (4 if quick else 8)
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    fam, work = 'qwen2_5_vl', Path(tempfile.mkdtemp())
    make_shapes(work / 'raw', n=16 if quick else 64, seed=0, old_format=0, size_range=(112, 224), max_objects=3)
    convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(tiny_kit(fam)), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
    proc = ChatProcessor(tok, ip, fam, work / 'ds', target='grounding')
    samples = [proc(r) for _, r, _ in read_jsonl(work / 'ds' / 'train.jsonl')]   # processed once: both trainers get the same items
    collate = TrainingCollator(tok)
    plain_collate = lambda items: model_inputs(collate(items))

    def train(kind: str, logging_steps: int, seed: int = 0) -> float:
        torch.manual_seed(seed)
        vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(fam))
        args = TrainingArguments(output_dir=str(work / kind), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                                 logging_steps=logging_steps, save_strategy='no', report_to='none', remove_unused_columns=False, disable_tqdm=True,
                                 dataloader_pin_memory=False, use_cpu=True, seed=seed, max_grad_norm=1.0)
        times = StepTimes()
        if kind == 'plain':
            apply_stage(vlm, 'stage2')
            tr = Trainer(model=vlm, args=args, train_dataset=samples, data_collator=plain_collate, callbacks=[times])
            tr.remove_callback(PrinterCallback)
        else:
            model = VLMDetector(vlm, None, tok, ip, fam)
            apply_stage(model, 'stage2')
            tr = BBUTrainer(model, args, 'stage2', {'merger': 1e-3, 'llm': 1e-3}, proc, train_dataset=samples,
                            data_collator=collate, callbacks=[times])
        tr.train()
        return statistics.median(times.times[3:])   # the first steps warm up allocators and caches

    variants = {f'{kind}@{L}': (lambda kind=kind, L=L: train(kind, L)) for L in (1, 10) for kind in ('plain', 'vlmlab')}
    try: per = alternate(variants, repeats, log=lambda m: print(m, flush=True))
    finally: shutil.rmtree(work, ignore_errors=True)
    med = medians(per)
    key = lambda L: f'BBUTrainer / plain Trainer step time, logging every {L} steps'
    ratios = {key(L): paired_ratio(per, f'vlmlab@{L}', f'plain@{L}') for L in (1, 10)}
    spread = {key(L): ratio_range(per, f'vlmlab@{L}', f'plain@{L}') for L in (1, 10)}
    for L in (1, 10):
        print(f"logging every {L:2} steps: plain Trainer {med[f'plain@{L}'] * 1000:.1f} ms/step, BBUTrainer with all diagnostics "
              f"{med[f'vlmlab@{L}'] * 1000:.1f} ms/step: ratio {ratios[key(L)]:.3f} (target <= 1.05)")
    names = {'plain': 'plain Trainer', 'vlmlab': 'BBUTrainer'}
    label = lambda k: f"{names[k.split('@')[0]]}, logging every {k.split('@')[1]} steps (s/step)"
    return {'ratios': ratios, 'ratio_range': spread,
            'ratio_meaning': {k: 'median optimizer-step time of BBUTrainer with every diagnostic on, over that of a plain transformers '
                                 'Trainer, same model, batches and optimizer settings (overhead; lower is better, target <= 1.05)'
                              for k in ratios},
            'medians': {label(k): v for k, v in med.items()}, 'per_repeat': per, 'repeats': repeats,
            'params': {'model': f'tiny {fam}', 'batch': batch, 'steps': steps, 'target': 1.05}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes (a smoke test)')
    ap.add_argument('--steps', type=int, default=None)
    ap.add_argument('--repeats', type=int, default=None)
    ap.add_argument('--batch', type=int, default=None)
    ap.add_argument('--out', default=None, help='also write the result JSON here')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    a = ap.parse_args()
    set_threads(a.threads)
    res = run(a.quick, a.steps, a.repeats, a.batch)
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res['ratios'], indent=1))
