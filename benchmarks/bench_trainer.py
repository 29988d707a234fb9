"""Trainer overhead: BBUTrainer with every diagnostic on (norms, update and step ratios, NaN checks, loss split, logged every
step) against a plain transformers Trainer, same tiny model, same processed batches, same optimizer settings.

Runs alternate (plain, vlmlab, plain, vlmlab, ...) so that machine noise hits both; the ratio of the medians is printed.
Usage: python benchmarks/bench_trainer.py [--steps 40] [--repeats 3] [--batch 8]
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=40)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--out', default='benchmarks/results/trainer.json')
    a = ap.parse_args()
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    fam, work = 'qwen2_5_vl', Path(tempfile.mkdtemp())
    make_shapes(work / 'raw', n=64, seed=0, old_format=0, size_range=(112, 224), max_objects=3)
    convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(tiny_kit(fam)), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
    proc = ChatProcessor(tok, ip, fam, work / 'ds', target='grounding')
    samples = [proc(r) for _, r, _ in read_jsonl(work / 'ds' / 'train.jsonl')]   # processed once: both trainers get the same items
    collate = TrainingCollator(tok)
    plain_collate = lambda items: {k: v for k, v in model_inputs(collate(items)).items()}

    def run(kind, logging_steps, seed=0):
        torch.manual_seed(seed)
        vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(fam))
        args = TrainingArguments(output_dir=str(work / kind), max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-3,
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

    res = {f'{k}@{L}': [] for L in (1, 10) for k in ('plain', 'vlmlab')}
    for r in range(a.repeats):
        for L in (1, 10):
            for kind in ('plain', 'vlmlab'):
                res[f'{kind}@{L}'].append(run(kind, L))
                print(f"repeat {r + 1}: {kind:6} logging every {L:2} steps: median step {res[f'{kind}@{L}'][-1] * 1000:.1f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    ratios = {f'logging every {L} steps': med[f'vlmlab@{L}'] / med[f'plain@{L}'] for L in (1, 10)}
    out = {'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads",
           'model': f'tiny {fam}', 'batch': a.batch, 'steps': a.steps, 'repeats': a.repeats,
           'median_step_s': med, 'per_repeat_s': res, 'ratio_vlmlab_over_plain': ratios, 'target': 1.05}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    for L in (1, 10):
        print(f"logging every {L:2} steps: plain Trainer {med[f'plain@{L}'] * 1000:.1f} ms/step, BBUTrainer with all diagnostics "
              f"{med[f'vlmlab@{L}'] * 1000:.1f} ms/step: ratio {ratios[f'logging every {L} steps']:.3f} (target <= 1.05)")
    print(out['machine'])


if __name__ == '__main__':
    main()
