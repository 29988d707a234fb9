"""Security: record paths cannot leave ds_output/ (at validation and at training time), conversion writes only inside it,
configs are parsed without executing code, and checkpoints are read as tensors (safetensors / weights_only), never as pickles."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from reliability_kit import case, scene
from vlmlab.chat import ChatError, ChatProcessor
from vlmlab.data import convert, resolve_inside, validate
from vlmlab.vision import ResizeSpec

SPEC = ResizeSpec.for_family('qwen2_5_vl', max_pixels=200704)
LIBRARY = Path(__file__).resolve().parents[2] / 'vlmlab'


@pytest.fixture
def ds_copy(tiny_ds, tmp_path):
    "A private copy of the tiny ds_output, and a file outside it."
    root, recs = tiny_ds
    shutil.copytree(root, tmp_path / 'ds_output')
    outside = tmp_path / 'secret.png'
    shutil.copy(root / recs[0]['image'], outside)
    return tmp_path / 'ds_output', recs, outside


@pytest.mark.parametrize('kind', [
    pytest.param('dotdot', marks=case("record image '../secret.png' at training time", 'ChatError names the sample: "must be relative to '
                                      "ds_output/ without '..'\"; the file is never opened")),
    pytest.param('absolute', marks=case('record image as an absolute path at training time', 'ChatError names the sample: "must be relative '
                                        'to ds_output/"')),
    pytest.param('symlink', marks=case('image inside ds_output/ that is a symlink to a file outside, at training time',
                                       'ChatError names the sample: "resolves outside ds_output/"')),
])
def test_chat_processor_keeps_images_inside(ds_copy, tiny_processors, kind):
    root, recs, outside = ds_copy
    rec = dict(recs[0])
    if kind == 'dotdot': rec['image'] = '../secret.png'
    elif kind == 'absolute': rec['image'] = str(outside)
    else:
        (root / rec['image']).unlink(); (root / rec['image']).symlink_to(outside)
    with pytest.raises(ChatError, match=rf"sample '{rec['id']}': image path .*(must be relative to ds_output/|resolves outside ds_output/)"):
        ChatProcessor(*tiny_processors, 'qwen2_5_vl', root)(rec)


@case('images/train/ replaced by a symlink to a folder outside ds_output/', 'validate: every record "resolves outside ds_output/"')
def test_symlinked_image_folder(ds_copy, tiny_spec):
    root, recs, _ = ds_copy
    elsewhere = root.parent / 'elsewhere'
    shutil.move(root / 'images' / 'train', elsewhere)
    (root / 'images' / 'train').symlink_to(elsewhere, target_is_directory=True)
    rep = validate(root, tiny_spec, progress=False)
    assert len(rep.errors) == len(recs) and all('resolves outside ds_output/' in e for e in rep.errors)


@case('ds_output/ itself a symlink (data on another disk), with an internal symlink', 'accepted: paths are checked against the resolved '
      'folder, so legitimate layouts are not refused')
def test_symlinked_ds_output_is_fine(ds_copy, tiny_spec, tiny_processors):
    root, recs, _ = ds_copy
    link = root.parent / 'ds_link'; link.symlink_to(root, target_is_directory=True)
    alias = root / 'images' / 'alias.png'; alias.symlink_to(root / recs[0]['image'])
    assert validate(link, tiny_spec, progress=False).ok
    assert resolve_inside(link, 'images/alias.png') == (root / recs[0]['image']).resolve()
    assert ChatProcessor(*tiny_processors, 'qwen2_5_vl', link)(recs[0]).n_label_tokens > 0


@case('sample ids with ../ and / (LLaVA ids), split name with ../', 'images are stored under ds_output/images/<split>/ with safe names; '
      'a split name that is not a plain name is refused before anything is written')
def test_conversion_writes_only_inside(tmp_path):
    scene(tmp_path / 'a.png')
    turns = [{'from': 'human', 'value': '<image>\nWhat?'}, {'from': 'gpt', 'value': 'A square.'}]
    items = [{'id': sid, 'image': 'a.png', 'conversations': turns} for sid in ('../../escaped', '/abs/id', '..')]
    (tmp_path / 'llava.json').write_text(json.dumps(items))
    out = tmp_path / 'work' / 'ds_output'
    s = convert(tmp_path / 'llava.json', out, SPEC, progress=False)
    assert s.written == 3
    written = [p for p in (tmp_path / 'work').rglob('*') if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert len(list((out / 'images' / 'train').iterdir())) == 3
    assert validate(out, SPEC, progress=False).ok
    for split in ('../escape', 'a/b', '', '.hidden'):
        with pytest.raises(ValueError, match='split name'):
            convert(tmp_path / 'llava.json', out, SPEC, split=split, progress=False)
    assert not (tmp_path / 'work' / 'escape.jsonl').exists() and not (out / 'a').exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    "Every call in `tree` as ('module.attr', node) for attribute calls on a name."
    return [(f'{n.func.value.id}.{n.func.attr}', n) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)]


@case('how the library reads configs and checkpoints (source scan of vlmlab/)', 'YAML only through yaml.safe_load / safe_dump; no pickle, '
      'no torch.load without weights_only=True, no numpy allow_pickle; checkpoints through safetensors')
def test_library_never_unpickles_or_loads_unsafe_yaml():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(LIBRARY.glob('*.py'))}
    assert len(trees) > 10
    problems, yaml_calls, safetensors_loads = [], 0, 0
    for name, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in n.names] + ([n.module] if isinstance(n, ast.ImportFrom) and n.module else [])
                exceptions_only = isinstance(n, ast.ImportFrom) and n.module == 'pickle' and {a.name for a in n.names} <= {'UnpicklingError'}
                if not exceptions_only and any(m.split('.')[0] in ('pickle', 'cPickle', 'dill', 'marshal', 'shelve') for m in mods):
                    problems.append(f'{name}: imports {mods}')   # the exception class alone (to name a refused pickle) loads nothing
                if isinstance(n, ast.ImportFrom) and (n.module == 'yaml' and {a.name for a in n.names} - {'safe_load', 'safe_dump', 'YAMLError'}
                                                      or n.module == 'torch' and 'load' in {a.name for a in n.names}):
                    problems.append(f'{name}:{n.lineno}: from {n.module} import {[a.name for a in n.names]}')
        for call, node in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            if call.startswith('yaml.'):
                yaml_calls += 1
                if call not in ('yaml.safe_load', 'yaml.safe_dump'): problems.append(f'{name}:{node.lineno}: {call}')
            if call == 'torch.load' and not (isinstance(kw.get('weights_only'), ast.Constant) and kw['weights_only'].value is True):
                problems.append(f'{name}:{node.lineno}: torch.load without weights_only=True')
            if call == 'np.load' and isinstance(kw.get('allow_pickle'), ast.Constant) and kw['allow_pickle'].value:
                problems.append(f'{name}:{node.lineno}: np.load(allow_pickle=True)')
        src = ast.unparse(tree)
        safetensors_loads += src.count('load_safetensors_model(') + src.count('load_file(')
    assert problems == []
    assert yaml_calls >= 1 and safetensors_loads >= 1   # the scan saw the real loaders


class Payload:
    "A pickle that creates a file when it is unpickled."
    def __init__(self, marker: Path): self.marker = marker
    def __reduce__(self): return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
@case('checkpoint folder with pickles that run code (optimizer.pt, scheduler.pt, rng_state.pth, pytorch_model.bin)',
      'resume loads weights only from vlmlab_model.safetensors and the Trainer states with weights_only=True: '
      'the pickles are refused and never run')
def test_checkpoint_pickles_never_run(nan_gradient_run, tmp_path):
    import pickle
    from vlmlab.checkpoints import _write_marker, checkpoint_complete, load_checkpoint_weights
    tr, _, out, _ = nan_gradient_run
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'checkpoint-9'; shutil.copytree(out / 'checkpoint-2', evil)
    for f in ('optimizer.pt', 'scheduler.pt', 'rng_state.pth', 'pytorch_model.bin'): torch.save({'state': Payload(marker)}, evil / f)
    control = tmp_path / 'control.pt'; torch.save({'state': Payload(tmp_path / 'live')}, control)
    torch.load(control, weights_only=False)   # the payload is live: an unpickling load runs it
    assert (tmp_path / 'live').exists()
    with pytest.raises(pickle.UnpicklingError):
        tr._load_rng_state(str(evil))
    with pytest.raises(pickle.UnpicklingError):
        tr._load_optimizer_and_scheduler(str(evil))
    (evil / 'vlmlab_model.safetensors').unlink()   # only the pickled weights remain, in a folder marked complete
    _write_marker(evil, 9)
    assert checkpoint_complete(evil)
    with pytest.raises(FileNotFoundError, match='no vlmlab_model.safetensors'):
        tr._load_from_checkpoint(str(evil))
    with pytest.raises(FileNotFoundError, match='no vlmlab_model.safetensors'):
        load_checkpoint_weights(tr.model, evil)
    assert not marker.exists(), 'a pickle in the checkpoint ran code'
    load_checkpoint_weights(tr.model, out / 'checkpoint-2')   # the real checkpoint still loads
