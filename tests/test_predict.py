"""predict_files: folders expanded deterministically, EXIF applied as in conversion, the head path equal to detect(),
the text path's boxes back in original pixels, unreadable files named and counted, output written atomically."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.chat import grounding_text
from vlmlab.config import VLMLabConfig
from vlmlab.data import convert, make_shapes
from vlmlab.export import export_for_serving, load_trained
from vlmlab.families import family_record
from vlmlab.inference import detect
from vlmlab.predict import detect_command, draw_boxes, image_files, predict_files, predict_image
from vlmlab.tiny import VLM_FAMILIES, tiny_kit
from vlmlab.tokens import IM_END
from vlmlab.trainer import train_from_config
from vlmlab.vision import ResizeSpec, load_image, scale_boxes


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A 2-step run with a detection head, and a folder of images."
    work = tmp_path_factory.mktemp('predict')
    make_shapes(work / 'raw', n=8, seed=4, old_format=0, exif_rotated=0, size_range=(112, 160), max_objects=2)
    convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False)
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(work / 'ds'), 'target': 'grounding'},
        'stage': {'name': 'stage2', 'lora': True, 'lora_r': 4, 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}},
        'training': {'output_dir': str(work / 'run'), 'max_steps': 2, 'per_device_batch_size': 4, 'save_steps': 2,
                     'logging_steps': 1, 'warmup_ratio': 0.0}})
    train_from_config(cfg, progress=False)
    sources = sorted(p for p in (work / 'raw').iterdir() if p.suffix in ('.png', '.jpg'))
    return {'work': work, 'sources': sources, 'ckpt': work / 'run' / 'checkpoint-2', 'det': load_trained(work / 'run' / 'checkpoint-2')}


def phone_photo(upright: Image.Image, dest: Path) -> Path:
    "Save `upright` as a phone does: pixels stored rotated, EXIF orientation 6 to display them upright."
    exif = Image.Exif(); exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(dest, quality=95, exif=exif)
    return dest


def test_folders_expand_sorted_with_hidden_and_non_images_counted(tmp_path):
    (tmp_path / 'f' / 'sub').mkdir(parents=True); (tmp_path / 'f' / '.git').mkdir()
    img = Image.new('RGB', (40, 40), 'white')
    for n in ('z.png', 'B.JPG', 'sub/a.webp', '.git/x.png', '._y.png'): img.save(tmp_path / 'f' / n)
    (tmp_path / 'f' / 'labels.json').write_text('{}')
    got = image_files([tmp_path / 'f'])
    assert [n for _, n in got.files] == ['B.JPG', 'sub/a.webp', 'z.png']
    assert (got.not_images, got.hidden) == (1, 2)
    assert image_files([tmp_path / 'f']).files == got.files   # deterministic
    again = image_files([tmp_path / 'f', tmp_path / 'f' / 'z.png'])
    assert len(again.files) == 3 and again.repeated == [str(tmp_path / 'f' / 'z.png')]
    (tmp_path / 'g').mkdir(); img.save(tmp_path / 'g' / 'z.png')
    with pytest.raises(ValueError, match="would both be drawn as 'z.png'"):
        image_files([tmp_path / 'f', tmp_path / 'g'])
    with pytest.raises(FileNotFoundError, match='no such file or folder'):
        image_files([tmp_path / 'missing'])
    assert [n for _, n in image_files([tmp_path / 'f' / '.git']).files] == ['x.png']   # a hidden folder named on purpose is read
    (tmp_path / 'h').mkdir(); (tmp_path / 'h' / 'notes.txt').write_text('')
    with pytest.raises(ValueError, match='no image files'):
        image_files([tmp_path / 'h'])


def test_a_phone_photo_gets_boxes_in_its_displayed_pixels(run, tmp_path):
    upright = Image.open(run['sources'][1]).convert('RGB')
    phone = phone_photo(upright, tmp_path / 'phone.jpg')
    _, line = predict_image(run['det'], phone, threshold=0.0)
    assert (line['width'], line['height']) == upright.size != Image.open(phone).size
    want = detect(run['det'], load_image(phone), threshold=0.0)
    assert [b['bbox'] for b in line['boxes']] == [d['bbox'] for d in want] and len(want) == 4
    naive = detect(run['det'], Image.open(phone).convert('RGB').transpose(Image.Transpose.ROTATE_90), threshold=0.0)
    assert naive and [d['bbox'] for d in naive] != [d['bbox'] for d in want]   # the control: pixels read another way give other boxes


@pytest.mark.parametrize('family', VLM_FAMILIES[:3])
def test_the_text_paths_boxes_come_back_in_original_pixels(family, run, tmp_path):
    "A scripted answer with a known box, in each family's format and coordinates, comes back at the original pixels."
    det = load_trained(f'tiny-kit/{family}')
    assert det.head is None
    upright = Image.open(run['sources'][2]).convert('RGB')
    phone = phone_photo(upright, tmp_path / 'phone.jpg')
    spec = ResizeSpec.from_image_processor(det.image_processor, det.family)
    rh, rw = spec.resize(upright.height, upright.width)
    truth = [10.0, 20.0, 70.0, 90.0]
    answer = grounding_text([{'bbox': scale_boxes([truth], upright.size, (rw, rh))[0].tolist(), 'label': 'blue circle'}], (rw, rh), family)
    ids = torch.tensor([det.tokenizer(answer + IM_END, add_special_tokens=False)['input_ids']])
    seen = {}
    def scripted(input_ids, **kw):
        seen['grid'] = kw['image_grid_thw'][0].tolist()
        return torch.cat([input_ids, ids], 1)
    det.vlm.generate = scripted
    _, line = predict_image(det, phone, path='text')
    p = family_record(family).patch_size
    assert seen['grid'][1:] == [rh // p, rw // p]   # the model saw conversion's resize of the displayed image
    assert line['parsed'] and [b['label'] for b in line['boxes']] == ['blue circle']
    step = max(upright.width / rw, upright.height / rh) * (rw / 1000 if family_record(family).coord_space == 'rel1000' else 1)
    assert max(abs(a - b) for a, b in zip(line['boxes'][0]['bbox'], truth)) <= step + 1e-6, (line['boxes'], truth)
    with pytest.raises(ValueError, match='no detection head'):
        predict_image(det, phone, path='head')


def test_every_file_is_written_or_rejected_with_its_reason(run, tmp_path):
    d = tmp_path / 'in'; d.mkdir()
    for k in range(3): Image.open(run['sources'][k]).save(d / f'ok{k}.png')
    (d / 'empty.jpg').write_bytes(b'')
    good = (d / 'ok0.png').read_bytes(); (d / 'cut.png').write_bytes(good[:len(good) // 2])
    (d / 'text.png').write_text('not a png')
    fifo = tmp_path / 'pipe.png'; os.mkfifo(fifo)   # named explicitly: a FIFO must be refused, not block the run
    (d / 'gone.png').symlink_to(tmp_path / 'deleted.png')   # a broken link inside the folder: tried and refused, not skipped
    s = predict_files(run['det'], [d, fifo], tmp_path / 'preds.jsonl', threshold=0.0, progress=False)
    lines = [json.loads(l) for l in (tmp_path / 'preds.jsonl').read_text().splitlines()]
    rejects = [json.loads(l) for l in s.rejects_file.read_text().splitlines()]
    assert s.written == len(lines) == 3 and len(s.rejected) == len(rejects) == 5
    assert sorted(Path(r['image']).name for r in rejects) == ['cut.png', 'empty.jpg', 'gone.png', 'pipe.png', 'text.png']
    assert all(r['reason'] and Path(r['image']).name in r['reason'] for r in rejects), rejects
    assert all(set(l) == {'image', 'width', 'height', 'boxes', 'path'} and l['path'] == 'head' for l in lines)
    assert all(set(b) == {'bbox', 'label', 'score'} and len(b['bbox']) == 4 for l in lines for b in l['boxes'])
    assert '3 written' in str(s) and '5 rejected' in str(s)


def test_an_interrupted_run_leaves_the_older_output_whole(run, tmp_path, monkeypatch):
    import vlmlab.predict as pr
    d = tmp_path / 'in'; d.mkdir()
    for k in range(3): Image.open(run['sources'][k]).save(d / f'{k}.png')
    out = tmp_path / 'preds.jsonl'
    predict_files(run['det'], [d], out, threshold=0.0, progress=False)
    before = out.read_bytes()
    real, calls = pr.predict_image, []
    def stop_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pr, 'predict_image', stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        predict_files(run['det'], [d], out, progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in', 'preds.jsonl', 'preds.rejects.jsonl']


def test_drawings_keep_the_names_and_show_the_boxes(run, tmp_path):
    d = tmp_path / 'in'; (d / 'sub').mkdir(parents=True)
    Image.open(run['sources'][0]).save(d / 'a.jpg', quality=95); Image.open(run['sources'][1]).save(d / 'sub' / 'b.png')
    predict_files(run['det'], [d], tmp_path / 'p.jsonl', draw=tmp_path / 'drawn', threshold=0.0, progress=False)
    assert sorted(p.relative_to(tmp_path / 'drawn').as_posix() for p in (tmp_path / 'drawn').rglob('*') if p.is_file()) == ['a.jpg', 'sub/b.png']
    src, drawn = np.asarray(load_image(d / 'sub' / 'b.png')), np.asarray(Image.open(tmp_path / 'drawn' / 'sub' / 'b.png'))
    assert drawn.shape == src.shape and (src != drawn).any(-1).mean() > 0.01
    blank = draw_boxes(Image.fromarray(src), [])
    assert np.array_equal(np.asarray(blank), src)
    with pytest.raises(ValueError, match='would overwrite the input image'):
        predict_files(run['det'], [d], tmp_path / 'q.jsonl', draw=d, progress=False)
    assert np.array_equal(np.asarray(load_image(d / 'sub' / 'b.png')), src)


def test_every_form_of_the_model_gives_the_same_lines(run, tmp_path):
    served = export_for_serving(run['ckpt'], tmp_path / 'serve')
    img = tmp_path / 'x.png'; Image.open(run['sources'][3]).save(img)
    got = {}
    for name, m in {'run': run['work'] / 'run', 'final': run['work'] / 'run' / 'final', 'ckpt': run['ckpt'], 'served': served}.items():
        s = predict_files(m, [img], tmp_path / f'{name}.jsonl', threshold=0.0, progress=False)
        got[name] = json.loads(s.out.read_text())
    ref = got['ckpt']
    for name, line in got.items():
        assert [b['label'] for b in line['boxes']] == [b['label'] for b in ref['boxes']], name
        worst = max(abs(x - y) for a, b in zip(line['boxes'], ref['boxes']) for x, y in zip(a['bbox'] + [a['score']], b['bbox'] + [b['score']]))
        assert worst < 1e-3, (name, worst)


def test_detect_command_exit_codes(run, tmp_path, capsys):
    img = tmp_path / 'x.png'; Image.open(run['sources'][0]).save(img)
    assert detect_command([str(img)], model=str(run['ckpt']), out=str(tmp_path / 'a.jsonl'), threshold=0.0, quiet=True) == 0
    assert '1 written' in capsys.readouterr().out
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG')
    assert detect_command([str(img), str(tmp_path / 'bad.png')], model=str(run['ckpt']), out=str(tmp_path / 'b.jsonl'), quiet=True) == 1
    with pytest.raises(ValueError, match='use one of head, text'):
        detect_command([str(img)], model=str(run['ckpt']), out=str(tmp_path / 'c.jsonl'), path='boxes')
    with pytest.raises(FileNotFoundError, match='no such file'):
        detect_command([str(tmp_path / 'nope.png')], model=str(run['ckpt']), out=str(tmp_path / 'c.jsonl'))
    assert not (tmp_path / 'c.jsonl').exists()
