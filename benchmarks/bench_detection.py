"""Detection head on the synthetic shapes: held-out COCO metrics against trivial baselines, in one run.

Trains the tiny Qwen2.5-VL model with the detection head through BBUTrainer, as notebook 05d_evaluation does (256
training images, 1,500 steps of 8, CPU), evaluates on 64 held-out images with pycocotools, and writes the
numbers to benchmarks/results/detection.json.

    .venv/bin/python benchmarks/bench_detection.py [--steps 1500] [--seed 0]
"""
import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vlmlab.chat import DEFAULT_CAPTION_PROMPT
from vlmlab.config import VLMLabConfig
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.evaluation import baseline_predictions, evaluate_detections, ground_truth
from vlmlab.inference import detector_predictions
from vlmlab.families import MODULE_GROUPS
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import build_trainer
from vlmlab.vision import ResizeSpec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=1500, help='optimizer steps')
    ap.add_argument('--seed', type=int, default=0, help='model and batch seed')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'detection.json'), help='JSON written here')
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    work, fam = Path(tempfile.mkdtemp()), 'qwen2_5_vl'
    spec = ResizeSpec.from_pretrained(tiny_kit(fam))
    for split, n, seed in (('train', 256, 0), ('test', 64, 1)):
        make_shapes(work / split, n=n, seed=seed, old_format=0, size_range=(112, 224), max_objects=3)
        convert(work / split, work / 'ds', spec, split=split, progress=False)
    train, test = ([r for _, r, _ in read_jsonl(work / 'ds' / f'{s}.jsonl')] for s in ('train', 'test'))
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': f'tiny-kit/{fam}', 'detection_head': True, 'head_d_model': 64, 'num_queries': 8},
        'data': {'ds_output': str(work / 'ds'), 'train_split': 'train', 'target': 'caption'},
        'stage': {'name': 'full', 'lrs': {g: 1e-3 for g in MODULE_GROUPS}},
        'training': {'output_dir': str(work / 'run'), 'max_steps': args.steps, 'per_device_batch_size': 8, 'logging_steps': 10,
                     'save_steps': 10 ** 6, 'warmup_ratio': 0.05, 'weight_decay': 1e-4, 'lm_weight': 0.0, 'seed': args.seed}})
    trainer = build_trainer(cfg, progress=False)
    t0 = time.time(); trainer.train(); train_s = time.time() - t0
    det = trainer.model.eval()
    hist = [h for h in trainer.state.log_history if 'bbox_l1' in h]
    gt = ground_truth(test)
    res = {'detector (head)': evaluate_detections(gt, detector_predictions(det, test, work / 'ds', DEFAULT_CAPTION_PROMPT)),
           'whole-image box': evaluate_detections(gt, baseline_predictions(test, 'whole_image')),
           'random boxes': evaluate_detections(gt, baseline_predictions(test, 'random'))}
    out = {'recipe': {'family': fam, 'train_images': len(train), 'test_images': len(test), 'steps': args.steps, 'batch_size': 8,
                      'seed': args.seed, 'd_model': 64, 'num_queries': 8},
           'train_seconds': round(train_s, 1), 'machine': f'{platform.machine()} {torch.get_num_threads()} threads',
           'first_log': hist[0], 'last_5_logs_mean': {k: sum(h[k] for h in hist[-5:]) / 5 for k in hist[-1] if isinstance(hist[-1][k], (int, float))},
           'held_out': res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for k, v in res.items():
        print(f"{k:16} AP50 {v['class_agnostic']['AP50']:.3f}  mAP {v['class_agnostic']['mAP']:.3f}  "
              f"caption exact {v['captions']['exact_match']:.2f}")
    print(f"trained {args.steps} steps in {train_s:.0f} s; wrote {args.out}")


if __name__ == '__main__':
    main()
