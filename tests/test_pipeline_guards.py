"""Guards proven on the pages, fed their bad input through the pipeline a user runs: placeholders through ChatProcessor,
the trainer's pre-flight and the text path; the loss balance through BBUTrainer into the console and metrics.json;
a held-out image that is a near-duplicate of a training image through `vlmlab train`."""
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from vlmlab.chat import ChatProcessor
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.inference import detect, text_predictions
from vlmlab.checkpoints import load_model
from vlmlab.config import ModelConfig, VLMLabConfig
from vlmlab.tiny import tiny_kit
from vlmlab.tokens import PlaceholderError
from vlmlab.trainer import DataError, build_trainer, train_from_config
from vlmlab.vision import ResizeSpec

FAM = 'qwen2_5_vl'


def _convert(work: Path, edit=None) -> Path:
    "Shapes raw data for the tiny Qwen2.5-VL, `edit(raw_dir)` applied to the raw files, converted by `vlmlab.data.convert`."
    make_shapes(work / 'raw', n=12, seed=5, old_format=0, size_range=(112, 200), max_objects=2)
    if edit: edit(work / 'raw')
    convert(work / 'raw', work / 'ds', ResizeSpec.from_pretrained(tiny_kit(FAM)), progress=False)
    return work / 'ds'


def _set_label(raw: Path, name: str, label: str) -> None:
    f = raw / f'{name}.json'
    d = json.loads(f.read_text()); d['objects'][0]['desc'] = label; f.write_text(json.dumps(d))


@pytest.fixture(scope='module')
def ds(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp('shapes'))


@pytest.fixture(scope='module')
def proc_kit():
    from transformers import AutoImageProcessor, AutoTokenizer
    kit = tiny_kit(FAM)
    return AutoTokenizer.from_pretrained(kit), AutoImageProcessor.from_pretrained(kit)


def config_dict(ds, out, detection=None, **training) -> dict:
    "A one-step grounding run of the tiny kit with its detection head, as the dict a YAML config holds."
    t = {'output_dir': str(out), 'max_steps': 1, 'per_device_batch_size': 4, 'logging_steps': 1, 'save_steps': 1000,
         'warmup_ratio': 0.0, **training}
    if detection: t['detection'] = detection
    return {'model': {'name_or_path': f'tiny-kit/{FAM}', 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
            'data': {'ds_output': str(ds), 'target': 'grounding'},
            'stage': {'name': 'stage2', 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}}, 'training': t}


def config(ds, out, detection=None, **training):
    return VLMLabConfig.from_dict(config_dict(ds, out, detection, **training))


def records(ds, split='train'):
    return [r for _, r, _ in read_jsonl(Path(ds) / f'{split}.jsonl')]


# ---- placeholders through ChatProcessor and the trainer's pre-flight

@pytest.mark.parametrize('label, kind', [('{label}', 'format field'), ('{{ obj.name }}', 'jinja'), ('a <image> tag', 'media tag')])
def test_a_converted_label_with_a_placeholder_stops_the_preflight(tmp_path, label, kind):
    ds = _convert(tmp_path, lambda raw: _set_label(raw, 'shapes_00003', label))
    bad = [r for r in records(ds) if any(o['label'] == label for o in r['objects'])]
    assert len(bad) == 1, 'convert dropped or changed the label: nothing to feed the trainer'
    with pytest.raises(DataError) as e:
        build_trainer(config(ds, tmp_path / 'run'), progress=False)
    msg = str(e.value)
    assert f"sample {bad[0]['id']!r}" in msg and 'unfilled placeholder' in msg and kind in msg and '1 of' in msg, msg


def test_chat_processor_refuses_a_placeholder_prompt_and_names_the_sample(ds, proc_kit):
    tok, ip = proc_kit
    rec = records(ds)[0]
    ok = ChatProcessor(tok, ip, FAM, ds)(rec)   # control: the default prompt passes
    assert ok.n_label_tokens > 0
    with pytest.raises(PlaceholderError, match=rf"sample {rec['id']!r}, message 0 \(user\): unfilled placeholder\(s\): format field "
                                               r"'\{label\}'"):
        ChatProcessor(tok, ip, FAM, ds, prompt='Locate every {label} in the image.')(rec)


def test_a_placeholder_in_a_teacher_demonstration_names_the_teacher(ds, proc_kit):
    tok, ip = proc_kit
    recs = records(ds)
    student, teacher = recs[0], {**recs[1], 'objects': [{**recs[1]['objects'][0], 'label': 'the {color} square'}]}
    proc = ChatProcessor(tok, ip, FAM, ds, teacher_ratio=1.0, teacher_pool=[teacher], seed=0)
    with pytest.raises(PlaceholderError) as e: proc(student)
    assert f"sample {student['id']!r}, message 1 (assistant, from teacher demonstration {teacher['id']!r})" in str(e.value), str(e.value)


def test_an_image_tag_left_in_a_conversation_is_refused(ds, proc_kit):
    tok, ip = proc_kit
    rec = records(ds)[0]
    conv = {**rec, 'objects': [], 'conversations': [
        {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': '<image>\nWhat is in the picture?'}]},
        {'role': 'assistant', 'content': 'shapes'}]}
    with pytest.raises(PlaceholderError, match=rf"sample {rec['id']!r}, message 0 \(user\): .*media tag '<image>'"):
        ChatProcessor(tok, ip, FAM, ds, target='conversation')(conv)
    conv['conversations'][0]['content'][1]['text'] = 'What is in the picture?'   # control: the same without the tag
    assert ChatProcessor(tok, ip, FAM, ds, target='conversation')(conv).n_label_tokens > 0


# ---- placeholders through the text path (and detect)

@pytest.fixture(scope='module')
def detector():
    return load_model(ModelConfig(name_or_path=f'tiny-kit/{FAM}', detection_head=True, head_d_model=32, num_queries=4)).eval()


def test_text_path_refuses_an_unfilled_prompt_naming_the_record(ds, detector):
    recs = records(ds)[:2]
    preds, unparsed = text_predictions(detector, recs[:1], ds, 'Locate every object.', max_new_tokens=2)   # control
    assert len(preds) == 1
    with pytest.raises(PlaceholderError, match=rf"sample {recs[0]['id']!r}: unfilled placeholder\(s\): format field '\{{instruction\}}'"):
        text_predictions(detector, recs, ds, '{instruction}', max_new_tokens=2)


def test_detect_refuses_an_unfilled_prompt_naming_the_image(ds, detector):
    rec = records(ds)[0]
    path = Path(ds) / rec['image']
    assert isinstance(detect(detector, path, 'Locate every object.', threshold=0.0), list)   # control
    with pytest.raises(PlaceholderError, match=rf"sample {str(path)!r}: unfilled placeholder\(s\): jinja"):
        detect(detector, path, 'Locate {{ target }}.')
    with Image.open(path) as im:
        with pytest.raises(PlaceholderError, match=rf"sample {str(path)!r}"): detect(detector, im, 'Find the {obj}.')


# ---- the loss balance through BBUTrainer

def test_caption_dominated_run_warns_once_and_records_the_verdict(ds, tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m = train_from_config(config(ds, tmp_path / 'w50', {'detection_caption_weight': 50.0}, max_steps=3), progress=False)
    msgs = [str(x.message) for x in w if 'caption loss >> bbox loss' in str(x.message)]
    assert len(msgs) == 1 and msgs[0].startswith('step 1: ') and 'detection_caption_weight (now 50.0)' in msgs[0], msgs
    stored = json.loads((tmp_path / 'w50' / 'metrics.json').read_text())['loss_balance']
    assert stored == m['loss_balance'] and stored['ok'] is False and stored['step'] == 1 and stored['ratio'] > stored['threshold']
    from vlmlab.report import BALANCE_KEYS
    assert set(stored) == set(BALANCE_KEYS)   # the record the report reads is the one the trainer writes
    assert stored['weights']['caption'] == 50.0 and stored['warning'] in msgs[0]
    logged = [h for h in m['log_history'] if 'loss_balance' in h]
    assert [h['step'] for h in logged] == [1] and logged[0]['loss_balance'] == stored['warning']


def test_balanced_run_records_ok_without_a_warning(ds, tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m = train_from_config(config(ds, tmp_path / 'w1'), progress=False)
    assert not [x for x in w if 'caption loss' in str(x.message)]
    b = json.loads((tmp_path / 'w1' / 'metrics.json').read_text())['loss_balance']
    assert b['ok'] is True and b['warning'] is None and b['ratio'] <= b['threshold'] and m['log_history'][0]['loss_balance'] == 'ok'


# ---- leakage: a near-duplicate held-out image stops `vlmlab train`

def _heldout_with_a_near_copy(work: Path, ds: Path) -> str:
    "Convert into `ds` a heldout split of distinct images plus a resized JPEG copy of one training image; that image's id."
    raw, ho = work / 'raw', work / 'raw_heldout'
    make_shapes(ho, n=3, seed=11, old_format=0, size_range=(112, 200), max_objects=2)
    src = next(p for p in sorted(raw.glob('*.json')) if json.loads(p.read_text())['image'].endswith('.png'))
    d = json.loads(src.read_text())
    im = Image.open(raw / d['image']).convert('RGB')
    im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(ho / 'copy.jpg', quality=70)   # other bytes, same picture
    d['image'], d['objects'] = 'copy.jpg', [dict(o, bbox=[int(v * 0.8) for v in o['bbox']]) for o in d['objects']]
    (ho / 'copy.json').write_text(json.dumps(d))
    convert(ho, ds, ResizeSpec.from_pretrained(tiny_kit(FAM)), split='heldout', progress=False)
    return src.stem


def test_a_near_duplicate_heldout_image_stops_vlmlab_train_naming_the_pair(tmp_path, capsys):
    import yaml
    from vlmlab import cli
    ds = _convert(tmp_path)
    source = _heldout_with_a_near_copy(tmp_path, ds)
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(yaml.safe_dump(config_dict(ds, tmp_path / 'run')))
    assert cli.main(['train', '--config', str(cfg), '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.startswith('vlmlab train: ') and err.count('\n') == 1 and 'does not pass validation' in err, err
    assert 'near-duplicate image' in err and 'heldout:copy' in err and f'train:{source}' in err, err
    assert not (tmp_path / 'run' / 'metrics.json').exists()   # stopped before a step
    for f in ('copy.json', 'copy.jpg'): (tmp_path / 'raw_heldout' / f).unlink()   # control: the distinct held-out images train
    convert(tmp_path / 'raw_heldout', ds, ResizeSpec.from_pretrained(tiny_kit(FAM)), split='heldout', progress=False)
    assert cli.main(['train', '--config', str(cfg), '--quiet']) == 0
    assert (tmp_path / 'run' / 'metrics.json').exists()
