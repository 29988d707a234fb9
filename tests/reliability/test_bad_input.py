"""Bad input across conversion, validation, chat processing, collation, tokens and configs: each case fails with an
error that names the file or sample and the problem, and conversion accounts for every input."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reliability_kit import case, raw_sample, red_fraction, scene
from vlmlab.chat import ChatError, ChatProcessor, ProcessedSample
from vlmlab.collators import CollatorError, PackedDataCollator, StandardDataCollator
from vlmlab.data import clean_raw_dir, convert, read_jsonl, validate
from vlmlab.config import ConfigError, VLMLabConfig
from vlmlab.vision import FingerprintMismatch, ResizeError, ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)
GROUP = 'Bad input: conversion'
validation_case = functools.partial(case, group='Bad input: validation')
chat_case = functools.partial(case, group='Bad input: chat processing')
collation_case = functools.partial(case, group='Bad input: collation')
tokens_case = functools.partial(case, group='Bad input: tokens')
config_case = functools.partial(case, group='Bad input: configs')
SQUARE = [{'bbox': [40, 50, 120, 130], 'desc': 'red square'}]


def transparent_rgba() -> Image.Image:
    "A fully transparent canvas with an opaque red square at (40, 50, 120, 130)."
    img = Image.new('RGBA', (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([40, 50, 119, 129], fill=(220, 30, 30, 255))
    return img


def transparent_palette() -> Image.Image:
    "A palette image whose index 0 is transparent, with a red square in index 1."
    img = Image.new('P', (300, 200), 0)
    img.putpalette([0, 0, 0, 220, 30, 30] + [0, 0, 0] * 254)
    ImageDraw.Draw(img).rectangle([40, 50, 119, 129], fill=1)
    img.info['transparency'] = 0
    return img


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    "One conversion of raw, COCO and LLaVA inputs full of bad cases: (summary, out folder, rejects by id, records by id)."
    work = tmp_path_factory.mktemp('bad_input')
    raw = work / 'raw'; raw.mkdir()
    raw_sample(raw, 'good')
    raw_sample(raw, 'rgba_transparent', SQUARE, image=transparent_rgba())
    raw_sample(raw, 'palette', mode='P')
    raw_sample(raw, 'palette_transparent', SQUARE, image=transparent_palette())
    raw_sample(raw, 'one_pixel', [], image=Image.new('RGB', (1, 1)))
    wide = Image.new('RGB', (20000, 1000), (240, 240, 240)); ImageDraw.Draw(wide).rectangle([10000, 300, 10999, 899], fill=(220, 30, 30))
    raw_sample(raw, 'wide_20000', [{'bbox': [10000, 300, 11000, 900], 'desc': 'red bar'}], image=wide)
    raw_sample(raw, 'ratio_250', [], image=Image.new('RGB', (20000, 80)))
    raw_sample(raw, 'ratio_over_200_after_resize', [], image=Image.new('RGB', (20000, 100)))
    for o in (2, 3, 4, 5, 7, 8):
        raw_sample(raw, f'exif_{o}', ext='.jpg', orientation=o, quality=95)
    raw_sample(raw, 'box_inf', [{'bbox': [40, 50, float('inf'), 130], 'desc': 'red square'}])
    raw_sample(raw, 'box_y_swapped', [{'bbox': [40, 130, 120, 50], 'desc': 'red square'}])
    raw_sample(raw, 'box_zero_width', [{'bbox': [40, 50, 40, 130], 'desc': 'red square'}])
    raw_sample(raw, 'box_bool', [{'bbox': [True, 50, 120, 130], 'desc': 'red square'}])
    raw_sample(raw, 'box_in_border_band', [{'bbox': [300.2, 50, 300.4, 130], 'desc': 'sliver'}])
    raw_sample(raw, 'box_vanishes_when_resized', [{'bbox': [40, 50, 40.0001, 130], 'desc': 'hair'}])
    raw_sample(raw, 'second_box_bad', SQUARE + [{'bbox': [10, 10, 20], 'desc': 'three numbers'}])
    raw_sample(raw, 'empty_objects', [])
    raw_sample(raw, 'no_label', [{'bbox': [40, 50, 120, 130]}])
    scene(raw / 'objects_not_list.png'); (raw / 'objects_not_list.json').write_text('{"image": "objects_not_list.png", "objects": 5}')
    (raw / 'not_utf8.json').write_bytes(b'\xff\xfe{"image": "good.png"}')
    (raw / 'json_number.json').write_text('42')
    (raw / 'empty_file.json').write_text('')
    (raw / 'deeply_nested.json').write_text('[' * 100_000)
    # COCO: [x, y, w, h] boxes, a negative width, an unknown category, a 3-number box, a wrong declared size
    coco_dir = work / 'coco'; coco_dir.mkdir()
    for k in range(1, 5): scene(coco_dir / f'c{k}.png')
    coco = {'images': [{'id': 101, 'file_name': 'c1.png', 'width': 300, 'height': 200},
                       {'id': 102, 'file_name': 'c2.png', 'width': 300, 'height': 200},
                       {'id': 103, 'file_name': 'c3.png', 'width': 300, 'height': 200},
                       {'id': 104, 'file_name': 'c4.png', 'width': 300, 'height': 200}],
            'annotations': [{'id': 1, 'image_id': 101, 'bbox': [40, 50, 80, 80], 'category_id': 1},
                            {'id': 2, 'image_id': 102, 'bbox': [120, 50, -80, 80], 'category_id': 1},
                            {'id': 3, 'image_id': 103, 'bbox': [40, 50, 80, 80], 'category_id': 7},
                            {'id': 4, 'image_id': 104, 'bbox': [40, 50, 80], 'category_id': 1}],
            'categories': [{'id': 1, 'name': 'square'}]}
    (coco_dir / 'coco.json').write_text(json.dumps(coco))
    # LLaVA: two <image> placeholders, no assistant turn, an item that is not an object
    llava_dir = work / 'llava'; llava_dir.mkdir(); scene(llava_dir / 'l.png')
    turn = lambda who, text: {'from': who, 'value': text}
    llava = [{'id': 'llava_ok', 'image': 'l.png', 'conversations': [turn('human', '<image>\nWhat?'), turn('gpt', 'A square.')]},
             {'id': 'llava_two_images', 'image': 'l.png', 'conversations': [turn('human', '<image><image>'), turn('gpt', 'x')]},
             {'id': 'llava_no_answer', 'image': 'l.png', 'conversations': [turn('human', '<image>\nWhat?')]},
             'not an object']
    (llava_dir / 'llava.json').write_text(json.dumps(llava))
    out = work / 'ds_output'
    s = convert([raw, coco_dir / 'coco.json', llava_dir / 'llava.json'], out, SPEC, progress=False)
    rejects = {r['id']: r for r in map(json.loads, (out / 'train.rejects.jsonl').read_text().splitlines())}
    records = {r['id']: r for _, r, _ in read_jsonl(out / 'train.jsonl')}
    return s, out, rejects, records


REJECTED = [  # sample id, case, what the reason must say (besides naming the sample's file)
    ('one_pixel', '1-pixel image', 'image 1x1 has a side under 28 px'),
    ('ratio_250', 'aspect ratio 250 (20000x80)', 'aspect ratio 250.0 of 20000x80 exceeds 200'),
    ('ratio_over_200_after_resize', 'aspect ratio 200 that exceeds 200 once resized (20000x100)',
     '20000x100 resizes to 6328x28, whose aspect ratio 226.0 exceeds 200'),
    ('box_inf', 'box with an infinite coordinate', 'object 0: bbox has a non-finite value'),
    ('box_y_swapped', 'box with y1 > y2 (swapped order)', 'object 0: bbox [40, 130, 120, 50] has y1 >= y2 (swapped corners'),
    ('box_zero_width', 'box of zero width', 'has x1 >= x2 (zero width or height)'),
    ('box_bool', 'box with a JSON boolean coordinate', 'object 0: bbox has a non-number'),
    ('box_in_border_band', 'box only inside the 0.5 px border tolerance', 'object 0: bbox [300.2, 50, 300.4, 130] has no area inside the 300x200 image'),
    ('box_vanishes_when_resized', 'box thinner than the stored precision', 'object 0: bbox [40, 50, 40.0001, 130] has no area'),
    ('second_box_bad', 'second of two boxes malformed', 'object 1: bbox must be 4 numbers'),
    ('no_label', 'object without label', 'object 0: missing label/desc text'),
    ('objects_not_list', "'objects' is not a list", "'objects' must be a list"),
    ('not_utf8', 'raw JSON that is not UTF-8', 'cannot read'),
    ('json_number', 'raw JSON that is a number', 'raw annotation must be an object or (old format) a list, got int'),
    ('empty_file', 'empty raw JSON file', 'malformed JSON at line 1 column 1'),
    ('deeply_nested', 'raw JSON nested 100,000 deep', 'nested too deeply'),
    ('102', 'COCO box with negative width', 'annotation 2: bbox [120, 50, -80, 80]'),
    ('103', 'COCO unknown category', 'annotation 3: unknown category_id 7'),
    ('104', 'COCO box with 3 numbers', 'annotation 4: bbox must be [x, y, w, h]'),
    ('llava_two_images', 'LLaVA sample with two <image> placeholders', '2 <image> placeholders'),
    ('llava_no_answer', 'LLaVA sample without an assistant turn', 'no assistant (gpt) turn'),
    ('llava-3', 'LLaVA item that is not an object', "llava.json[3]: missing 'image'"),
]


@pytest.mark.parametrize('sid,fragment', [pytest.param(sid, frag, id=sid, marks=case(name, f'rejected: "{frag}"'))
                                          for sid, name, frag in REJECTED])
def test_rejected_with_reason(converted, sid, fragment):
    _, _, rejects, records = converted
    assert sid not in records
    reason = rejects[sid]['reason']
    assert fragment in reason, reason
    source = rejects[sid]['source']
    assert source.split(' ')[0].split('[')[0] in reason, (source, reason)   # names the file the input came from


@case('counts balance over 36 mixed raw, COCO and LLaVA inputs', 'inputs = written + rejected; every input is in train.jsonl or train.rejects.jsonl once')
def test_counts_balance(converted):
    s, out, rejects, records = converted
    n_raw = len(list((out.parent / 'raw').glob('*.json')))
    assert s.inputs == n_raw + 4 + 4 == s.written + s.rejected and s.balanced
    assert (s.written, s.rejected) == (len(records), len(rejects))
    assert len((out / 'train.jsonl').read_text().splitlines()) == s.written
    assert len((out / 'train.rejects.jsonl').read_text().splitlines()) == s.rejected
    assert sum(s.reasons.values()) == s.rejected
    summary = json.loads((out / 'train.summary.json').read_text())
    assert summary['balanced'] and summary['inputs'] == s.inputs
    assert validate(out, SPEC, progress=False).ok   # whatever conversion wrote, validation accepts


def _stored(out: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(out / rec['image']).convert('RGB'))


@case('RGBA image with transparent background', 'converted on white (not black), noted "converted from RGBA to RGB"')
def test_rgba_on_white(converted):
    s, out, _, records = converted
    rec = records['rgba_transparent']; img = _stored(out, rec)
    assert red_fraction(img, rec['objects'][0]['bbox']) > 0.95
    assert img[2, 2].tolist() == [255, 255, 255]
    assert 'rgba_transparent' in s.notes['converted from RGBA to RGB']


@pytest.mark.parametrize('sid', [pytest.param('palette', marks=case('palette (P) image', 'converted with its colours; box on the object')),
                                 pytest.param('palette_transparent', marks=case('palette image with a transparent index',
                                                                                'transparent pixels become white; box on the object'))])
def test_palette(converted, sid):
    _, out, _, records = converted
    rec = records[sid]; img = _stored(out, rec)
    assert red_fraction(img, rec['objects'][0]['bbox']) > 0.95
    assert img[2, 2].tolist() == ([255, 255, 255] if sid == 'palette_transparent' else [240, 240, 240])


@case('20,000-pixel-wide image (20000x1000)', 'downscaled once to 1988x84 within max_pixels; the box still covers the object')
def test_very_wide_image(converted):
    _, out, _, records = converted
    rec = records['wide_20000']
    assert rec['orig_size'] == [20000, 1000] and rec['size'] == [1988, 84] and 1988 * 84 <= SPEC.max_pixels
    assert red_fraction(_stored(out, rec), rec['objects'][0]['bbox']) > 0.9


@pytest.mark.parametrize('orientation', [pytest.param(o, marks=case(f'EXIF orientation {o}', 'transpose applied before reading the size; '
                                                                    'the box lands on the object; noted in the summary'))
                                         for o in (2, 3, 4, 5, 7, 8)])
def test_exif_orientation(converted, orientation):
    s, out, _, records = converted
    rec = records[f'exif_{orientation}']
    assert rec['orig_size'] == [300, 200]
    assert red_fraction(_stored(out, rec), rec['objects'][0]['bbox']) > 0.9
    assert s.notes[f'EXIF orientation {orientation} applied'] == [f'exif_{orientation}']


@case('empty object list', 'converted as a negative sample; its grounding labels are "[]<|im_end|>" (not an empty label)')
def test_empty_object_list(converted, tiny_processors):
    _, out, _, records = converted
    rec = records['empty_objects']
    assert rec['objects'] == []
    tok, ip = tiny_processors
    s = ChatProcessor(tok, ip, 'qwen2_5_vl', out)(rec)   # SPEC is the tiny kit's spec: same fingerprint
    assert tok.decode(s.labels[s.labels != -100]) == '[]<|im_end|>'


@case('COCO file: one good image among bad ones', 'the good image converts with [x, y, w, h] turned into xyxy')
def test_coco_good_image(converted):
    _, _, _, records = converted
    rec = records['101']
    sx, sy = rec['size'][0] / 300, rec['size'][1] / 200
    assert np.allclose(rec['objects'][0]['bbox'], [40 * sx, 50 * sy, 120 * sx, 130 * sy], atol=1e-3)


@case('old-format raw JSON with --migrate-old / clean-raw-json', 'migrated and converted; an old file without an image next to it '
      'is rejected naming the lookup')
def test_old_format_migration(tmp_path):
    raw = tmp_path / 'raw'; raw.mkdir()
    scene(raw / 'old.png'); (raw / 'old.json').write_text(json.dumps(SQUARE))
    (raw / 'orphan.json').write_text(json.dumps(SQUARE))
    s = convert(raw, tmp_path / 'a', SPEC, migrate_old=True, progress=False)
    assert (s.written, s.rejected) == (1, 1) and s.balanced
    why = json.loads((tmp_path / 'a' / 'train.rejects.jsonl').read_text())['reason']
    assert 'orphan.json: no image named orphan.* next to it' in why
    counts = clean_raw_dir(raw)
    assert counts == {'migrated': 1, 'current': 0, 'failed': 1}
    assert json.loads((raw / 'old.json').read_text()) == {'image': 'old.png', 'objects': SQUARE}
    s = convert(raw, tmp_path / 'b', SPEC, progress=False)   # no flag needed any more
    assert (s.written, s.rejected) == (1, 1)
    assert (tmp_path / 'a' / 'train.jsonl').read_text() == (tmp_path / 'b' / 'train.jsonl').read_text()


# ---- validation of ds_output

@pytest.fixture
def ds_copy(tiny_ds, tmp_path):
    "A private copy of the tiny ds_output to damage."
    root, recs = tiny_ds
    shutil.copytree(root, tmp_path / 'ds_output')
    return tmp_path / 'ds_output', recs


@validation_case('malformed JSONL lines (truncated, not an object, not UTF-8, blank)',
      'validate names train.jsonl:<line> for each bad line and keeps checking the rest; no crash')
def test_malformed_jsonl_lines(ds_copy, tiny_spec):
    root, recs = ds_copy
    lines = (root / 'train.jsonl').read_bytes().splitlines(keepends=True)
    bad = lines[:2] + [b'{"id": "cut", "image": "im\n', b'[1, 2]\n', b'\n', b'{"id": "\xff\xfe"}\n'] + lines[2:]
    (root / 'train.jsonl').write_bytes(b''.join(bad))
    rep = validate(root, tiny_spec, progress=False)
    assert rep.counts == {'train': len(recs)}
    assert len(rep.errors) == 3, rep.errors
    assert rep.errors[0].startswith('train.jsonl:3') and 'malformed JSON' in rep.errors[0]
    assert rep.errors[1].startswith('train.jsonl:4') and 'must be a JSON object, got list' in rep.errors[1]
    assert rep.errors[2].startswith('train.jsonl:6') and 'not UTF-8' in rep.errors[2]


@pytest.mark.parametrize('field,value,fragment', [
    pytest.param('orig_size', ['300', None], "orig_size must be [width, height]", id='orig_size-strings',
                 marks=validation_case('record with non-numeric orig_size', 'validate names the line and "orig_size must be [width, height]"; no crash')),
    pytest.param('size', [112], "size must be [width, height]", id='size-one-number',
                 marks=validation_case('record with a 1-element size', 'validate names the line and "size must be [width, height]"; no crash')),
    pytest.param('resize', {'family': ['x'], 'patch_size': 14, 'merge_size': 2, 'min_pixels': 1, 'max_pixels': 2, 'fingerprint': 'x'},
                 'resize entry is not a ResizeSpec', id='resize-bad-family',
                 marks=validation_case('record with a malformed resize entry', 'validate names the line and "resize entry is not a ResizeSpec"')),
])
def test_corrupt_record_fields(ds_copy, tiny_spec, field, value, fragment):
    root, recs = ds_copy
    (root / 'train.jsonl').write_text(json.dumps(dict(recs[0], **{field: value})) + '\n'
                                      + ''.join(json.dumps(r) + '\n' for r in recs[1:]))
    rep = validate(root, tiny_spec, progress=False)
    assert len(rep.errors) == 1 and rep.errors[0].startswith(f"train.jsonl:1 ('{recs[0]['id']}')") and fragment in rep.errors[0], rep.errors


@validation_case('duplicate record id; image edited after conversion', 'validate: "duplicate id" and "changed since conversion (sha256)", each naming the line')
def test_duplicate_and_changed_image(ds_copy, tiny_spec):
    root, recs = ds_copy
    with open(root / 'train.jsonl', 'a') as f: f.write(json.dumps(recs[1]) + '\n')
    img = Image.open(root / recs[2]['image']).convert('RGB'); img.putpixel((0, 0), (1, 2, 3)); img.save(root / recs[2]['image'])
    rep = validate(root, tiny_spec, progress=False)
    assert any(e.startswith(f"train.jsonl:{len(recs) + 1} ('{recs[1]['id']}')") and 'duplicate id' in e for e in rep.errors), rep.errors
    assert any(e.startswith(f"train.jsonl:3 ('{recs[2]['id']}')") and 'changed since conversion (sha256)' in e for e in rep.errors), rep.errors


@validation_case('boxes in 0-1000 coordinates stored for Qwen2.5-VL (pixel coordinates)', 'validate: "object k: bbox ... outside the WxH" naming the line')
def test_wrong_coordinate_space(ds_copy, tiny_spec):
    root, recs = ds_copy
    rec = recs[0]
    w, h = rec['size']
    rel = [[v * 1000 / (w, h)[k % 2] for k, v in enumerate(o['bbox'])] for o in rec['objects']]
    first_out = next(k for k, b in enumerate(rel) if b[2] > w or b[3] > h)
    (root / 'train.jsonl').write_text(json.dumps(dict(rec, objects=[dict(o, bbox=b) for o, b in zip(rec['objects'], rel)])) + '\n')
    rep = validate(root, tiny_spec, progress=False)
    assert len(rep.errors) == 1 and f'object {first_out}: bbox' in rep.errors[0] and f"outside the {w}x{h}" in rep.errors[0], rep.errors


@validation_case('resize fingerprint edited to another spec', 'validate: "resize fingerprint ... does not match its own spec"')
def test_forged_fingerprint(ds_copy, tiny_spec):
    root, recs = ds_copy
    other = ResizeSpec.for_family('qwen2_vl', max_pixels=200704).fingerprint
    (root / 'train.jsonl').write_text(json.dumps(dict(recs[0], resize=dict(recs[0]['resize'], fingerprint=other))) + '\n')
    rep = validate(root, progress=False)
    assert len(rep.errors) == 1 and 'does not match its own spec' in rep.errors[0]


# ---- chat processing

@chat_case('image tokens exceed max_length', 'ChatError names the sample, its token count, max_length and where the image ends; counted as truncated')
def test_image_tokens_exceed_max_length(tiny_ds, tiny_processors):
    root, recs = tiny_ds
    tok, ip = tiny_processors
    proc = ChatProcessor(tok, ip, 'qwen2_5_vl', root, max_length=20)
    with pytest.raises(ChatError, match=rf"sample '{recs[0]['id']}': \d+ tokens > max_length 20, and the cut would go through an image "
                                        r"\(its vision tokens end at position \d+\)"):
        proc(recs[0])
    assert proc.stats.truncated == 1


@chat_case('labels that would be empty after truncation', 'ChatError "no label tokens after truncating N tokens" naming the sample; '
      'zero_label counted and advised')
def test_labels_would_be_empty(tiny_ds, tiny_processors):
    root, recs = tiny_ds
    tok, ip = tiny_processors
    full = ChatProcessor(tok, ip, 'qwen2_5_vl', root)(recs[0])
    first_answer = full.spans['student'][0][0]
    proc = ChatProcessor(tok, ip, 'qwen2_5_vl', root, max_length=first_answer)
    with pytest.raises(ChatError, match=rf"sample '{recs[0]['id']}': no label tokens after truncating {len(full) - first_answer} tokens"):
        proc(recs[0])
    assert proc.stats.zero_label == 1 and any('no label tokens' in a for a in proc.stats.advice())


@chat_case('record converted for Qwen2.5-VL fed to a Qwen2-VL processor', 'FingerprintMismatch names the sample and both resize specs')
def test_wrong_family_in_chat(tiny_ds):
    from transformers import AutoImageProcessor, AutoTokenizer
    from vlmlab.tiny import tiny_kit
    root, recs = tiny_ds
    proc = ChatProcessor(AutoTokenizer.from_pretrained(tiny_kit('qwen2_vl')), AutoImageProcessor.from_pretrained(tiny_kit('qwen2_vl')),
                         'qwen2_vl', root)
    with pytest.raises(FingerprintMismatch, match=rf"sample '{recs[0]['id']}' was converted with resize spec .*'family': 'qwen2_5_vl'.* "
                                                  r"but the processor in use is .*'family': 'qwen2_vl'"):
        proc(recs[0])


@chat_case('stored image replaced by one of another size', 'ChatError: "the processor resized the stored WxH image again", naming the sample')
def test_stored_image_resized_again(ds_copy, tiny_processors):
    root, recs = ds_copy
    tok, ip = tiny_processors
    rec = recs[0]
    Image.open(root / rec['image']).resize((rec['size'][0] * 2, rec['size'][1] * 2)).save(root / rec['image'])
    with pytest.raises(ChatError, match=rf"sample '{rec['id']}': the processor resized the stored {rec['size'][0]}x{rec['size'][1]} image again"):
        ChatProcessor(tok, ip, 'qwen2_5_vl', root)(rec)


@chat_case("target 'conversation' on a record without conversations", 'ChatError names the sample')
def test_conversation_target_without_conversations(tiny_ds, tiny_processors):
    root, recs = tiny_ds
    with pytest.raises(ChatError, match=rf"sample '{recs[0]['id']}': target 'conversation' but the record has no conversations"):
        ChatProcessor(*tiny_processors, 'qwen2_5_vl', root, target='conversation')(recs[0])


# ---- collation

def _sample(sid: str, n_text: int, grid: list[int] | None, n_pad: int) -> ProcessedSample:
    "A processed sample: n_text text tokens then n_pad image tokens (for a grid, or none)."
    ids = torch.arange(10, 10 + n_text + n_pad)
    mm = torch.tensor([0] * n_text + [1] * n_pad, dtype=torch.int32)
    g = torch.tensor([grid]) if grid else None
    pv = torch.zeros(int(g.prod()), 4) if grid else None
    return ProcessedSample(sid, ids, ids.clone(), mm, torch.ones_like(mm), pv, g, {}, [])


@pytest.mark.parametrize('bad', [
    pytest.param(_sample('bad_grid', 5, [1, 4, 4], 3), id='pads-vs-grid',
                 marks=collation_case('packed sample whose image tokens do not match its grid', 'CollatorError names the sample and the mismatch')),
    pytest.param(_sample('no_grid', 5, None, 4), id='pads-without-grid',
                 marks=collation_case('packed sample with image tokens but no image_grid_thw', 'CollatorError names the sample (not a bare StopIteration)')),
])
def test_packed_sample_contract(bad):
    good = _sample('good', 6, [1, 4, 4], 4)
    with pytest.raises(CollatorError, match=rf"sample '{bad.id}': .*image"):
        PackedDataCollator(0)([good, bad])


@collation_case('empty batch', 'both collators raise CollatorError "empty batch" instead of an obscure max()/cat() error')
def test_empty_batch():
    for collator in (StandardDataCollator(0), PackedDataCollator(0)):
        with pytest.raises(CollatorError, match='empty batch'):
            collator([])


# ---- tokens

@tokens_case('tokenizer with <|image_pad|> moved (load_model)', 'SpecialTokenError before training: names the token, its id, the expected id '
      'and config.image_token_id')
def test_moved_special_token_refused_by_load_model(tmp_path):
    from transformers import AutoTokenizer
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    from vlmlab.tiny import tiny_kit, tokenizer_with_moved_token
    from vlmlab.tokens import IMAGE_PAD, VISION_START, SpecialTokenError
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(tiny_kit('qwen2_5_vl'), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    old, new = tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(VISION_START)
    tokenizer_with_moved_token(tok, IMAGE_PAD, new).save_pretrained(ckpt)
    with pytest.raises(SpecialTokenError) as e:
        load_model(ModelConfig(name_or_path=str(ckpt)))
    msg = str(e.value)
    assert f'<|image_pad|> has id {new} in the tokenizer, expected {old}' in msg
    assert f'config.image_token_id = {old} but the tokenizer has <|image_pad|> = {new}' in msg


# ---- configs

@config_case('min_pixels > max_pixels on the command line', 'vlmlab convert exits 2: "min_pixels 900000 > max_pixels 200704"; nothing written')
def test_cli_min_pixels_above_max(tmp_path, capsys):
    from vlmlab.cli import main
    raw = tmp_path / 'raw'; raw.mkdir(); raw_sample(raw, 'a')
    assert main(['convert', str(raw), '--out', str(tmp_path / 'out'), '--min-pixels', '900000', '--max-pixels', '200704', '--quiet']) == 2
    assert 'min_pixels 900000 > max_pixels 200704' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@config_case("min_pixels > max_pixels in a checkpoint's preprocessor_config.json", 'ResizeError names the checkpoint folder, the file and both values')
def test_checkpoint_min_pixels_above_max(tmp_path):
    from vlmlab.tiny import tiny_kit
    ckpt = tmp_path / 'ckpt'; shutil.copytree(tiny_kit('qwen2_5_vl'), ckpt)
    cfg = json.loads((ckpt / 'preprocessor_config.json').read_text())
    cfg['size'] = {'shortest_edge': 900000, 'longest_edge': 200704}
    (ckpt / 'preprocessor_config.json').write_text(json.dumps(cfg))
    with pytest.raises(ResizeError, match=rf"{ckpt}: .*preprocessor_config.json.*min_pixels 900000 > max_pixels 200704"):
        ResizeSpec.from_pretrained(ckpt)


CONFIG_CASES = [  # (config, what the ConfigError must say, case)
    ({'stage': {'name': 'stage3'}}, "stage.name: 'stage3' is not a stage; allowed: full, head, stage1, stage2", 'unknown stage name'),
    ({'stage': {'trainable': ['visoin']}}, "stage.trainable: unknown module group 'visoin'; allowed: vision, merger, llm, experts, router, adapter, head",
     'unknown trainable module group'),
    ({'stage': {'lrs': {'visoin': 1e-5}}}, "stage.lrs.visoin: unknown module group; allowed: vision, merger, llm, experts, router, adapter, head",
     'unknown key in stage.lrs (a misspelt group would silently get no learning rate)'),
    ({'training': {'epochs': 'two'}}, "training.epochs: expected float, got str 'two'", 'string where a number is expected'),
    ({'training': {'seed': True}}, 'training.seed: expected int, got bool True', 'boolean where an integer is expected'),
    ({'stage': {'lrs': {'llm': 'fast'}}}, "stage.lrs.llm: expected float, got str 'fast'", 'wrong type inside a mapping'),
    ({'data': None}, 'data: expected a mapping, got NoneType None', 'section that is null'),
]


@pytest.mark.parametrize('cfg,fragment', [pytest.param(c, f, id=n, marks=config_case(f'config: {n}', f'ConfigError: "{f}"'))
                                          for c, f, n in CONFIG_CASES])
def test_config_errors_name_key_and_allowed_values(tmp_path, cfg, fragment):
    import yaml
    path = tmp_path / 'run.yaml'; path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        VLMLabConfig.from_yaml(path)
    assert str(e.value) == f'{path}: {fragment}' or str(e.value).startswith(f'{path}: {fragment}'), str(e.value)
