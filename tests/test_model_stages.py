"""Every stage trains exactly its parameter groups, for every family, with and without the detection head."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from vlmlab.detection import DetectionHead, VLMDetector
from vlmlab.families import family_record
from vlmlab.model import (MODULE_GROUPS, STAGES, TrainableSetError, apply_stage, assert_trainable_set, group_parameters,
                          optimizer_groups)
from vlmlab.tiny import VLM_FAMILIES, tiny_kit
from vlmlab.tokens import OBJECT_REF_END, OBJECT_REF_START, expand_image_pads, render_chatml


def batch_for(fam, tok, ip):
    px = ip(images=[Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))], return_tensors='pt')
    conv = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Where?'}]}, {'role': 'assistant', 'content': 'here'}]
    ids = tok(expand_image_pads(render_chatml(conv, fam), px['image_grid_thw']), add_special_tokens=False, return_tensors='pt')['input_ids']
    mm = torch.zeros_like(ids, dtype=torch.int32); mm[ids == tok.convert_tokens_to_ids('<|image_pad|>')] = 1
    kind = torch.zeros_like(mm); kind[0, -3:] = 2
    return {'input_ids': ids, 'labels': ids.clone(), 'attention_mask': torch.ones_like(ids, dtype=torch.bool), 'mm_token_type_ids': mm,
            'label_kind': kind, 'pixel_values': px['pixel_values'], 'image_grid_thw': px['image_grid_thw']}


@pytest.mark.parametrize('family', VLM_FAMILIES)
@pytest.mark.parametrize('stage', sorted(STAGES))
def test_stage_trains_exactly_its_groups(family, stage):
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit(family)), AutoImageProcessor.from_pretrained(tiny_kit(family))
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(family))
    head = DetectionHead(vlm.config.text_config.hidden_size, len(tok), tok.convert_tokens_to_ids(OBJECT_REF_START),
                         tok.convert_tokens_to_ids(OBJECT_REF_END), d_model=16, num_queries=4, num_layers=1, num_heads=2)
    det = VLMDetector(vlm, head, tok, ip, family, lm_weight=1.0)
    apply_stage(det, stage)
    b = batch_for(family, tok, ip)
    targets = [{'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]]), 'captions': [torch.tensor([5, 6])]}]
    det(b, targets)['loss'].backward()
    got = assert_trainable_set(det, stage)
    present = {g for g, ps in group_parameters(det).items() if ps}   # a dense family has no experts or router
    assert all((got[g] > 0) == (g in STAGES[stage] and g in present) for g in MODULE_GROUPS)
    assert 'experts' in present or not family_record(family).moe
    groups = optimizer_groups(det, {g: 1e-3 for g in MODULE_GROUPS})
    trainable = {id(p) for _, ps in group_parameters(det).items() for _, p in ps if p.requires_grad}
    assert {id(p) for g in groups for p in g['params']} == trainable


def test_guard_names_a_parameter_left_trainable():
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit('qwen2_vl'))
    apply_stage(vlm, 'stage1')
    vlm.model.visual.blocks[0].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(TrainableSetError, match=r'model\.visual\.blocks\.0\.mlp\.fc1\.weight \(vision\) should be frozen'):
        assert_trainable_set(vlm, 'stage1')
