"""Held-out COCO mAP: logged at a tiny run's evaluation steps (metrics.json, TensorBoard), drawn in the report, compared across
checkpoints by map_report, and a baseline check the numbers can fail."""
import json
import re

import pytest

from vlmlab.config import VLMLabConfig
from vlmlab.data import convert, make_shapes, read_jsonl
from vlmlab.report import MAP_PATHS, REPORT_PANELS, heldout_map, map_history, map_report, write_report
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import train_from_config
from vlmlab.vision import ResizeSpec

KIT = 'tiny-kit/qwen2_5_vl'
MAP_KEYS = ('eval_map_head', 'eval_ap50_head', 'eval_map_text', 'eval_map_baseline')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A 4-step grounding run with the head, evaluated on 2 held-out images every 2 steps; (work folder, metrics)."
    work = tmp_path_factory.mktemp('evalmap')
    spec = ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl'))
    for split, seed, n in (('train', 0, 8), ('heldout', 1, 4)):
        make_shapes(work / f'raw_{split}', n=n, seed=seed, old_format=0, exif_rotated=0, size_range=(112, 160), max_objects=2)
        convert(work / f'raw_{split}', work / 'ds', spec, split=split, progress=False)
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': KIT, 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(work / 'ds'), 'target': 'grounding', 'eval_split': 'heldout', 'max_length': 1024},
        'stage': {'name': 'stage2', 'lrs': {'merger': 2e-3, 'llm': 2e-3, 'adapter': 2e-3, 'head': 2e-3}},
        'training': {'output_dir': str(work / 'run'), 'max_steps': 4, 'per_device_batch_size': 2, 'logging_steps': 1,
                     'save_steps': 2, 'warmup_ratio': 0.0, 'eval_steps': 2, 'map_images': 2}})
    return work, train_from_config(cfg, progress=False)


def test_run_logs_map_at_its_eval_steps(run):
    work, metrics = run
    logged = [h for h in metrics['log_history'] if 'eval_map_head' in h]
    assert [h['step'] for h in logged] == [2, 4]                     # the final evaluate after step 4 is not scored twice
    for h in logged:
        assert all(k in h for k in MAP_KEYS) and h['eval_map_images'] == 2
        assert all(0.0 <= h[k] <= 1.0 for k in MAP_KEYS)
    stored = json.loads((work / 'run' / 'metrics.json').read_text())
    assert [r['step'] for r in stored['map']] == [2, 4]
    assert stored['map'] == map_history(stored['log_history'])
    assert {'map_head', 'ap50_head', 'map_text', 'map_baseline', 'map_head_by_label'} <= set(stored['map'][0])
    assert stored['map_predictions']['step'] == 4 and len(stored['map_predictions']['items']) == 2


def test_tensorboard_gets_eval_map(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    work, metrics = run
    ea = EventAccumulator(metrics['tensorboard']); ea.Reload()
    tags = set(ea.Tags()['scalars'])
    assert {'eval/map_head', 'eval/ap50_head', 'eval/map_text', 'eval/map_baseline'} <= tags
    assert [e.step for e in ea.Scalars('eval/map_head')] == [2, 4]


def test_report_holds_the_grid_and_the_map_table(run, tmp_path):
    work, metrics = run
    page = write_report(work / 'run', tmp_path / 'report')
    text = page.read_text()
    section = re.search(r'<section id="map"><h2>' + REPORT_PANELS['map'] + r'</h2>(.*?)</section>', text, re.S).group(1)
    assert re.search(r'<img id="img-map-grid"[^>]*src="data:image/png;base64,', section)
    assert re.search(r'<img id="img-map-curve"', section)            # two evaluation steps: a curve
    assert '<th>map_head</th>' in section and '<th>map_baseline</th>' in section
    rows = re.findall(r'<tr><td>(\d+)</td>', section)
    assert rows == ['2', '4']
    assert (tmp_path / 'report' / 'map_grid.png').is_file()


def test_map_report_returns_both_checkpoints(run, capsys):
    work, _ = run
    cks = [work / 'run' / 'checkpoint-2', work / 'run' / 'checkpoint-4']
    table = map_report(cks, work / 'ds', 'heldout', n=2)
    out = capsys.readouterr().out
    assert list(table['results']) == [str(c) for c in cks] + ['baseline']
    assert [(r['checkpoint'], r['path']) for r in table['table']] == [(str(c), p) for c in cks for p in ('head', 'text')] + [('whole image', 'baseline')]
    for c in cks: assert str(c) in out
    assert 'baseline' in out and table['images'] == 2


def test_whole_image_baseline_scores_one_only_on_whole_image_truth(run, tmp_path):
    work, _ = run
    recs = [r for _, r, _ in read_jsonl(work / 'ds' / 'heldout.jsonl')]
    (tmp_path / 'heldout.jsonl').write_text(''.join(json.dumps({**r, 'objects': [{'bbox': [0, 0, *r['size']], 'label': 'object'}]}) + '\n'
                                                    for r in recs))
    whole = heldout_map(None, tmp_path, 'heldout', paths=('baseline',))['baseline']
    real = heldout_map(None, work / 'ds', 'heldout', paths=('baseline',))['baseline']
    assert whole['class_agnostic']['AP50'] == 1.0 and whole['by_label']['AP50'] == 1.0
    assert real['class_agnostic']['AP50'] < 0.5


def test_heldout_map_refuses_what_it_cannot_score(run):
    work, _ = run
    with pytest.raises(ValueError, match='need a model'): heldout_map(None, work / 'ds', 'heldout')
    with pytest.raises(ValueError, match='use some of'): heldout_map(None, work / 'ds', 'heldout', paths=('boxes',))
    with pytest.raises(FileNotFoundError, match='no such split'): heldout_map(None, work / 'ds', 'nosuch', paths=('baseline',))
    assert MAP_PATHS == ('head', 'text', 'baseline')
