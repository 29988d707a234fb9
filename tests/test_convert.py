"""Conversion under bad input, EXIF orientation and interruption: every input accounted for, messages name it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmlab.data import convert, make_shapes, validate
from vlmlab.vision import ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)


def scene(path: Path, size=(300, 200), box=(40, 50, 120, 130), mode='RGB', orientation=1, color=(220, 30, 30)):
    "An image with one red square at `box` in displayed coordinates."
    img = Image.new('RGB', size, (240, 240, 240))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=color)
    stored = {1: img, 6: img.transpose(Image.Transpose.ROTATE_90), 8: img.transpose(Image.Transpose.ROTATE_270),
              3: img.transpose(Image.Transpose.ROTATE_180)}[orientation]
    if mode != 'RGB': stored = stored.convert(mode) if mode != 'I;16' else Image.fromarray((np.asarray(stored.convert('L')).astype(np.uint16) * 257))
    kw = {}
    if orientation != 1:
        exif = Image.Exif(); exif[0x0112] = orientation; kw['exif'] = exif
    stored.save(path, **kw)
    return list(box)


def raw(folder: Path, name: str, objects, image=None, ext='.png', **img_kw):
    img_path = folder / f'{name}{ext}'
    if image is not False: scene(img_path, **img_kw)
    (folder / f'{name}.json').write_text(json.dumps({'image': image or img_path.name, 'objects': objects}))


def rejects(out: Path, split='train'):
    return {r['id']: r['reason'] for r in map(json.loads, (out / f'{split}.rejects.jsonl').read_text().splitlines())}


def test_ten_kinds_of_bad_input(tmp_path):
    src, out = tmp_path / 'raw', tmp_path / 'ds_output'
    src.mkdir()
    good = [{'bbox': [40, 50, 120, 130], 'desc': 'red square'}]
    raw(src, 'ok', good)
    raw(src, 'truncated', good, ext='.jpg')
    data = (src / 'truncated.jpg').read_bytes(); (src / 'truncated.jpg').write_bytes(data[: len(data) // 3])
    raw(src, 'missing', good, image='nowhere.png')
    raw(src, 'cmyk', good, ext='.jpg', mode='CMYK')
    raw(src, 'grey16', good, mode='I;16')
    raw(src, 'nan_box', [{'bbox': [40, float('nan'), 120, 130], 'desc': 'red square'}])
    raw(src, 'swapped', [{'bbox': [120, 50, 40, 130], 'desc': 'red square'}])
    raw(src, 'out_of_bounds', [{'bbox': [40, 50, 420, 130], 'desc': 'red square'}])
    raw(src, 'tiny', [{'bbox': [2, 2, 8, 8], 'desc': 'dot'}], size=(20, 12), box=(2, 2, 8, 8))
    scene(src / 'old.png'); (src / 'old.json').write_text(json.dumps(good))
    (src / 'malformed.json').write_text('{"image": "ok.png", "objects": [')
    summary = convert(src, out, SPEC, progress=False)
    assert summary.inputs == 11 and summary.balanced
    assert summary.written == 3  # ok, cmyk, grey16: converted deterministically, noted
    why = rejects(out)
    expected = {'truncated': 'truncated.jpg: cannot decode image', 'missing': 'nowhere.png: file not found',
                'nan_box': "'nan_box') object 0: bbox has a non-finite value", 'swapped': 'x1 >= x2 (swapped corners',
                'out_of_bounds': 'lies outside the 300x200 image', 'tiny': 'image 20x12 has a side under 28 px',
                'old': 'old list-shaped raw JSON', 'malformed': 'malformed.json: malformed JSON at line 1'}
    assert set(why) == set(expected)
    for sid, text in expected.items():
        assert text in why[sid], (sid, why[sid])
    noted = {k: v for k, v in summary.notes.items()}
    assert noted.get('converted from CMYK to RGB') == ['cmyk'] and noted.get('converted from I;16 to RGB') == ['grey16']
    assert 'cmyk' in str(summary) and 'grey16' in str(summary)

    # wrong family fingerprint, and a duplicate image across splits: caught by validate
    assert validate(out, SPEC, progress=False).ok
    rep = validate(out, ResizeSpec.for_family('qwen2_vl', max_pixels=200704), progress=False)
    assert len(rep.errors) == 3 and all("was converted with resize spec" in e and 'train.jsonl:' in e for e in rep.errors)
    test_src = tmp_path / 'test_raw'; test_src.mkdir()
    shutil.copy(src / 'ok.png', test_src / 'same_picture.png')
    (test_src / 'same_picture.json').write_text(json.dumps({'image': 'same_picture.png', 'objects': good}))
    convert(test_src, out, SPEC, split='test', progress=False)
    rep = validate(out, SPEC, progress=False)
    exact, near = rep.leaks[:1], rep.leaks[1:]
    assert exact == ["train:ok has the same image bytes as test:same_picture"] or \
           exact == ["test:same_picture has the same image bytes as train:ok"]
    # the CMYK input is the same scene in other bytes: a near-duplicate of the test picture (the byte copy is not named twice)
    assert len(near) == 1 and near[0].startswith('test:same_picture and train:cmyk have near-duplicate images'), rep.leaks


def test_orientation_6_boxes_land_on_the_object(tmp_path):
    src, out = tmp_path / 'raw', tmp_path / 'ds'
    src.mkdir()
    raw(src, 'phone', [{'bbox': [200, 40, 260, 100], 'desc': 'red square'}], ext='.jpg', size=(300, 200),
        box=(200, 40, 260, 100), orientation=6)
    assert Image.open(src / 'phone.jpg').size == (200, 300)  # stored sideways
    s = convert(src, out, SPEC, progress=False)
    assert s.written == 1 and s.notes == {'EXIF orientation 6 applied': ['phone']}
    rec = json.loads((out / 'train.jsonl').read_text())
    assert rec['orig_size'] == [300, 200]
    img = np.asarray(Image.open(out / rec['image']).convert('RGB')).astype(int)
    x1, y1, x2, y2 = (int(round(v)) for v in rec['objects'][0]['bbox'])
    inside = img[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3).mean(0)
    outside = img[:, : max(1, x1 - 5)].reshape(-1, 3).mean(0)
    assert inside[0] > 180 and inside[1] < 80, inside     # red under the box
    assert outside[1] > 200                                  # background outside


def test_splits_with_the_same_ids_do_not_overwrite_each_other(tmp_path):
    for split, seed in (('train', 0), ('test', 1)):
        make_shapes(tmp_path / split, n=4, seed=seed, old_format=0)   # both name their samples shapes_00000..3
        convert(tmp_path / split, tmp_path / 'ds', SPEC, split=split, progress=False)
    rep = validate(tmp_path / 'ds', SPEC, progress=False)
    assert rep.ok, str(rep)
    assert len(list((tmp_path / 'ds' / 'images').rglob('*.png'))) == 8


def test_llava_and_coco_inputs(tmp_path):
    scene(tmp_path / 'a.png'); scene(tmp_path / 'b.png', size=(200, 300), box=(10, 10, 60, 60))
    llava = [{'id': 'l1', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nWhat is this?'},
                                                              {'from': 'gpt', 'value': 'A red square.'}]},
             {'id': 'l2', 'image': 'b.png', 'conversations': [{'from': 'human', 'value': 'no image here'},
                                                              {'from': 'gpt', 'value': 'x'}]},
             {'id': 'l3', 'image': 'b.png', 'conversations': [{'from': 'human', 'value': 'Show me.'},   # the template never renders this
                                                              {'from': 'gpt', 'value': '<image>\nHere.'}]}]
    (tmp_path / 'llava.json').write_text(json.dumps(llava))
    s = convert(tmp_path / 'llava.json', tmp_path / 'out1', SPEC, progress=False)
    assert (s.written, s.rejected) == (1, 2) and '0 <image> placeholders' in rejects(tmp_path / 'out1')['l2']
    assert "an <image> placeholder in a 'gpt' turn" in rejects(tmp_path / 'out1')['l3']
    rec = json.loads((tmp_path / 'out1' / 'train.jsonl').read_text())
    assert rec['conversations'][0] == {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}]}
    coco = {'images': [{'id': 1, 'file_name': 'a.png', 'width': 300, 'height': 200},
                       {'id': 2, 'file_name': 'b.png', 'width': 300, 'height': 200}],   # wrong size: b is 200x300
            'annotations': [{'id': 9, 'image_id': 1, 'bbox': [40, 50, 80, 80], 'category_id': 3, 'iscrowd': 0}],
            'categories': [{'id': 3, 'name': 'square'}]}
    (tmp_path / 'coco.json').write_text(json.dumps(coco))
    s = convert(tmp_path / 'coco.json', tmp_path / 'out2', SPEC, progress=False)
    assert (s.written, s.rejected) == (1, 1)
    assert 'annotation says 300x200 but b.png is 200x300' in rejects(tmp_path / 'out2')['2']
    rec = json.loads((tmp_path / 'out2' / 'train.jsonl').read_text())
    sx, sy = rec['size'][0] / 300, rec['size'][1] / 200
    assert np.allclose(rec['objects'][0]['bbox'], [40 * sx, 50 * sy, 120 * sx, 130 * sy], atol=1e-3)


def test_killed_conversion_never_looks_complete_and_rerun_matches(tmp_path):
    src = tmp_path / 'raw'
    make_shapes(src, n=120, seed=3, old_format=0.0)
    ref = tmp_path / 'ref'
    convert(src, ref, SPEC, progress=False)
    expected = (ref / 'train.jsonl').read_bytes()
    vlmlab = Path(sys.executable).parent / 'vlmlab'
    out = tmp_path / 'killed'
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.5, 3.0, 3):
        p = subprocess.Popen([str(vlmlab), 'convert', str(src), '--out', str(out), '--max-pixels', '200704', '--quiet'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL); p.wait()
        jsonl = out / 'train.jsonl'
        if jsonl.exists():   # only ever the complete file, written by the final rename
            assert jsonl.read_bytes() == expected and (out / 'train.summary.json').exists()
        for img in (out / 'images' / 'train').glob('*.png'):   # every visible image is complete
            Image.open(img).load()
    r = subprocess.run([str(vlmlab), 'convert', str(src), '--out', str(out), '--max-pixels', '200704', '--quiet'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / 'train.jsonl').read_bytes() == expected
    assert not list(out.glob('.*.tmp-*')) and not list((out / 'images' / 'train').glob('.*.tmp-*'))
    assert sorted(p.name for p in (out / 'images' / 'train').iterdir()) == sorted(p.name for p in (ref / 'images' / 'train').iterdir())


def test_validate_refuses_paths_escaping_ds_output(tmp_path):
    src, out = tmp_path / 'raw', tmp_path / 'ds'
    src.mkdir()
    raw(src, 'a', [{'bbox': [40, 50, 120, 130], 'desc': 'red square'}])
    convert(src, out, SPEC, progress=False)
    rec = json.loads((out / 'train.jsonl').read_text())
    outside = tmp_path / 'outside.png'
    shutil.copy(out / rec['image'], outside)
    (out / rec['image']).unlink()
    (out / rec['image']).symlink_to(outside)          # a symlink inside ds_output/ pointing out of it
    rep = validate(out, SPEC, progress=False)
    assert not rep.ok and 'resolves outside ds_output/' in rep.errors[0]
    for bad in ('/etc/hosts', '../raw/a.png'):
        (out / 'train.jsonl').write_text(json.dumps(dict(rec, image=bad)) + '\n')
        rep = validate(out, SPEC, progress=False)
        assert not rep.ok and 'must be relative to ds_output/' in rep.errors[0]


def _near_copy(raw_dir: Path, dst: Path, scale: float = 0.8) -> str:
    "Write into `dst` a resized JPEG copy (other bytes, same picture) of the first PNG image of `raw_dir`; its source's id."
    src = next(p for p in sorted(raw_dir.glob('*.json')) if isinstance(d := json.loads(p.read_text()), dict) and d['image'].endswith('.png'))
    d = json.loads(src.read_text())
    im = Image.open(raw_dir / d['image']).convert('RGB')
    im.resize((int(im.width * scale), int(im.height * scale))).save(dst / 'copy.jpg', quality=70)
    d['image'], d['objects'] = 'copy.jpg', [dict(o, bbox=[int(v * scale) for v in o['bbox']]) for o in d['objects']]
    (dst / 'copy.json').write_text(json.dumps(d))
    return src.stem


def test_validate_fails_on_a_near_duplicate_image_across_splits_naming_both(tmp_path):
    make_shapes(tmp_path / 'raw', n=16, seed=2, old_format=0)
    convert(tmp_path / 'raw', tmp_path / 'ds', SPEC, progress=False)
    make_shapes(tmp_path / 'raw_test', n=6, seed=9, old_format=0)
    convert(tmp_path / 'raw_test', tmp_path / 'ds', SPEC, split='test', progress=False)
    clean = validate(tmp_path / 'ds', SPEC, progress=False)
    assert clean.ok and clean.leaks == [] and clean.warnings == [], str(clean)   # control: distinct images are no leak
    source = _near_copy(tmp_path / 'raw', tmp_path / 'raw_test')
    convert(tmp_path / 'raw_test', tmp_path / 'ds', SPEC, split='test', progress=False)
    rep = validate(tmp_path / 'ds', SPEC, progress=False)
    assert not rep.ok and len(rep.leaks) == 1 and not rep.errors, str(rep)
    assert 'near-duplicate image' in rep.leaks[0] and 'test:copy' in rep.leaks[0] and f'train:{source}' in rep.leaks[0]
    assert f'LEAK  {rep.leaks[0]}' in str(rep) and 'FAILED' in str(rep)
    allowed = validate(tmp_path / 'ds', SPEC, progress=False, allow_near_duplicates=True)
    assert allowed.ok and allowed.leaks == [] and allowed.warnings == [rep.leaks[0] + ' (allowed)'] and 'WARN' in str(allowed)
    strict = validate(tmp_path / 'ds', SPEC, progress=False, near_duplicate_difference=0.0)
    assert strict.ok, str(strict)   # a threshold no re-encoded copy meets: the pair is no longer a copy
    unopened = validate(tmp_path / 'ds', SPEC, check_images=False, progress=False)
    assert unopened.ok and unopened.warnings == ['near-duplicate images across splits not checked (images not opened)']
    with pytest.raises(ValueError, match='near_duplicate_difference must be >= 0'):
        validate(tmp_path / 'ds', SPEC, progress=False, near_duplicate_difference=-1)
