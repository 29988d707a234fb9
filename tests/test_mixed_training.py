"""Text-only, one-image and two-image samples mixed in one run: stage 1 (merger only) trains through batches without images."""
import json

import pytest
import torch
from PIL import Image, ImageDraw

from vlmlab.data import convert, read_jsonl, record_images
from vlmlab.config import VLMLabConfig
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import build_trainer
from vlmlab.vision import ResizeSpec


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    "A LLaVA file of 12 samples: 8 text-only, 2 with one image, 2 with two images; converted for the tiny Qwen2.5-VL."
    work = tmp_path_factory.mktemp('mixed')
    items = []
    for k in range(12):
        kind = (0, 0, 1, 0, 0, 2)[k % 6]
        names = []
        for j in range(kind):
            img = Image.new('RGB', (96 + 16 * j, 80), (240, 240, 240))
            ImageDraw.Draw(img).rectangle([10 + k, 10, 50 + k, 50], fill=(200, 30 + 10 * j, 30))
            names.append(f'img{k}_{j}.png'); img.save(work / names[-1])
        q = '<image>\n' * kind + f'Question {k}: what is shown?'
        it = {'id': f's{k}', 'conversations': [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': f'answer number {k} here'}]}
        if kind == 1: it['image'] = names[0]
        elif kind == 2: it['image'] = names
        items.append(it)
    (work / 'mixed.json').write_text(json.dumps(items))
    s = convert(work / 'mixed.json', work / 'ds', ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False)
    assert (s.written, s.rejected) == (12, 0), s
    return work / 'ds'


def test_converted_records_have_zero_one_and_two_images(mixed):
    counts = sorted(len(record_images(r)) for _, r, _ in read_jsonl(mixed / 'train.jsonl'))
    assert counts == [0] * 8 + [1] * 2 + [2] * 2


@pytest.mark.parametrize('packing', [False, True])
def test_stage1_trains_the_merger_on_mixed_batches(mixed, tmp_path, packing):
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': False},
        'data': {'ds_output': str(mixed), 'target': 'conversation', 'teacher_ratio': 0.0, 'packing': packing, 'max_tokens': 160},
        'stage': {'name': 'stage1', 'lrs': {'merger': 1e-2}},
        'training': {'output_dir': str(tmp_path / 'run'), 'max_steps': 6, 'per_device_batch_size': 2, 'logging_steps': 1,
                     'save_steps': 1000, 'warmup_ratio': 0.0}})
    tr = build_trainer(cfg, progress=False)
    seen = []   # per training batch: did it carry any image?
    collate = tr.data_collator
    def recording(items):
        b = collate(items); seen.append(b.get('pixel_values') is not None); return b
    tr.data_collator = recording
    merger = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert merger and all('merger' in n for n in merger), sorted(merger)
    tr.train()   # the trainable-set guard runs at step 1; a batch with no image must not crash backward
    losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert False in seen and True in seen, seen   # batches without any image and batches with images both trained
    moved = [n for n, p in tr.model.named_parameters() if n in merger and not torch.equal(p.detach(), merger[n])]
    assert moved, 'the merger did not move'
    frozen = [n for n, p in tr.model.named_parameters() if not p.requires_grad]
    assert frozen and not any('merger' in n for n in frozen)
