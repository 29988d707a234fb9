"""The run report as a user opens it: a real tiny run rendered by headless Chromium, and the report / ablate / eval commands."""
import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.cli import main
from vlmlab.data import convert, make_shapes
from vlmlab.config import VLMLabConfig
from vlmlab.report import ABLATION_FORMAT, REPORT_PANELS, load_ablation, write_report
from vlmlab.tiny import tiny_kit
from vlmlab.trainer import train_from_config
from vlmlab.vision import ResizeSpec

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
KIT = 'tiny-kit/qwen2_5_vl'
IMAGE_PANELS = {'loss-terms', 'grad-norm', 'update-ratio', 'ablation'}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "Shapes data (train + heldout) and a 6-step stage-1 run of the tiny kit model, a log every step."
    work = tmp_path_factory.mktemp('report')
    spec = ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl'))
    for split, seed in (('train', 0), ('heldout', 1)):
        make_shapes(work / f'raw_{split}', n=8, seed=seed, old_format=0, exif_rotated=0, size_range=(112, 160), max_objects=2)
        convert(work / f'raw_{split}', work / 'ds', spec, split=split, progress=False)
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': KIT}, 'data': {'ds_output': str(work / 'ds'), 'target': 'caption', 'max_length': 1024},
        'stage': {'name': 'stage1', 'lrs': {'merger': 1e-3}},
        'training': {'output_dir': str(work / 'run'), 'max_steps': 6, 'per_device_batch_size': 2, 'logging_steps': 1,
                     'save_steps': 6, 'warmup_ratio': 0.0}})
    train_from_config(cfg, progress=False)
    return work


@pytest.fixture(scope='module')
def ablated(work):
    "`vlmlab ablate` on the run (its final/ export) writing RUN_DIR/ablation.json; (exit code, stdout)."
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(['ablate', '--model', str(work / 'run'), '--data', str(work / 'ds'), '--n', '8', '--batch-size', '4', '--quiet',
                   '--out', str(work / 'run' / 'ablation.json')])
    return rc, out.getvalue()


def chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ablate_writes_the_record_and_exits_on_the_verdict(work, ablated):
    rc, out = ablated
    rec = load_ablation(work / 'run' / 'ablation.json')
    assert rec['format'] == ABLATION_FORMAT and rec['n'] == 8 and len(rec['items']) == 8
    assert rc == (0 if rec['passed'] else 1)
    assert out.splitlines()[1].startswith('PASS' if rec['passed'] else 'FAIL')
    assert rec['target'] == 'caption' and rec['split'] == 'heldout'   # processed as the run was trained (its config)
    for k in ('shuffled', 'zero', 'noise'):
        d = rec['deltas'][k]
        assert d['mean'] == pytest.approx(np.mean(np.subtract(rec['losses'][k], rec['losses']['correct'])))
        assert d['low'] <= d['high']


@pytest.mark.slow
def test_ablate_fails_on_the_untrained_model(work, capsys):
    rc = main(['ablate', '--model', KIT, '--data', str(work / 'ds'), '--n', '8', '--quiet'])
    out = capsys.readouterr().out
    assert rc == 1 and 'FAIL' in out and 'not above 0' in out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason='no chromium on PATH (apt-get install chromium): the screenshot test needs a headless browser')
def test_report_renders_in_headless_chromium(work, ablated, tmp_path):
    page = write_report(work / 'run', tmp_path / 'report')
    shot = tmp_path / 'screenshot.png'
    r = chromium(f'--screenshot={shot}', '--window-size=1400,4000', page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert('L'), dtype=float)
    assert pixels.shape == (4000, 1400)
    assert pixels.std() > 20, 'the screenshot is blank'
    inked = (pixels < 200).mean(axis=1) > 0.01          # rows with drawing on them
    assert inked[:1000].mean() > 0.2 and inked[1000:3000].mean() > 0.2, 'the panels do not fill the page'

    dom = chromium('--virtual-time-budget=10000', '--dump-dom', page.as_uri()).stdout
    for pid, title in REPORT_PANELS.items():
        assert f'<section id="{pid}"><h2>{html.escape(title)}</h2>' in dom, pid
    tags = re.findall(r'<img [^>]*>', dom)
    assert {re.search(r'id="img-([\w-]+)"', t).group(1) for t in tags} == IMAGE_PANELS
    for tag in tags:
        panel = re.search(r'id="img-([\w-]+)"', tag).group(1)
        png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1))
        assert png.startswith(PNG_SIGNATURE)
        assert png == (page.parent / f"{panel.replace('-', '_')}.png").read_bytes()   # the file beside the page
        decoded = int(re.search(r'data-natural-width="(\d+)"', tag).group(1))          # set by the page on load
        assert decoded == Image.open(page.parent / f"{panel.replace('-', '_')}.png").width > 0
    summary = re.search(r'<section id="summary">.*?</section>', page.read_text(), re.S).group(0)
    assert summary in dom   # the browser shows the summary the report wrote, verdicts included, as written
    rec = json.loads((work / 'run' / 'ablation.json').read_text())
    assert ('PASS' if rec['passed'] else 'FAIL') in summary, summary


@pytest.mark.slow
def test_report_command_without_ablation_says_not_run(work, tmp_path, capsys):
    (tmp_path / 'run').mkdir()
    shutil.copy(work / 'run' / 'metrics.json', tmp_path / 'run' / 'metrics.json')
    assert main(['report', str(tmp_path / 'run')]) == 0
    page = Path(capsys.readouterr().out.strip())              # the command prints the page's path
    assert page == tmp_path / 'run' / 'report' / 'index.html'
    text = page.read_text()
    assert all(f'<section id="{pid}">' in text for pid in REPORT_PANELS)
    assert 'id="ablation-not-run"' in text and 'not run' in text and 'id="img-ablation"' not in text
    assert sorted(p.name for p in (tmp_path / 'run' / 'report').glob('*.png')) == ['grad_norm.png', 'loss_terms.png', 'update_ratio.png']
    assert 'not scanned' in text
    assert main(['report', str(tmp_path / 'run'), '--scan-data']) == 0   # every split processed with the run's config
    text = page.read_text()
    for split in ('train', 'heldout'): assert f'<tr><td>{split}</td><td>8</td><td>8</td><td>0</td><td>0</td>' in text


@pytest.mark.slow
def test_eval_compares_checkpoints_on_the_same_items(work, tmp_path, capsys):
    ckpt = work / 'run' / 'checkpoint-6'
    rc = main(['eval', '--checkpoints', KIT, str(ckpt), '--data', str(work / 'ds'), '--n', '8', '--out', str(tmp_path / 'eval.json')])
    out = capsys.readouterr().out
    assert rc == 0 and f'{ckpt} vs {KIT}' in out
    rec = json.loads((tmp_path / 'eval.json').read_text())
    assert rec['target'] == 'caption'          # from the run's config, although the untrained kit comes first
    assert list(rec['losses']) == [KIT, str(ckpt)] and all(len(v) == 8 for v in rec['losses'].values())
    (cmp,) = rec['comparisons']
    assert cmp['mean_b_minus_a'] == pytest.approx(np.mean(np.subtract(rec['losses'][str(ckpt)], rec['losses'][KIT])))


# ---- bad input: exit 2 with a message naming the file or option (no model is loaded)

@pytest.fixture
def inputs(tmp_path):
    "A run folder with a minimal log, a ds_output with a held-out split, and an empty folder."
    run = tmp_path / 'run'; run.mkdir()
    (run / 'metrics.json').write_text(json.dumps({'log_history': [{'step': s, 'loss': 2.0 / s} for s in range(1, 6)]}))
    ds = tmp_path / 'ds'; ds.mkdir()
    (ds / 'heldout.jsonl').write_text('{}\n')
    (tmp_path / 'empty').mkdir()
    return tmp_path


BAD = [
    (['report', '{t}/missing'], '{t}/missing'),
    (['report', '{t}/empty'], 'metrics.json'),
    (['report', '{t}/run', '--out', '{t}/run/metrics.json'], 'metrics.json'),
    (['ablate', '--data', '{t}/ds'], '--model is required'),
    (['ablate', '--model', KIT], '--data is required'),
    (['ablate', '--model', KIT, '--data', '{t}/ds', '--n', '1'], '--n 1'),
    (['ablate', '--model', '{t}/nope', '--data', '{t}/ds'], '{t}/nope'),
    (['ablate', '--model', KIT, '--data', '{t}/nowhere'], '{t}/nowhere'),
    (['ablate', '--model', KIT, '--data', '{t}/ds', '--split', 'dev'], 'dev.jsonl'),
    (['ablate', '--model', KIT, '--data', '{t}/empty'], 'no held-out split'),
    (['eval', '--data', '{t}/ds'], '--checkpoints is required'),
    (['eval', '--checkpoints', KIT, KIT, '--data', '{t}/ds'], 'twice'),
    (['eval', '--checkpoints', KIT, '{t}/nope', '--data', '{t}/ds'], '{t}/nope'),
]


@pytest.mark.parametrize('args,message', BAD, ids=[' '.join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_input_exits_2_naming_it(inputs, capsys, args, message):
    rc = main([a.format(t=inputs) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and message.format(t=inputs) in err, err


def test_report_refuses_a_malformed_ablation_record(inputs, capsys):
    (inputs / 'run' / 'ablation.json').write_text(json.dumps({'format': ABLATION_FORMAT, 'passed': True, 'losses': {'correct': [1.0]}}))
    assert main(['report', str(inputs / 'run')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'ablation.json' in err and len(err.splitlines()) == 1, err
    for key in ('n', 'confidence', 'mean_loss', 'deltas', 'losses.shuffled', 'losses.zero', 'losses.noise'): assert key in err, (key, err)
    (inputs / 'run' / 'ablation.json').unlink()
    assert main(['report', str(inputs / 'run')]) == 0     # the minimal log alone makes a page
    assert capsys.readouterr().out.strip() == str(inputs / 'run' / 'report' / 'index.html')


@pytest.mark.parametrize('drop', ['deltas', 'mean_loss', 'losses', 'passed', 'format'])
def test_ablation_record_without_a_key_names_it(work, ablated, tmp_path, drop):
    rec = json.loads((work / 'run' / 'ablation.json').read_text())
    f = tmp_path / 'ablation.json'
    f.write_text(json.dumps({k: v for k, v in rec.items() if k != drop}))
    with pytest.raises(ValueError) as e: load_ablation(f)
    msg = str(e.value)
    assert f"missing key(s) {drop}" in msg and str(f) in msg and len(msg.splitlines()) == 1, msg
    f.write_text(json.dumps({**rec, 'deltas': {**rec['deltas'], 'noise': {'mean': 0.1}}}))
    with pytest.raises(ValueError, match=r"missing key\(s\) deltas\.noise\.low, deltas\.noise\.high"): load_ablation(f)


def _flat_run(root: Path, step_key: str | None, step: float) -> str:
    "A run whose loss never falls; the merger's applied step logged under step_key; the page's summary section."
    rng = np.random.default_rng(1)
    root.mkdir()
    logs = [{'step': s + 1, 'loss': 5.0 + 0.02 * rng.standard_normal(), 'grad_norm/merger': 0.3, 'update_ratio/merger': 1e-5,
             **({step_key: step} if step_key else {})} for s in range(60)]
    (root / 'metrics.json').write_text(json.dumps({'log_history': logs}))
    return re.search(r'<section id="summary">.*?</section>', write_report(root).read_text(), re.S).group(0)


@pytest.mark.parametrize('step', [1e-4, 3e-3, 0.5])
def test_plateau_never_says_nothing_trains_when_a_group_moved(tmp_path, step):
    summary = _flat_run(tmp_path / 'run', 'step_ratio/merger', step)
    assert 'plateau' in summary and 'nothing trains' not in summary, summary
    assert 'although parameters moved' in summary and f"merger {step:.2g}" in summary


def test_plateau_says_nothing_trains_when_the_step_confirms_it(tmp_path):
    frozen = _flat_run(tmp_path / 'frozen', 'step_ratio/merger', 1e-9)
    assert 'nothing trains' in frozen and 'confirms it' in frozen
    unmeasured = _flat_run(tmp_path / 'unmeasured', None, 0)   # no applied-step log: the candidate list stays as it is
    assert 'nothing trains' in unmeasured and 'confirms it' not in unmeasured and 'although' not in unmeasured


def test_eval_loader_names_a_missing_folder_without_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from vlmlab.checkpoints import ModelNotFoundError, load_eval_model
    def no_hub(*a, **k): raise AssertionError('the Hub was called for a local path')
    for name in ('hf_hub_download', 'snapshot_download'): monkeypatch.setattr(huggingface_hub, name, no_hub)
    with pytest.raises(ModelNotFoundError, match='no such model folder'): load_eval_model(tmp_path / 'nope' / 'final')


def test_eval_loader_refuses_a_corrupted_export(work, tmp_path):
    from vlmlab.checkpoints import CheckpointError, load_eval_model
    final = tmp_path / 'final'
    shutil.copytree(work / 'run' / 'final', final)
    f = max(final.glob('*.safetensors'), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes()); data[-64:] = bytes(64)   # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f.name): load_eval_model(final)


# ---- the ablation's skipped items, written by `vlmlab ablate`, read back and shown on the page

@pytest.fixture
def mixed_heldout(tmp_path):
    "A ds_output whose held-out split mixes 4 one-image items, 2 text-only and 1 two-image item; a run folder with a minimal log."
    spec = ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl'))
    make_shapes(tmp_path / 'raw', n=4, seed=2, old_format=0, exif_rotated=0, size_range=(112, 160), max_objects=2)
    imgs = sorted(p.name for p in (tmp_path / 'raw').iterdir() if p.suffix != '.json')
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    items = ([{'id': f'one-{k}', 'image': im, 'conversations': turn('<image>\nDescribe the image.', 'Coloured shapes.')} for k, im in enumerate(imgs)]
             + [{'id': 'text-1', 'conversations': turn('Say hello.', 'hello')}, {'id': 'pair', 'image': imgs[:2],
                 'conversations': turn('Compare <image> with <image>.', 'They differ.')}, {'id': 'text-2', 'conversations': turn('Name a colour.', 'red')}])
    (tmp_path / 'mixed.json').write_text(json.dumps(items))
    s = convert(tmp_path / 'mixed.json', tmp_path / 'ds', spec, split='heldout', image_root=tmp_path / 'raw', progress=False)
    assert s.written == 7 and not s.rejected, s
    run = tmp_path / 'run'; run.mkdir()
    (run / 'metrics.json').write_text(json.dumps({'log_history': [{'step': k, 'loss': 2.0 / k} for k in range(1, 6)]}))
    return tmp_path


def _shows_left_out(run: Path, rec: dict) -> None:
    "The record holds the counts, reads back into the AblationResult, and the page shows them in the panel and the summary."
    from vlmlab.report import ablation_result
    assert rec['skipped'] == {'text-only': 2, 'several images': 1} and rec['n'] == 4
    assert rec['items'] == ['one-0', 'one-1', 'one-2', 'one-3']   # the ids of the items ablated, not of all held-out items
    assert ablation_result(rec).skipped == rec['skipped']
    text = write_report(run).read_text()
    panel = re.search(r'<section id="ablation">.*?</section>', text, re.S).group(0)
    summary = re.search(r'<section id="summary">.*?</section>', text, re.S).group(0)
    for where in (panel, summary):
        assert 'left out: 2 text-only, 1 several images (only one-image items are ablated)' in where, where


def test_ablation_records_and_shows_the_items_it_left_out(mixed_heldout):
    from vlmlab.diagnostics import connector_ablation
    from vlmlab.checkpoints import load_eval_model
    from vlmlab.report import ablation_record, heldout_samples, save_ablation
    run = mixed_heldout / 'run'
    ho = heldout_samples(KIT, mixed_heldout / 'ds', n=7, target='conversation')
    assert len(ho.samples) == 7 and ho.ablated_ids == ['one-0', 'one-1', 'one-2', 'one-3']
    res = connector_ablation(load_eval_model(KIT), ho.samples, ho.pad_token_id, 4, progress=False)
    with pytest.raises(ValueError, match=r"7 item ids for 4 per-item losses: the ablation left out 3 item\(s\).*HeldOut\.ablated_ids"):
        ablation_record(res, ho.ids)
    rec = load_ablation(save_ablation(res, run / 'ablation.json', ho.ablated_ids))
    _shows_left_out(run, rec)
    # a record written before the counts existed still loads and shows no count
    from vlmlab.report import ablation_result
    old = {k: v for k, v in rec.items() if k != 'skipped'}
    (run / 'ablation.json').write_text(json.dumps(old))
    assert ablation_result(load_ablation(run / 'ablation.json')).skipped == {}
    assert 'left out' not in write_report(run).read_text()
    for bad in ({'text-only': 'two'}, {'text-only': -1}, ['text-only']):
        (run / 'ablation.json').write_text(json.dumps({**old, 'skipped': bad}))
        with pytest.raises(ValueError, match=r"ablation\.json: 'skipped' must map"): load_ablation(run / 'ablation.json')


def test_ablate_command_records_the_items_it_left_out(mixed_heldout, capsys):
    run = mixed_heldout / 'run'
    rc = main(['ablate', '--model', KIT, '--data', str(mixed_heldout / 'ds'), '--target', 'conversation', '--n', '7', '--batch-size', '4',
               '--quiet', '--out', str(run / 'ablation.json')])
    cap = capsys.readouterr()
    assert 'skipped: 2 text-only, 1 several images' in cap.out, cap.out
    assert rc in (0, 1), cap.err
    _shows_left_out(run, load_ablation(run / 'ablation.json'))


# ---- the loss-balance verdict of a detection run (metrics.json['loss_balance'], BBUTrainer.loss_balance)

BALANCE = {'step': 1, 'ok': True, 'warning': None, 'ratio': 0.734, 'threshold': 10.0, 'bbox_l1': 0.213, 'bbox_giou': 0.641,
           'caption': 2.07, 'weights': {'bbox': 5.0, 'giou': 2.0, 'caption': 1.0}}
HEAVY = {**BALANCE, 'ok': False, 'ratio': 37.5, 'caption': 105.3,
         'warning': 'caption loss >> bbox loss: weighted caption 105 is 37.5x the weighted box terms 2.81 (threshold 10.0); '
                    'lower detection_caption_weight (now 1.0)'}


def _balance_page(root: Path, balance) -> tuple[str, list[tuple[str, str]]]:
    root.mkdir()
    logs = [{'step': k, 'loss': 3.0 / k, 'bbox_l1': 0.2, 'bbox_giou': 0.6, 'caption': 2.0} for k in range(1, 12)]
    (root / 'metrics.json').write_text(json.dumps({'log_history': logs, **({'loss_balance': balance} if balance is not None else {})}))
    text = write_report(root).read_text()
    summary = re.search(r'<section id="summary">.*?</section>', text, re.S).group(0)
    return text, re.findall(r'<li class="(\w+)">((?:OK  |FLAG) loss balance:[^<]*)</li>', summary)


def test_report_shows_the_loss_balance_verdict(tmp_path):
    text, lines = _balance_page(tmp_path / 'ok', BALANCE)
    assert [c for c, _ in lines] == ['ok'] and 'PASS' in lines[0][1], lines
    for number in ('0.734 &lt;= threshold 10', 'step 1', 'bbox_l1 0.213', 'bbox_giou 0.641', 'caption 2.07', 'bbox 5', 'giou 2', 'caption 1'):
        assert number in lines[0][1], (number, lines)
    assert 'Loss balance (detection head)' in text and 'nothing flagged' in text

    text, lines = _balance_page(tmp_path / 'heavy', HEAVY)
    assert [c for c, _ in lines] == ['flag'] and 'WARN' in lines[0][1], lines
    assert '37.5 &gt; threshold 10' in lines[0][1] and 'lower detection_caption_weight' in lines[0][1] and 'caption 105.3' in lines[0][1]
    assert '1 flag(s)' in text

    # the trainer passes a step whose box terms are 0 (ratio inf): the page does not call that balanced
    _, lines = _balance_page(tmp_path / 'zero', {**BALANCE, 'bbox_l1': 0.0, 'bbox_giou': 0.0, 'ratio': float('inf')})
    assert [c for c, _ in lines] == ['flag'] and 'WARN' in lines[0][1] and 'box terms are 0' in lines[0][1], lines

    _, lines = _balance_page(tmp_path / 'broken', {'ok': True})   # not a record: said so, not PASS
    assert [c for c, _ in lines] == ['flag'] and 'unreadable' in lines[0][1] and 'missing step' in lines[0][1], lines

    text, lines = _balance_page(tmp_path / 'none', None)   # no detection head: no line at all
    assert lines == [] and 'loss balance' not in text.lower()


