"""export_for_serving: a plain transformers checkpoint (LoRA merged) that loads and generates without vlmlab, the
detection head beside it, the training chat template, and an atomic write that never replaces what it should not."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmlab.chat import DEFAULT_GROUNDING_PROMPT
from vlmlab.checkpoints import COMPLETE_MARKER, CheckpointError, _write_marker, checkpoint_problem
from vlmlab.config import VLMLabConfig
from vlmlab.data import convert, make_shapes
from vlmlab.export import (HEAD_DIR, HEAD_FILE, SERVE_SCRIPT, SERVING_MANIFEST, _generation_stops, export_command,
                           export_for_serving, load_detection_head, load_trained)
from vlmlab.inference import detect, prompt_inputs
from vlmlab.tiny import tiny_kit
from vlmlab.tokens import qwen_chat_template
from vlmlab.trainer import train_from_config
from vlmlab.vision import ResizeSpec, load_image

FAMILY = 'tiny-kit/qwen2_5_vl'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A 3-step LoRA run with a detection head, its checkpoint, held-out images and a serving export of the checkpoint."
    work = tmp_path_factory.mktemp('export')
    spec = ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl'))
    make_shapes(work / 'raw', n=8, seed=3, old_format=0, size_range=(112, 160), max_objects=2)
    make_shapes(work / 'held', n=2, seed=77, old_format=0, size_range=(112, 160), max_objects=2)
    convert(work / 'raw', work / 'ds', spec, progress=False)
    convert(work / 'held', work / 'ds', spec, split='heldout', progress=False)
    cfg = VLMLabConfig.from_dict({
        'model': {'name_or_path': FAMILY, 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(work / 'ds'), 'target': 'grounding'},
        'stage': {'name': 'stage2', 'lora': True, 'lora_r': 4, 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}},
        'training': {'output_dir': str(work / 'run'), 'max_steps': 3, 'per_device_batch_size': 4, 'save_steps': 3,
                     'logging_steps': 1, 'warmup_ratio': 0.0}})
    train_from_config(cfg, progress=False)
    images = [str(work / 'ds' / json.loads(l)['image']) for l in (work / 'ds' / 'heldout.jsonl').read_text().splitlines()]
    ckpt = work / 'run' / 'checkpoint-3'
    served = export_for_serving(ckpt, work / 'serve')
    return {'work': work, 'ckpt': ckpt, 'images': images, 'served': served, 'trained': load_trained(ckpt)}


def serve(python: str, folder: Path, images: list[str], new_tokens: int = 16) -> dict:
    "Run SERVE_SCRIPT (plain transformers, vlmlab imports blocked) with `python`; its JSON result."
    r = subprocess.run([python, '-', str(folder), DEFAULT_GROUNDING_PROMPT, str(new_tokens), *images], input=SERVE_SCRIPT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ''})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def vlmlab_text_path(det, images: list[str], new_tokens: int = 16) -> list[dict]:
    "Prompt ids and greedy ids as vlmlab's text path makes them (prompt_inputs + generate)."
    out = []
    for p in images:
        batch = prompt_inputs(det, load_image(p), DEFAULT_GROUNDING_PROMPT)
        with torch.no_grad(): gen = det.vlm.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        out.append({'prompt_ids': batch['input_ids'][0].tolist(), 'generated': gen[0, batch['input_ids'].shape[1]:].tolist()})
    return out


def test_the_export_is_a_plain_merged_checkpoint(run):
    files = sorted(str(p.relative_to(run['served'])) for p in run['served'].rglob('*') if p.is_file())
    for f in ('config.json', 'model.safetensors', 'tokenizer.json', 'chat_template.jinja', 'preprocessor_config.json',
              f'{HEAD_DIR}/config.json', f'{HEAD_DIR}/{HEAD_FILE}', SERVING_MANIFEST, COMPLETE_MARKER):
        assert f in files, files
    assert not any('lora' in f or 'adapter' in f for f in files), files
    from transformers import AutoModelForImageTextToText
    m, info = AutoModelForImageTextToText.from_pretrained(run['served'], output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    assert not any('lora_' in n for n, _ in m.named_parameters())
    manifest = json.loads((run['served'] / SERVING_MANIFEST).read_text())
    assert manifest['lora_merged']['r'] == 4 and manifest['step'] == 3 and manifest['detection_head'] == HEAD_DIR


def test_generate_without_vlmlab_equals_vlmlabs_text_path(run):
    "A process that cannot import vlmlab generates, token for token, what vlmlab's text path generates on the LoRA model."
    plain = serve(sys.executable, run['served'], run['images'])
    assert plain['vlmlab_modules'] == []
    ours = vlmlab_text_path(run['trained'], run['images'])
    for o, p in zip(ours, plain['results'], strict=True):
        assert o['prompt_ids'] == p['prompt_ids']
        assert o['generated'] == p['generated'] and len(o['generated']) == 16


def test_autoprocessor_loads_the_export_where_torchvision_is_installed(run):
    "AutoProcessor needs torchvision (the Qwen-VL video processor); run where it is, or with VLMLAB_TORCHVISION_PYTHON=<python>."
    python = os.environ.get('VLMLAB_TORCHVISION_PYTHON')
    if python is None:
        pytest.importorskip('torchvision', reason='AutoProcessor of a Qwen-VL model needs torchvision (no CPU build here)')
        python = sys.executable
    plain = serve(python, run['served'], run['images'])
    assert plain['processor'] == 'AutoProcessor' and plain['vlmlab_modules'] == []
    ours = vlmlab_text_path(run['trained'], run['images'])
    assert [r['generated'] for r in plain['results']] == [o['generated'] for o in ours]
    assert [r['prompt_ids'] for r in plain['results']] == [o['prompt_ids'] for o in ours]


def test_merged_logits_equal_the_lora_models(run):
    from transformers import AutoModelForImageTextToText
    merged = AutoModelForImageTextToText.from_pretrained(run['served']).eval()
    lora = run['trained'].vlm
    dropped = copy.deepcopy(lora)
    with torch.no_grad():
        for n, p in dropped.named_parameters():
            if 'lora_B' in n: p.zero_()
        batch = prompt_inputs(run['trained'], load_image(run['images'][0]), DEFAULT_GROUNDING_PROMPT)
        want = lora(**batch).logits
        diff = (merged(**batch).logits - want).abs().max().item()
        control = (dropped(**batch).logits - want).abs().max().item()
    assert diff < 1e-5, diff
    assert control > 100 * max(diff, 1e-8), (diff, control)   # the adapters matter: the comparison can fail


def test_the_head_beside_the_export_gives_the_same_boxes(run):
    served = load_trained(run['served'])
    assert served.head is not None and not any('lora_' in n for n, _ in served.vlm.named_parameters())
    for p in run['images']:
        a = detect(run['trained'], p, threshold=0.0)
        b = detect(served, p, threshold=0.0)
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert x['caption'] == y['caption']
            assert max(abs(u - v) for u, v in zip(x['bbox'] + [x['score']], y['bbox'] + [y['score']])) < 1e-3


def test_load_detection_head_is_strict(run, tmp_path):
    out = tmp_path / 'copy'
    shutil.copytree(run['served'], out)
    head = load_detection_head(out)
    assert head.queries.num_embeddings == 4 and not head.training
    cfg = json.loads((out / HEAD_DIR / 'config.json').read_text())
    cfg['num_queries'] = 5
    (out / HEAD_DIR / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match='does not load into the head'):
        load_detection_head(out)
    (out / HEAD_DIR / 'config.json').unlink()
    with pytest.raises(CheckpointError, match='holds no detection head'):
        load_detection_head(out)


def test_a_tampered_export_is_refused_by_vlmlabs_loader(run, tmp_path):
    out = tmp_path / 'copy'
    shutil.copytree(run['served'], out)
    f = out / HEAD_DIR / HEAD_FILE
    data = bytearray(f.read_bytes()); data[-1] ^= 1; f.write_bytes(bytes(data))   # same size, other content
    with pytest.raises(CheckpointError, match=f'{HEAD_DIR}/{HEAD_FILE}: content differs'):
        load_trained(out)


def test_a_failed_write_leaves_the_older_export_whole(run, monkeypatch):
    import vlmlab.export as ex
    before = (run['served'] / COMPLETE_MARKER).read_bytes()
    def disk_full(*a, **k): raise OSError(28, 'No space left on device')
    monkeypatch.setattr(ex, 'save_file', disk_full)
    with pytest.raises(CheckpointError, match='disk full'):
        export_for_serving(run['ckpt'], run['served'])
    assert (run['served'] / COMPLETE_MARKER).read_bytes() == before and checkpoint_problem(run['served']) is None
    assert not [p for p in run['served'].parent.iterdir() if p.name.startswith('.serve')]


def test_folders_that_must_not_be_replaced(run, tmp_path):
    mine = tmp_path / 'mine'; mine.mkdir(); (mine / 'notes.txt').write_text('keep')
    with pytest.raises(FileExistsError, match='not a vlmlab serving export'):
        export_for_serving(run['ckpt'], mine)
    assert (mine / 'notes.txt').read_text() == 'keep'
    with pytest.raises(ValueError, match='inside its source'):
        export_for_serving(run['ckpt'], run['ckpt'] / 'serve')
    with pytest.raises(ValueError, match='replace or sit inside'):
        export_for_serving(run['ckpt'], run['ckpt'])


def test_a_checkpoint_without_its_run_config_is_refused_not_guessed(run, tmp_path):
    lone = tmp_path / 'checkpoint-3'
    shutil.copytree(run['ckpt'], lone)   # no metrics.json beside it: the head's sizes are unknown
    with pytest.raises(CheckpointError, match='no run config gives the head'):
        export_for_serving(lone, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_a_drifted_tokenizer_template_is_replaced_by_the_one_training_used(run, tmp_path):
    ck = tmp_path / 'run' / 'checkpoint-3'
    shutil.copytree(run['ckpt'].parent, tmp_path / 'run')
    t = ck / 'chat_template.jinja'
    t.write_text(t.read_text().replace('You are a helpful assistant.', 'You are a detector.'))
    _write_marker(ck, 3)   # a checkpoint whose tokenizer carries another system prompt than vlmlab rendered in training
    out = export_for_serving(ck, tmp_path / 'serve')
    manifest = json.loads((out / SERVING_MANIFEST).read_text())
    assert 'replacing' in manifest['chat_template'] and 'a detector' in manifest['chat_template']
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template == qwen_chat_template(run['trained'].family)


def test_generate_is_made_to_stop_at_the_answers_end(run):
    vlm, tok = copy.deepcopy(run['trained'].vlm), run['trained'].tokenizer
    vlm.generation_config.eos_token_id = tok.pad_token_id   # a generation config that would write past <|im_end|>
    said = _generation_stops(vlm, tok)
    assert 'added' in said and tok.eos_token_id in vlm.generation_config.eos_token_id, said


def test_export_command(run, tmp_path, capsys):
    assert export_command(str(run['work'] / 'run'), out=str(tmp_path / 'serve')) == 0
    said = capsys.readouterr().out
    assert f"exported {(run['work'] / 'run' / 'final').resolve()}" in said and 'detection head' in said
    assert load_trained(tmp_path / 'serve').head is not None
