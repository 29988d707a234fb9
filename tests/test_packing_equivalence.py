"""Packed rows equal solo runs and padded batches, for every tiny Qwen-VL family; chat labels are exact."""
import json
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from vlmlab.chat import ChatError, ChatProcessor
from vlmlab.collators import PackedDataCollator, StandardDataCollator, model_inputs
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.tiny import VLM_FAMILIES, tiny_kit
from vlmlab.tokens import IM_END
from vlmlab.vision import ResizeSpec


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp('shapes')
    make_shapes(d / 'raw', n=10, seed=5, old_format=0, size_range=(80, 300))
    return d


def family_setup(fam, root):
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
    convert(root / 'raw', root / fam, ResizeSpec.from_pretrained(tiny_kit(fam)), progress=False)
    recs = [r for _, r, _ in read_jsonl(root / fam / 'train.jsonl')]
    return tok, ip, recs


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_packed_equals_solo_and_padded(family, shapes):
    tok, ip, recs = family_setup(family, shapes)
    proc = ChatProcessor(tok, ip, family, shapes / family, teacher_pool=recs[6:], teacher_ratio=0.5, seed=1)
    ss = [proc(r) for r in recs[:5]]
    assert any(s.spans['teacher'] for s in ss) and any(not s.spans['teacher'] for s in ss)
    model = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), attn_implementation='sdpa').eval()
    packed = PackedDataCollator(tok.pad_token_id, pad_to_multiple_of=16)(ss)
    padded = StandardDataCollator(tok.pad_token_id, pad_to_multiple_of=16)(ss)
    with torch.no_grad():
        out = model(**model_inputs(packed))
        cu = packed['cu_seqlens'].tolist()
        for s, a, b in zip(ss, cu[:-1], cu[1:]):
            solo = model(input_ids=s.input_ids[None], mm_token_type_ids=s.mm_token_type_ids[None],
                         pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw, use_cache=False).logits[0]
            assert (out.logits[0, a:b] - solo).abs().max().item() < 1e-5
        loss_padded = model(**model_inputs(padded)).loss
    assert abs(out.loss.item() - loss_padded.item()) < 1e-5


@pytest.mark.parametrize('family', VLM_FAMILIES)
def test_packed_gradients_equal_padded(family, shapes):
    tok, ip, recs = family_setup(family, shapes)
    ss = [ChatProcessor(tok, ip, family, shapes / family)(r) for r in recs[:3]]
    grads = []
    for batch in (PackedDataCollator(tok.pad_token_id)(ss), StandardDataCollator(tok.pad_token_id)(ss)):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), attn_implementation='sdpa')
        model.train()
        model(**model_inputs(batch)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5


ANSWER = st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='<>'), min_size=0, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers=st.lists(ANSWER, min_size=1, max_size=3), question=ANSWER)
def test_labels_are_exactly_the_answers(shapes, answers, question):
    fam = 'qwen2_5_vl'
    tok, ip = AutoTokenizer.from_pretrained(tiny_kit(fam)), AutoImageProcessor.from_pretrained(tiny_kit(fam))
    if not (shapes / fam / 'train.jsonl').exists(): family_setup(fam, shapes)
    rec = next(r for _, r, _ in read_jsonl(shapes / fam / 'train.jsonl'))
    conv = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}]
    for a in answers: conv += [{'role': 'assistant', 'content': a}, {'role': 'user', 'content': question or '?'}]
    conv = conv[:-1]
    s = ChatProcessor(tok, ip, fam, shapes / fam, target='conversation')(dict(rec, conversations=conv))
    # the tokenizer normalizes to NFC (e.g. '\ufa2a' decodes as '\u98ef'): compare normalized text
    assert tok.decode(s.labels[s.labels != -100]) == unicodedata.normalize('NFC', ''.join(a + IM_END for a in answers))
    # every labelled token is a student answer token; everything else is -100
    assert torch.equal(s.labels != -100, s.label_kind == 2)
    assert len(s.spans['student']) == len(answers)
