"""Boxes in free-text answers (vlmlab.answer_boxes): every notation found with its numbers, rewrites that touch only the
numbers and land within half a unit, faults raised with the record named, stored answers validated (property tests)."""
import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vlmlab.answer_boxes import (AnswerBoxError, answer_box_problems, answer_objects, box_fault, find_answer_boxes,
                                 rescale_answer_text)
from vlmlab.tokens import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START, QUAD_END, QUAD_START
from vlmlab.vision import COORD_SPACE, ResizeSpec, boxes_from_model, boxes_to_model, scale_boxes

FAMILIES = tuple(COORD_SPACE)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# prose that holds no box: letters, digits, spaces and punctuation without brackets, braces, quotes or tags
prose = st.text(st.sampled_from(list('abcdefghij klmnop,.;!?-\n0123456789')), max_size=30)
labels = st.text(st.sampled_from(list('abcdefgh xyz')), min_size=1, max_size=12).map(str.strip).filter(bool)


def outside(text: str) -> list[str]:
    "The text between the boxes found in it."
    cuts = [0] + [x for b in find_answer_boxes(text) for x in b.span] + [len(text)]
    return [text[cuts[k]:cuts[k + 1]] for k in range(0, len(cuts), 2)]


def fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


WRITERS = {  # notation -> (writer of one box with label, is it 0..1000 by definition)
    'json': (lambda b, l: json.dumps({'bbox_2d': b, 'label': l}), False),
    'json_compact': (lambda b, l: '{"bbox":[' + ','.join(map(fmt, b)) + '],"label":"' + l + '"}', False),
    'python_dict': (lambda b, l: repr({'box': b, 'label': l}), False),
    'yaml_key': (lambda b, l: f"{l} - bbox: [{', '.join(map(fmt, b))}]", False),
    'prose_key': (lambda b, l: f"the {l} bounding box is [{', '.join(map(fmt, b))}]", False),
    'box_tokens': (lambda b, l: f"{OBJECT_REF_START}{l}{OBJECT_REF_END}{BOX_START}({fmt(b[0])},{fmt(b[1])}),({fmt(b[2])},{fmt(b[3])}){BOX_END}", True),
    'bare_tokens': (lambda b, l: f"{BOX_START}({fmt(b[0])}, {fmt(b[1])}), ({fmt(b[2])}, {fmt(b[3])}){BOX_END}", True),
    'ref_tags': (lambda b, l: f"<ref>{l}</ref><box>({fmt(b[0])},{fmt(b[1])}),({fmt(b[2])},{fmt(b[3])})</box>", True),
}


@st.composite
def int_box(draw, w: int, h: int, min_side: int = 1):
    "An integer xyxy box inside [0, w] x [0, h] with sides of at least min_side."
    x1 = draw(st.integers(0, w - min_side)); x2 = draw(st.integers(x1 + min_side, w))
    y1 = draw(st.integers(0, h - min_side)); y2 = draw(st.integers(y1 + min_side, h))
    return [x1, y1, x2, y2]


@st.composite
def answers(draw, w: int = 1000, h: int = 1000, notations=tuple(WRITERS)):
    "(answer text, the boxes in it, the notation of each) with prose around and between the boxes."
    n = draw(st.integers(1, 4))
    boxes = [draw(int_box(w, h)) for _ in range(n)]
    kinds = [draw(st.sampled_from(notations)) for _ in range(n)]
    parts = [draw(prose)]
    for b, k in zip(boxes, kinds):
        parts += [WRITERS[k][0](b, draw(labels)), draw(prose.map(lambda s: ' ' + s + ' '))]
    if draw(st.booleans()): parts = ['```json\n'] + parts + ['\n```']
    return ''.join(parts), boxes, kinds


@st.composite
def image_sizes(draw, family: str | None = None):
    "(family, spec, original (w, h), resized (w, h)) for a random photo and pixel budget."
    fam = family or draw(st.sampled_from(FAMILIES))
    w, h = draw(st.integers(64, 5000)), draw(st.integers(64, 5000))
    assume(max(w, h) / min(w, h) <= 20)
    spec = ResizeSpec.for_family(fam, max_pixels=draw(st.sampled_from([100_352, 200_704, 1_003_520, 12_845_056])))
    rh, rw = spec.resize(h, w)
    return fam, spec, (w, h), (rw, rh)


# --- finding ---------------------------------------------------------------------------------------------------------

@PROPS
@given(answers())
def test_every_notation_found_with_its_numbers(case):
    text, boxes, kinds = case
    found = find_answer_boxes(text)
    assert [list(b.values) for b in found] == boxes
    assert all(b.problem is None for b in found)
    for b in found:   # the recorded spans hold exactly the numbers
        assert [float(text[s:e]) for s, e in b.item_spans] == list(b.values)
    assert [b.form in ('box_tokens', 'ref_tags') for b in found] == [WRITERS[k][1] for k in kinds]


@PROPS
@given(prose)
def test_prose_without_boxes_has_none(text):
    assert find_answer_boxes(text) == []
    assert rescale_answer_text(text, 'pixels', 'qwen2_5_vl', (640, 480), (644, 476), 'r') == text


@PROPS
@given(st.text(max_size=80), st.sampled_from(['"bbox": [', 'bbox_2d: [1, 2,', BOX_START, '<box>(', '[0.1, 0.2, 0.3, 0.4]',
                                              '"point_2d": [3, 4]', '{"box": {"x": 1}}', ']', '(1,2),(3,4)' + BOX_END]),
       st.sampled_from(FAMILIES), st.sampled_from(['pixels', 'rel1000', 'rel1', 'auto']))
def test_any_text_is_rewritten_or_refused_with_answer_box_error(noise, fragment, fam, space):
    text = noise[:40] + fragment + noise[40:]
    find_answer_boxes(text)
    try: out = rescale_answer_text(text, space, fam, (1500, 1000), (756, 504), 'rec-fuzz')
    except AnswerBoxError as e: assert str(e).startswith('rec-fuzz: ')
    else: assert outside(out) == outside(text)
    assert isinstance(answer_box_problems(text, fam, (756, 504)), list)


def test_malformed_boxes_are_found_not_skipped():
    cases = {'{"bbox_2d": [1, 2, 3]}': '3 numbers where a box has 4', '{"bbox": [1, "2", 3, 4]}': "'\"2\"' is not a number",
             'bbox: [1, inf, 3, 4]': 'a non-finite number', '{"point_2d": [1, 2, 3]}': '3 numbers where a point has 2',
             f'{BOX_START}(1,2,3,4){BOX_END}': 'not written as (x1,y1),(x2,y2)', f'{QUAD_START}(1,2),(3,4){QUAD_END}': '4 numbers where a quad has 8',
             '{"box": {"x1": 1}}': "a mapping '{\"x1\": 1}', not a list of coordinates", '{"bbox": []}': '0 numbers where a box has 4',
             '{"bbox_2d": [1, 2, 3, 4': "the list after 'bbox_2d' is never closed", f'{BOX_START}(1,2),(3,4) and more': f'{BOX_START} without its {BOX_END}',
             '<box>(1,2),(3,4)': '<box> without its </box>', f'{BOX_START}(1,2){BOX_START}(1,2),(3,4){BOX_END}': f"'{BOX_START}' is not a number"}
    for text, problem in cases.items():
        ps = [b.problem for b in find_answer_boxes(text)]
        assert len(ps) == 1 and ps[0].startswith(problem), (text, ps)
        with pytest.raises(AnswerBoxError, match='^rec-3: .*' + re.escape(problem)):
            rescale_answer_text(text, 'pixels', 'qwen2_5_vl', (640, 480), (644, 476), 'rec-3')
        assert len(answer_box_problems(text, 'qwen2_5_vl', (644, 476))) == 1


def test_kinds_keys_and_nesting():
    t = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"point_2d": [5, 6], "label": "b"}], "boxes": [[1, 1, 2, 2], [3, 3, 4, 4]]}'
    got = [(b.kind, b.key, b.label, b.values) for b in find_answer_boxes(t)]
    assert got == [('box', 'bbox_2d', 'a', (1, 2, 3, 4)), ('point', 'point_2d', 'b', (5, 6)),
                   ('box', 'boxes', None, (1, 1, 2, 2)), ('box', 'boxes', None, (3, 3, 4, 4))]
    assert [b.kind for b in find_answer_boxes('points: [[1, 2], [3, 4]]')] == ['point', 'point']
    t = '{"boxes": [{"bbox": [1, 2, 3, 4], "label": "a"}, {"bbox": [5, 6, 7, 8], "label": "b"}]}'   # found once each
    assert [(b.key, b.label, b.values) for b in find_answer_boxes(t)] == [('bbox', 'a', (1, 2, 3, 4)), ('bbox', 'b', (5, 6, 7, 8))]
    assert rescale_answer_text(t, 'rel1000', 'qwen3_vl', (10, 10), (56, 56), 'r') == t
    assert find_answer_boxes('see the box [figure 2] and the mybbox: [1, 2, 3, 4]') == []
    assert [b.values for b in find_answer_boxes('BBox = [1e2, 2.5E1, 3.0e2, 4e2]')] == [(100, 25, 300, 400)]
    assert [(b.values, b.item_spans) for b in find_answer_boxes('{"bbox": "10, 20, 30, 40"}')] == [((10, 20, 30, 40), ((10, 12), (14, 16), (18, 20), (22, 24)))]
    assert find_answer_boxes('{"box": "open", "label": "box"}') == []
    t = f'{OBJECT_REF_START}cat{OBJECT_REF_END} is cute; {OBJECT_REF_START}dog{OBJECT_REF_END}{BOX_START}(1,2),(3,4){BOX_END}'
    assert [b.label for b in find_answer_boxes(t)] == ['dog']          # a phrase never runs past its own end tag


# --- rewriting -------------------------------------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_pixels_rewritten_into_family_space_within_half_a_unit(data):
    fam, spec, (w, h), (rw, rh) = data.draw(image_sizes())
    unit_orig = np.array([w, h]) / (1000 if COORD_SPACE[fam] == 'rel1000' else np.array([rw, rh]))   # original px per unit
    min_side = int(math.ceil(2 * unit_orig.max())) + 1                     # boxes that stay boxes once written as ints
    assume(min_side < min(w, h))
    n = data.draw(st.integers(1, 3))
    boxes = [data.draw(int_box(w, h, min_side)) for _ in range(n)]
    notation = data.draw(st.sampled_from(['json', 'json_compact', 'python_dict', 'yaml_key', 'prose_key']))
    text = ' and '.join(WRITERS[notation][0](b, 'obj') for b in boxes) + '.'
    out = rescale_answer_text(text, 'pixels', fam, (w, h), (rw, rh), 'rec-1')
    assert outside(out) == outside(text)
    written = [b.values for b in find_answer_boxes(out)]
    assert all(float(v).is_integer() for b in written for v in b)
    back = scale_boxes(boxes_from_model(written, (rw, rh), fam), (rw, rh), (w, h))
    err = np.abs(back - np.array(boxes, dtype=float))
    assert np.all(err <= np.tile(unit_orig, 2) / 2 + 1e-6), (err.max(), unit_orig)
    assert answer_box_problems(out, fam, (rw, rh)) == []
    objs = answer_objects(out, fam, (rw, rh), 'rec-1')           # back to record objects in stored-image pixels
    exact = scale_boxes(boxes, (w, h), (rw, rh))
    unit_stored = (rw, rh) / np.array([1000, 1000]) if COORD_SPACE[fam] == 'rel1000' else np.ones(2)
    assert np.all(np.abs(np.array([o['bbox'] for o in objs]) - exact) <= np.tile(unit_stored, 2) / 2 + 5e-4)
    assert [o['label'] for o in objs] == (['obj'] * n if notation in ('json', 'json_compact', 'python_dict') else [None] * n)


@PROPS
@given(st.data())
def test_relative_sources_match_the_reference_mapping(data):
    fam, spec, orig, (rw, rh) = data.draw(image_sizes())
    box = data.draw(int_box(1000, 1000, 200))
    rel = [v / 1000 for v in box]
    via_vision = boxes_to_model(scale_boxes([box], (1000, 1000), (rw, rh)), (rw, rh), fam)[0]
    got1000 = find_answer_boxes(rescale_answer_text(json.dumps({'bbox': box}), 'rel1000', fam, orig, (rw, rh), 'r'))[0].values
    got1 = find_answer_boxes(rescale_answer_text(json.dumps({'bbox': rel}), 'rel1', fam, orig, (rw, rh), 'r'))[0].values
    assert np.abs(np.array(got1000) - via_vision).max() <= 1 and np.abs(np.array(got1) - via_vision).max() <= 1
    if COORD_SPACE[fam] == 'rel1000':   # 0..1000 into a 0..1000 family: the very same text
        assert rescale_answer_text(json.dumps({'bbox': box}), 'rel1000', fam, orig, (rw, rh), 'r') == json.dumps({'bbox': box})


@PROPS
@given(answers(notations=('box_tokens', 'bare_tokens', 'ref_tags')), st.sampled_from(FAMILIES),
       st.sampled_from(['pixels', 'rel1000', 'rel1', 'auto']))
def test_token_notations_stay_byte_identical(case, fam, space):
    text, boxes, _ = case
    assert rescale_answer_text(text, space, fam, (3000, 2000), (532, 364), 'r') == text
    assert answer_box_problems(text, fam, (532, 364)) == []


def test_qwen2_vl_token_answer_round_trips_through_chat_and_detection():
    from vlmlab.chat import grounding_text
    from vlmlab.inference import parse_grounding
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = tuple(int(v) for v in rng.integers(56, 1500, 2))
        objs = []
        for k in range(int(rng.integers(1, 4))):
            x1, x2 = np.sort(rng.uniform(0, size[0], 2)); y1, y2 = np.sort(rng.uniform(0, size[1], 2))
            if x2 - x1 < 0.01 * size[0] or y2 - y1 < 0.01 * size[1]: continue
            objs.append({'bbox': [x1, y1, x2, y2], 'label': f'thing {k}'})
        for fam in FAMILIES:
            t = grounding_text(objs, size, fam)
            src = 'pixels' if COORD_SPACE[fam] == 'abs_resized' else 'rel1000'
            assert rescale_answer_text(t, src, fam, size, size, 'r') == t
            want = boxes_to_model([o['bbox'] for o in objs], size, fam) if objs else []
            assert [list(b.values) for b in find_answer_boxes(t)] == want
            assert [o['bbox'] for o in parse_grounding(t, fam)] == [list(map(float, b)) for b in want]


def test_content_lists_and_conversations_keep_their_shape():
    conv = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Where is the cup? bbox: [0, 0, 3000, 2000] is the frame'}]},
            {'role': 'assistant', 'content': '{"bbox_2d": [548, 48, 617, 117], "label": "cup"}'}]
    before = json.dumps(conv)
    out = rescale_answer_text(conv, 'pixels', 'qwen2_5_vl', (3000, 2000), (532, 364), 'rec-2')
    assert json.dumps(conv) == before                                   # the input is not modified
    assert out[0]['content'][0] == {'type': 'image'} and out[0]['role'] == 'user'
    assert out[0]['content'][1]['text'] == 'Where is the cup? bbox: [0, 0, 532, 364] is the frame'
    assert out[1]['content'] == '{"bbox_2d": [97, 9, 109, 21], "label": "cup"}'
    llava = [{'from': 'human', 'value': '<image>\nfind it'}, {'from': 'gpt', 'value': 'bbox: [548, 48, 617, 117]'}]
    assert rescale_answer_text(llava, 'pixels', 'qwen2_5_vl', (3000, 2000), (532, 364), 'r')[1]['value'] == 'bbox: [97, 9, 109, 21]'
    with pytest.raises(AnswerBoxError, match=r"rec-2: box 'bbox' \[0, 0, 3000, 2000\] .* in \[0\]\['content'\]\[1\]\['text'\]: outside"):
        rescale_answer_text(conv, 'pixels', 'qwen2_5_vl', (600, 400), (532, 364), 'rec-2')


# --- faults ----------------------------------------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_boxes_outside_the_original_are_refused(data):
    w, h = data.draw(st.integers(64, 4000)), data.draw(st.integers(64, 4000))
    box = data.draw(int_box(w, h))
    k = data.draw(st.integers(0, 3))
    box[k] = (w if k % 2 == 0 else h) + data.draw(st.integers(1, 500)) if k >= 2 else -data.draw(st.integers(1, 500))
    assume(box[0] < box[2] and box[1] < box[3])
    name = ('x1', 'y1', 'x2', 'y2')[k]
    with pytest.raises(AnswerBoxError, match=rf"^rec-4: box 'bbox' \[.*\].*: outside the {w}x{h} original image's pixels: {name} = "):
        rescale_answer_text(json.dumps({'bbox': box}), 'pixels', 'qwen2_5_vl', (w, h), (w, h), 'rec-4')


@PROPS
@given(st.integers(0, 900), st.integers(0, 900), st.integers(1, 99), st.integers(1, 99), st.booleans(), st.sampled_from(FAMILIES))
def test_swapped_corners_are_refused_in_every_notation(x, y, dx, dy, swap_x, fam):
    b = [x + dx, y, x, y + dy] if swap_x else [x, y + dy, x + dx, y]
    for text in (json.dumps({'bbox_2d': b}), WRITERS['box_tokens'][0](b, 'a'), f'bbox = [{b[0]}, {b[1]}, {b[2]}, {b[3]}]'):
        with pytest.raises(AnswerBoxError, match=rf"rec-5: .*swapped corners \({'x1 > x2' if swap_x else 'y1 > y2'}"):
            rescale_answer_text(text, 'rel1000', fam, (1000, 1000), (1008, 1008), 'rec-5')
        assert 'swapped corners' in answer_box_problems(text, fam, (1008, 1008))[0]


def test_auto_decides_only_unambiguous_numbers():
    args = ('qwen2_5_vl', (3000, 2000), (532, 364), 'rec-6')
    assert rescale_answer_text('{"bbox": [0.5, 0.5, 1, 1]}', 'auto', *args) == rescale_answer_text('{"bbox": [0.5, 0.5, 1, 1]}', 'rel1', *args) \
        == '{"bbox": [266, 182, 532, 364]}'
    assert rescale_answer_text('{"bbox": [10, 20, 2500, 30]}', 'auto', *args) == rescale_answer_text('{"bbox": [10, 20, 2500, 30]}', 'pixels', *args)
    small = ('qwen2_5_vl', (640, 480), (644, 476), 'rec-6')
    assert rescale_answer_text('{"bbox": [10, 500, 30, 600]}', 'auto', *small) == rescale_answer_text('{"bbox": [10, 500, 30, 600]}', 'rel1000', *small)
    for t in ('{"bbox": [10, 20, 30, 40]}', '{"bbox": [0, 0, 1, 1]}'):
        with pytest.raises(AnswerBoxError, match="rec-6: .*cannot tell .*source_space='pixels' or 'rel1000'"):
            rescale_answer_text(t, 'auto', *args)
    # one space per answer: one box past 1000 makes the other box's small numbers pixels too
    two = '{"bbox": [10, 20, 30, 40]} {"bbox": [1500, 20, 2000, 40]}'
    assert rescale_answer_text(two, 'auto', *args) == rescale_answer_text(two, 'pixels', *args)
    with pytest.raises(AnswerBoxError, match='fits neither'):
        rescale_answer_text('{"bbox": [10, 20, 3300, 40]}', 'auto', *args)


def test_tiny_boxes_and_bad_options():
    with pytest.raises(AnswerBoxError, match=r'rec-7: .*no area once written as qwen2_5_vl integers'):
        rescale_answer_text('{"bbox": [100, 100, 101, 300]}', 'pixels', 'qwen2_5_vl', (3000, 2000), (532, 364), 'rec-7')
    with pytest.raises(AnswerBoxError, match=r'rec-7: .*empty \(zero height\)'):
        rescale_answer_text('{"bbox": [100, 100, 200, 100]}', 'pixels', 'qwen2_5_vl', (3000, 2000), (532, 364), 'rec-7')
    with pytest.raises(ValueError, match="source_space 'px'"):
        rescale_answer_text('x', 'px', 'qwen2_5_vl', (3000, 2000), (532, 364), 'r')
    with pytest.raises(ValueError, match="unknown family 'qwen9'"):
        rescale_answer_text('x', 'pixels', 'qwen9', (3000, 2000), (532, 364), 'r')
    # rounding overshoot of an annotation tool is clipped, not refused
    assert rescale_answer_text('bbox: [-0.4, 0, 3000.4, 2000]', 'pixels', 'qwen2_5_vl', (3000, 2000), (532, 364), 'r') == 'bbox: [0, 0, 532, 364]'
    assert rescale_answer_text('bbox: [-0.4, 0, 100.4, 100]', 'pixels', 'qwen2_5_vl', (100, 100), (256, 256), 'r') == 'bbox: [0, 0, 256, 256]'


# --- validation of stored answers ------------------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_stored_answers_outside_the_family_space_are_reported(data):
    fam = data.draw(st.sampled_from(FAMILIES))
    w, h = data.draw(st.integers(56, 2000)), data.draw(st.integers(56, 2000))
    ew, eh = (w, h) if COORD_SPACE[fam] == 'abs_resized' else (1000, 1000)
    good = data.draw(int_box(ew, eh))
    assert answer_box_problems(json.dumps([{'bbox_2d': good, 'label': 'a'}]), fam, (w, h)) == []
    bad = list(good); bad[2] = ew + data.draw(st.integers(1, 3000))
    problems = answer_box_problems('ok ' + json.dumps([{'bbox_2d': good}, {'bbox_2d': bad}]), fam, (w, h))
    assert len(problems) == 1 and problems[0].startswith("box 1: box 'bbox_2d'") and 'x2 = ' in problems[0]


def test_unconverted_normalized_answers_are_reported():
    for fam in FAMILIES:
        p = answer_box_problems('{"bbox_2d": [0.22, 0.35, 0.61, 0.97]}', fam, (644, 476))
        assert len(p) == 1 and "source_space='rel1'" in p[0]
        assert answer_box_problems('[0.22, 0.35, 0.61, 0.97]', fam, (644, 476)) == []   # a fraction list: 0..1 by notation
    assert answer_box_problems('{"bbox_2d": [0, 0, 1, 1]}', 'qwen2_5_vl', (644, 476)) == []   # integers: a valid 1 px box


def test_box_fault_names_the_coordinate():
    b = find_answer_boxes('{"point_2d": [600, 10]}')[0]
    assert box_fault(b, 'abs_resized', (504, 364)) == 'outside pixels of the 504x364 stored image: x = 600 is past 504'
    assert box_fault(b, 'rel1000', (504, 364)) is None
    q = find_answer_boxes(f'{QUAD_START}(1,2),(3,4),(5,6),(7,-8){QUAD_END}')[0]
    assert box_fault(q, 'rel1000', (1, 1)) == 'outside 0..1000 relative coordinates: y4 = -8 is below 0'


def test_answer_objects_refuses_answers_with_problems_and_skips_points():
    with pytest.raises(AnswerBoxError, match=r"^rec-12: box 0: box 'bbox_2d' \[548, 48, 617, 117\]"):
        answer_objects('{"bbox_2d": [548, 48, 617, 117]}', 'qwen2_5_vl', (504, 364), 'rec-12')
    t = f'{OBJECT_REF_START} cup {OBJECT_REF_END}{BOX_START}(100,200),(300,400){BOX_END} {{"point_2d": [1, 2]}}'
    assert answer_objects(t, 'qwen2_5_vl', (500, 300)) == [{'bbox': [50.0, 60.0, 150.0, 120.0], 'label': 'cup'}]


@st.composite
def fraction_box(draw):
    "A 0..1 box written with 1 to 3 decimals, corners in order."
    d = draw(st.integers(1, 3)); n = 10 ** d
    x1 = draw(st.integers(0, n - 1)); x2 = draw(st.integers(x1 + 1, n))
    y1 = draw(st.integers(0, n - 1)); y2 = draw(st.integers(y1 + 1, n))
    return [f"{v / n:.{d}f}" for v in (x1, y1, x2, y2)]


@PROPS
@given(st.lists(st.tuples(prose, fraction_box()), min_size=1, max_size=3), prose, st.data())
def test_fraction_lists_in_prose_are_found_kept_and_validated(pieces, tail, data):
    text = ''.join(f"{p} [{', '.join(b)}] " for p, b in pieces) + tail
    found = find_answer_boxes(text)
    assert [b.items for b in found] == [tuple(b) for _, b in pieces] and {b.form for b in found} == {'rel1_list'}
    fam, spec, orig, resized = data.draw(image_sizes())
    for space in ('pixels', 'rel1000', 'rel1', 'auto'):
        assert rescale_answer_text(text, space, fam, orig, resized, 'r') == text
    assert answer_box_problems(text, fam, resized) == []
    objs = answer_objects(text, fam, resized)
    want = scale_boxes([[float(v) for v in b] for _, b in pieces], (1, 1), resized)
    assert np.abs(np.array([o['bbox'] for o in objs]) - want).max() <= 5e-4


def test_fraction_lists_that_are_no_boxes_are_left_alone():
    for t in ('probabilities [0.4, 0.3, 0.2, 0.1]', '{"scores": [0.1, 0.2, 0.3, 0.4]}', 'counts [0, 1, 1, 1]', '[0.1, 0.2, 0.3]'):
        assert find_answer_boxes(t) == [], t
