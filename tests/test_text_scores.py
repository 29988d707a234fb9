"""Text-path box scores: bounds and monotonicity of every rule, exact token spans for every box format, a real model's
probabilities moving the score, and what constant scores do to pycocotools' precision-recall curve."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.chat import DEFAULT_GROUNDING_PROMPT, grounding_text
from vlmlab.families import family_record
from vlmlab.inference import parse_grounding, prompt_inputs
from vlmlab.text_scores import (SCORE_RULES, answer_logprobs, box_char_spans, box_scores, box_token_spans, coco_matches,
                                pr_points, reliability, scored_boxes, token_offsets)
from vlmlab.tiny import VLM_FAMILIES, tiny_tokenizer

OBJS = [{'bbox': [15, 101, 44, 116], 'label': 'purple rectangle'}, {'bbox': [28, 53, 72, 98], 'label': 'red circle'},
        {'bbox': [0, 7, 223, 167], 'label': 'yellow star'}]
FORMATS = {family_record(f).box_format: f for f in VLM_FAMILIES}   # one kit family per box format


def _spans(fam, text):
    tok = tiny_tokenizer(fam)
    ids = tok(text, add_special_tokens=False)['input_ids']
    decoded, offsets = token_offsets(tok, ids)
    assert decoded == text
    return tok, ids, box_token_spans(box_char_spans(text, fam), offsets)


def test_every_box_format_has_a_kit_family():
    assert set(FORMATS) == {'ref_box_tokens', 'json'}


@pytest.mark.parametrize('fam', VLM_FAMILIES)
def test_spans_exact_for_each_family(fam):
    tok = tiny_tokenizer(fam)
    text = grounding_text(OBJS, (224, 168), fam)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    decoded, offsets = token_offsets(tok, enc['input_ids'])
    assert decoded == text and offsets == [tuple(o) for o in enc['offset_mapping']]
    spans = box_token_spans(box_char_spans(text, fam), offsets)
    dec = lambda idx: tok.decode([enc['input_ids'][k] for k in idx])
    assert [s['bbox'] for s in spans] == [o['bbox'] for o in parse_grounding(text, fam)]
    for s, o in zip(spans, OBJS):
        assert [dec(c) for c in s['coord_tokens']] == [str(int(v)) for v in s['bbox']]
        assert dec(s['label_tokens']) == o['label']
        assert all(c for c in s['coord_tokens'])
    # every token belongs to at most one part of one box, and the parts come in the order written
    used = [k for s in spans for part in (s['lead_tokens'], s['label_tokens'], *s['coord_tokens']) for k in part]
    assert len(used) == len(set(used))


def test_spans_of_hand_built_qwen2_text():
    fam = FORMATS['ref_box_tokens']
    text = ('<|object_ref_start|> blue  square <|object_ref_end|><|box_start|>( 5 , 60 ),(700,999)<|box_end|> and '
            '<|object_ref_start|>green ellipse<|object_ref_end|> <|box_start|>(10,20),(30,40)<|box_end|>')
    tok, ids, spans = _spans(fam, text)
    dec = lambda idx: tok.decode([ids[k] for k in idx])
    assert [[dec(c) for c in s['coord_tokens']] for s in spans] == [['5', '60', '700', '999'], ['10', '20', '30', '40']]
    assert [dec(s['label_tokens']).strip() for s in spans] == ['blue  square', 'green ellipse']
    assert dec(spans[1]['lead_tokens']).startswith(')<|box_end|> and')


def test_spans_of_hand_built_json_text():
    fam = FORMATS['json']
    text = ('Sure:\n```json\n[\n  {"label": "red, \\"big\\" square", "bbox_2d": [1.5, 20 ,300,4000]},\n  {"bbox_2d": [7, 8, 9, 10], '
            '"label": "a [b] {c}"},\n  {"note": "no box"}\n]\n```')
    tok, ids, spans = _spans(fam, text)
    dec = lambda idx: tok.decode([ids[k] for k in idx])
    assert [[dec(c) for c in s['coord_tokens']] for s in spans] == [['1.5', '20', '300', '4000'], ['7', '8', '9', '10']]
    assert [dec(s['label_tokens']) for s in spans] == ['red, \\"big\\" square', 'a [b] {c}']
    assert [s['label'] for s in spans] == ['red, "big" square', 'a [b] {c}']


def test_spans_refuse_numbers_they_cannot_place():
    with pytest.raises(ValueError, match='not written as a flat list'):
        box_char_spans('[{"meta": {"bbox_2d": [9, 9, 9, 9]}, "bbox_2d": [1, 2, 3, 4]}]', FORMATS['json'])


TWO_BOXES = _spans(FORMATS['json'], grounding_text(OBJS[:2], (224, 168), FORMATS['json']))[1:]
LOGPROBS = st.lists(st.floats(-40, 0, allow_nan=False), min_size=100, max_size=100)


@settings(max_examples=200, deadline=None)
@given(lp=LOGPROBS, k=st.integers(0, 99), up=st.floats(0, 40))
def test_scores_bounded_and_monotone(lp, k, up):
    ids, spans = TWO_BOXES
    lp = np.array(lp[:len(ids)])
    k = k % len(ids)
    higher = lp.copy(); higher[k] = min(0.0, lp[k] + up)
    for rule in SCORE_RULES:
        a, b = box_scores(lp, spans, rule), box_scores(higher, spans, rule)
        assert all(0 < v <= 1 for v in a + b)
        assert all(y >= x for x, y in zip(a, b)), (rule, k, a, b)


def test_scores_positive_at_extremes():
    _, ids, spans = _spans(FORMATS['json'], grounding_text(OBJS, (224, 168), FORMATS['json']))
    for rule in SCORE_RULES:
        assert box_scores(np.zeros(len(ids)), spans, rule) == [1.0] * len(OBJS)
        assert all(v > 0 for v in box_scores(np.full(len(ids), -1e4), spans, rule))


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_less_likely_coordinates_lower_the_score_through_a_real_model(fmt):
    "The tokens of box 0's numbers made less likely inside the model's forward: box 0 scores lower, box 1 the same."
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=f'tiny-kit/{FORMATS[fmt]}')).eval()
    batch = prompt_inputs(model, Image.new('RGB', (112, 84), 'white'), DEFAULT_GROUNDING_PROMPT)
    answer = torch.tensor(model.tokenizer(grounding_text(OBJS[:2], (224, 168), model.family) + '<|im_end|>',
                                          add_special_tokens=False)['input_ids'])
    before = scored_boxes(model, batch, answer)
    text, offsets = token_offsets(model.tokenizer, answer[:-1])
    coords0 = [k for c in box_token_spans(box_char_spans(text, model.family), offsets)[0]['coord_tokens'] for k in c]

    def lower(module, args, out):   # out: (1, n + 1, V); row j predicts answer token j
        out = out.clone()
        out[0, coords0, answer[coords0]] -= 3.0
        return out
    handle = model.vlm.lm_head.register_forward_hook(lower)
    try: after = scored_boxes(model, batch, answer)
    finally: handle.remove()
    for rule in SCORE_RULES:
        assert after[0]['scores'][rule] < before[0]['scores'][rule], rule
        assert after[1]['scores'][rule] == pytest.approx(before[1]['scores'][rule], rel=1e-9), rule


@pytest.mark.parametrize('fam', VLM_FAMILIES)
def test_teacher_forced_logprobs_equal_generation_logits(fam):
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=f'tiny-kit/{fam}')).eval()
    batch = prompt_inputs(model, Image.new('RGB', (112, 84), 'gray'), DEFAULT_GROUNDING_PROMPT)
    g = model.vlm.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ids = g.sequences[0, batch['input_ids'].shape[1]:]
    kept = torch.stack([l[0].double().log_softmax(-1)[i] for l, i in zip(g.logits, ids)])
    assert (answer_logprobs(model.vlm, batch, ids) - kept).abs().max() < 1e-5


def _synthetic(n=30, seed=0):
    rng = np.random.default_rng(seed)
    right = rng.random(n) < 0.5
    gts = [{'boxes': [[20, 20, 60, 60]], 'labels': ['x'], 'size': (100, 100)} for _ in right]
    preds = [{'boxes': [[21, 22, 60, 61] if r else [50, 50, 90, 90]], 'labels': ['x'],
              'scores': [float(rng.uniform(0.4, 1.0) if r else rng.uniform(0.0, 0.6))]} for r in right]
    return right, gts, preds


def test_constant_scores_give_one_operating_point_and_order_dependent_precision():
    right, gts, preds = _synthetic()
    ones = [{**p, 'scores': [1.0]} for p in preds]
    flat, scored = coco_matches(gts, ones), coco_matches(gts, preds)
    assert len(pr_points(flat)) == 1 and np.allclose(pr_points(flat)[0], [right.mean(), right.mean()])
    assert len(pr_points(scored)) > 1 and len(np.unique(scored['precision'][scored['precision'] > 0])) > 1
    # pycocotools breaks the tie by input order: the same boxes with score 1.0 give another precision array reversed
    rev = coco_matches(gts[::-1], ones[::-1])
    assert not np.allclose(rev['precision'], flat['precision'])
    assert np.allclose(coco_matches(gts[::-1], preds[::-1])['precision'], scored['precision'])
    assert scored['tp'].sum() == flat['tp'].sum() == right.sum()


def test_reliability_bins():
    right, gts, preds = _synthetic(60, 1)
    r = reliability(coco_matches(gts, preds), bins=5)
    assert r['count'].sum() == 60 and ((r['tp_fraction'] >= 0) & (r['tp_fraction'] <= 1)).all()
    assert np.all(np.diff(r['score']) > 0) and 0 <= r['ece'] <= 1
    perfect = coco_matches(gts, [{**p, 'scores': [1.0 if ok else 1e-9]} for p, ok in zip(preds, right)])
    assert reliability(perfect)['ece'] < 1e-6


def test_text_predictions_score_the_boxes_they_read(tmp_path):
    "text_predictions over a stored image whose answer is fixed: token-probability scores by default, 1.0 only when asked."
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    from vlmlab.inference import text_predictions
    fam = FORMATS['json']
    model = load_model(ModelConfig(name_or_path=f'tiny-kit/{fam}')).eval()
    Image.new('RGB', (224, 168), 'white').save(tmp_path / 'a.png')
    rec = {'id': 'a', 'image': 'a.png', 'size': [224, 168]}
    answer = torch.tensor(model.tokenizer(grounding_text(OBJS[:2], (224, 168), fam) + '<|im_end|>', add_special_tokens=False)['input_ids'])
    model.vlm.generate = lambda **kw: torch.cat([kw['input_ids'], answer[None]], 1)   # the model "writes" this answer
    (scored,), u1 = text_predictions(model, [rec], tmp_path, DEFAULT_GROUNDING_PROMPT)
    (flat,), u2 = text_predictions(model, [rec], tmp_path, DEFAULT_GROUNDING_PROMPT, scores='constant')
    assert u1 == u2 == 0 and scored['boxes'] == flat['boxes'] and len(scored['boxes']) == 2
    assert flat['scores'] == [1.0, 1.0] and all(0 < s < 1 for s in scored['scores'])
    assert scored['scores'] == scored['rule_scores']['coords'] and set(scored['rule_scores']) == set(SCORE_RULES)
    (first,), _ = text_predictions(model, [rec], tmp_path, DEFAULT_GROUNDING_PROMPT, scores='first_digits')
    assert first['scores'] == scored['rule_scores']['first_digits']
    with pytest.raises(ValueError, match="or 'constant'"):
        text_predictions(model, [rec], tmp_path, DEFAULT_GROUNDING_PROMPT, scores='mean')
