"""Run under torchrun by test_distributed.py and nbs/07b_distributed: a stage-1 (merger only) run on text-only and image samples,
recording per rank and micro-batch whether the batch carried an image; writes OUT/rank{R}.json with that record and the losses.

    torchrun --nproc_per_node 2 tests/torchrun_mixed.py DS_OUTPUT OUT ddp|fsdp [naive]

`naive` turns vlmlab's zero-weighted vision pass off (what a plain Trainer does with a batch that has no image)."""
import json
import sys
from pathlib import Path

from vlmlab.config import VLMLabConfig
from vlmlab.trainer import build_trainer

ds, out, engine = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if sys.argv[4:] == ['naive']:
    from vlmlab.detection import VLMDetector
    VLMDetector._needs_keepalive = lambda self, batch: False
training = {'output_dir': str(out), 'max_steps': 6, 'per_device_batch_size': 1, 'logging_steps': 1, 'save_steps': 1000,
            'warmup_ratio': 0.0, **({'fsdp': 'full_shard'} if engine == 'fsdp' else {})}
cfg = VLMLabConfig.from_dict({
    'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': False},
    'data': {'ds_output': ds, 'target': 'conversation', 'teacher_ratio': 0.0},
    'stage': {'name': 'stage1', 'lrs': {'merger': 1e-2}}, 'training': training})
tr = build_trainer(cfg, progress=False)
seen, collate = [], tr.data_collator
def recording(items):
    b = collate(items); seen.append(b.get('pixel_values') is not None); return b
tr.data_collator = recording
tr.train()
losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
(out / f'rank{tr.args.process_index}.json').write_text(json.dumps({'seen': seen, 'losses': losses, 'fsdp': tr.is_fsdp_enabled}))
