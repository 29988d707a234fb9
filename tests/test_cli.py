"""The `vlmlab` command as a user runs it: exit codes, --help, JSON output, failures that name the problem."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlmlab.tiny import tiny_kit, tokenizer_with_moved_token
from vlmlab.tokens import IMAGE_PAD, VISION_START


def run(vlmlab_bin, *args, timeout=300):
    return subprocess.run([vlmlab_bin, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_and_options(vlmlab_bin):
    r = run(vlmlab_bin, '--help')
    assert r.returncode == 0 and 'doctor' in r.stdout and 'demo' in r.stdout
    r = run(vlmlab_bin, 'doctor', '--help')
    assert r.returncode == 0
    for flag in ('--output-dir', '--cache-dir', '--model', '--timeout', '--json'):
        assert flag in r.stdout
    assert 'writability' in r.stdout  # the docment became help text


def test_no_command_prints_help_and_fails(vlmlab_bin):
    r = run(vlmlab_bin)
    assert r.returncode == 2 and 'COMMAND' in r.stdout


def test_doctor_json_ok(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--json', '--output-dir', str(tmp_path / 'runs'), '--model', str(tiny_kit('qwen2_vl')))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep['ok'] is True
    names = [c['name'] for c in rep['checks']]
    assert {'versions', 'torch import', 'output directory writable', 'model tokens'} <= set(names)
    torch_check = next(c for c in rep['checks'] if c['name'] == 'torch import')
    assert torch_check['data']['torch'].startswith('2.')


def test_doctor_fails_on_unwritable_output(vlmlab_bin, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    r = run(vlmlab_bin, 'doctor', '--output-dir', str(blocker / 'runs'))
    assert r.returncode == 1
    assert 'FAIL' in r.stdout and 'instead' in r.stdout and 'check(s) FAILED' in r.stdout


def test_doctor_fails_on_moved_special_token(vlmlab_bin, tmp_path):
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(tiny_kit('qwen2_5_vl'), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    moved_to = tok.convert_tokens_to_ids(VISION_START)
    tokenizer_with_moved_token(tok, IMAGE_PAD, moved_to).save_pretrained(ckpt)
    r = run(vlmlab_bin, 'doctor', '--json', '--output-dir', str(tmp_path / 'runs'), '--model', str(ckpt))
    assert r.returncode == 1
    bad = [c for c in json.loads(r.stdout)['checks'] if not c['ok']]
    assert len(bad) == 1 and f'<|image_pad|> has id {moved_to}' in bad[0]['detail'] and 'image_token_id' in bad[0]['detail']


def test_doctor_reports_missing_model(vlmlab_bin, tmp_path):
    r = run(vlmlab_bin, 'doctor', '--output-dir', str(tmp_path), '--model', str(tmp_path / 'nope'))
    assert r.returncode == 1 and 'cannot load' in r.stdout


@pytest.mark.slow
def test_demo_pipeline_writes_every_artifact(vlmlab_bin, tmp_path):
    "A short demo (a few steps: too short to read the image) writes every artifact and says the ablation did not pass."
    r = subprocess.run([vlmlab_bin, 'demo', '--output-dir', str(tmp_path / 'runs'), '--align-steps', '3', '--grounding-steps', '3',
                        '--n-train', '16', '--n-heldout', '4', '--quiet'], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'does not pass the connector ablation' in r.stdout and 'FAIL: correct image loss' in r.stdout
    out = tmp_path / 'runs' / 'demo'
    for run in ('align', 'grounding'):
        for f in ('metrics.json', 'ablation.json', 'config.yaml', 'final/config.json', 'report/index.html'):
            assert (out / run / f).is_file(), (run, f)
        assert any((out / run / 'tensorboard').iterdir())
    assert (out / 'grounding' / 'final' / 'detection_head.safetensors').is_file()
    summary = json.loads((out / 'demo.json').read_text())
    assert set(summary['mAP']) == {'head', 'text_path', 'baseline_whole_image'}
    ev = json.loads((out / 'eval.json').read_text())
    assert ev['images'] == 4 and ev['boxes'] >= 4


def test_demo_refuses_bad_options(vlmlab_bin, tmp_path):
    for args, msg in ((['--model', 'tiny-kit/llava'], 'unknown --model'), (['--data', str(tmp_path / 'nope')], 'no such folder'),
                      (['--align-steps', '0'], 'must be >= 1')):
        r = subprocess.run([vlmlab_bin, 'demo', '--output-dir', str(tmp_path / 'runs'), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stdout, r.stderr)
