"""Several processes over gloo: FSDP2 through the Trainer gives the losses of one process and of DDP, exports the gathered weights
and resumes; a rank whose batch has no image does not hang its peers (DDP and FSDP2); DeepSpeed configs reach the Trainer."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from vlmlab.config import ConfigError, VLMLabConfig
from vlmlab.data import convert
from vlmlab.tiny import tiny_kit
from vlmlab.vision import ResizeSpec

REPO = Path(__file__).resolve().parent.parent
TERMS = ('loss', 'lm_loss', 'teacher_lm_loss', 'student_lm_loss', 'detection_loss', 'bbox_l1', 'bbox_giou', 'objectness', 'caption',
         'grad_norm/llm', 'grad_norm/head', 'weight_norm/llm')
TORCHRUN = str(Path(sys.executable).parent / 'torchrun')


def _cfg(path: Path, ds, out, lora: bool = False, **training) -> Path:
    t = {'output_dir': str(out), 'max_steps': 4, 'per_device_batch_size': 2, 'logging_steps': 1, 'save_steps': 2, 'warmup_ratio': 0.0,
         **training}
    path.write_text(yaml.safe_dump({
        'model': {'name_or_path': 'tiny-kit/qwen2_5_vl', 'detection_head': True, 'head_d_model': 32, 'num_queries': 4},
        'data': {'ds_output': str(ds), 'target': 'grounding', 'teacher_ratio': 0.5},
        'stage': {'name': 'stage2', 'lrs': {'merger': 1e-3, 'llm': 1e-3, 'adapter': 1e-3, 'head': 1e-3}, 'lora': lora, 'lora_r': 4},
        'training': t}))
    return path


def _port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return str(s.getsockname()[1])


def _env():
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def _run(cmd, timeout=400):
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)   # a hang fails here, not forever
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train(cfg: Path, vlmlab_bin: str, processes: int, *extra: str):
    pre = [TORCHRUN, '--nproc_per_node', str(processes), '--master_port', _port()] if processes > 1 else []
    return _run([*pre, vlmlab_bin, 'train', '--config', str(cfg), '--quiet', *extra])


def _metrics(out: Path) -> dict:
    return json.loads((out / 'metrics.json').read_text())


def _logged(out: Path, terms=TERMS) -> dict:
    return {h['step']: [h[k] for k in terms] for h in _metrics(out)['log_history'] if 'lm_loss' in h}


def _close(a: dict, b: dict, steps, tol=1e-4):
    for s in steps:
        for k, x, y in zip(TERMS, a[s], b[s]): assert abs(x - y) <= tol * max(1.0, abs(x)), (s, k, x, y)


@pytest.fixture(scope='module')
def one(ds, tmp_path_factory, vlmlab_bin):
    "The 1-process run (batch 4) every multi-process run is compared with."
    out = tmp_path_factory.mktemp('one')
    _train(_cfg(out / 'one.yaml', ds, out / 'run', per_device_batch_size=4), vlmlab_bin, 1)
    return out / 'run'


@pytest.mark.slow
def test_fsdp2_gives_the_losses_of_one_process_and_ddp_exports_and_resumes(ds, one, tmp_path, vlmlab_bin):
    runs = {'one': _logged(one)}
    shutil.copytree(one, tmp_path / 'one')
    for name, extra in (('ddp', {}), ('fsdp', {'fsdp': 'full_shard'})):
        _train(_cfg(tmp_path / f'{name}.yaml', ds, tmp_path / name, per_device_batch_size=2, **extra), vlmlab_bin, 2)
        runs[name] = _logged(tmp_path / name)
    assert [_metrics(tmp_path / n)['distributed']['engine'] for n in runs] == ['single', 'ddp', 'fsdp2']
    assert list(runs['one']) == list(runs['ddp']) == list(runs['fsdp']) == [1, 2, 3, 4]
    _close(runs['one'], runs['fsdp'], [1, 2, 3, 4]); _close(runs['ddp'], runs['fsdp'], [1, 2, 3, 4])   # every term and norm, same global batch
    # the final export holds the gathered weights: the same tensors as the DDP run's
    a, b = (load_file(str(tmp_path / n / 'final' / 'model.safetensors')) for n in ('ddp', 'fsdp'))
    assert a.keys() == b.keys() and len(a) > 50
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    ck = tmp_path / 'fsdp' / 'checkpoint-2'
    assert (ck / 'pytorch_model_fsdp.bin').is_file() and (ck / 'vlmlab_model.safetensors').is_file()
    # resume under FSDP from checkpoint-2: steps 3 and 4 again, as in the uninterrupted run
    shutil.rmtree(tmp_path / 'fsdp' / 'checkpoint-4')
    _train(tmp_path / 'fsdp.yaml', vlmlab_bin, 2, '--resume')
    m = _metrics(tmp_path / 'fsdp')
    assert m['resumed_from'].endswith('checkpoint-2') and m['distributed']['engine'] == 'fsdp2'
    _close(runs['fsdp'], _logged(tmp_path / 'fsdp'), [3, 4])


@pytest.mark.slow
def test_fsdp2_with_lora_exports_the_merged_weights_of_ddp(ds, tmp_path, vlmlab_bin):
    "LoRA adapters sharded with their frozen base: the gathered state loads into a fresh LoRA model, merged at export as under DDP."
    for name, extra in (('ddp', {}), ('fsdp', {'fsdp': 'full_shard'})):
        _train(_cfg(tmp_path / f'{name}.yaml', ds, tmp_path / name, lora=True, max_steps=2, save_steps=1000, **extra), vlmlab_bin, 2)
    a, b = (load_file(str(tmp_path / n / 'final' / 'model.safetensors')) for n in ('ddp', 'fsdp'))
    assert a.keys() == b.keys() and not any('lora_' in k for k in a)
    ref = load_file(str(Path(tiny_kit('qwen2_5_vl')) / 'model.safetensors'))
    moved = [k for k in a if k in ref and not torch.equal(a[k], ref[k])]
    assert moved, 'the merged export equals the base model: the adapters did not reach it'
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5
    _close(_logged(tmp_path / 'ddp'), _logged(tmp_path / 'fsdp'), [1, 2])


@pytest.mark.slow
@pytest.mark.parametrize('stage', [2, 3])
def test_deepspeed_zero_gives_the_losses_of_one_process_and_exports(ds, one, tmp_path, vlmlab_bin, stage):
    "Runs where DeepSpeed is installed (it is not a dependency): ZeRO-2 / ZeRO-3 from the shipped configs, on 2 CPU processes."
    pytest.importorskip('deepspeed', reason='DeepSpeed is not installed (pip install deepspeed to run the ZeRO tests)')
    cfg = _cfg(tmp_path / 'z.yaml', ds, tmp_path / 'z', per_device_batch_size=2, deepspeed=str(REPO / 'configs' / f'deepspeed_zero{stage}.json'))
    _train(cfg, vlmlab_bin, 2)
    assert _metrics(tmp_path / 'z')['distributed']['engine'] == f'deepspeed_zero{stage}'
    losses = {s: v[:9] for s, v in _logged(tmp_path / 'z', TERMS[:9]).items()}   # the gradient norms are DeepSpeed's own (not logged per group)
    ref = {s: v[:9] for s, v in _logged(one).items()}
    assert list(losses) == [1, 2, 3, 4]
    for s in losses:
        for k, x, y in zip(TERMS, ref[s], losses[s]): assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (s, k, x, y)
    a, b = (load_file(str(p / 'final' / 'model.safetensors')) for p in (one, tmp_path / 'z'))
    assert a.keys() == b.keys() and max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-3


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    "12 LLaVA samples: 8 text-only, 4 with an image, converted for the tiny Qwen2.5-VL."
    work = tmp_path_factory.mktemp('mixed')
    items = []
    for k in range(12):
        it = {'id': f's{k}', 'conversations': [{'from': 'human', 'value': f'Question {k}: what is shown?'},
                                               {'from': 'gpt', 'value': f'answer number {k} here'}]}
        if k % 3 == 0:
            img = Image.new('RGB', (96, 80), (240, 240, 240))
            ImageDraw.Draw(img).rectangle([10 + k, 10, 50 + k, 50], fill=(200, 30, 30)); img.save(work / f'img{k}.png')
            it['image'], it['conversations'][0]['value'] = f'img{k}.png', '<image>\n' + it['conversations'][0]['value']
        items.append(it)
    (work / 'mixed.json').write_text(json.dumps(items))
    s = convert(work / 'mixed.json', work / 'ds', ResizeSpec.from_pretrained(tiny_kit('qwen2_5_vl')), progress=False)
    assert (s.written, s.rejected) == (12, 0), s
    return work / 'ds'


@pytest.mark.slow
@pytest.mark.parametrize('engine', ['ddp', 'fsdp'])
def test_a_rank_without_images_does_not_hang_its_peers(mixed, tmp_path, engine):
    "Stage 1 trains only the merger: a rank whose batch has no image still runs the vision tower (zero-weighted), so no collective waits."
    _run([TORCHRUN, '--nproc_per_node', '2', '--master_port', _port(), str(REPO / 'tests' / 'torchrun_mixed.py'), str(mixed),
          str(tmp_path), engine], timeout=300)
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert r0['fsdp'] == (engine == 'fsdp')
    pairs = list(zip(r0['seen'][:6], r1['seen'][:6]))
    assert (True, False) in pairs or (False, True) in pairs, pairs   # a step where one rank had an image and the other none
    assert len(r0['losses']) == 6 and all(torch.isfinite(torch.tensor(r0['losses'])))


def test_deepspeed_configs_are_shipped_and_checked(tmp_path):
    for stage in (2, 3):
        f = REPO / 'configs' / f'deepspeed_zero{stage}.json'
        d = json.loads(f.read_text())
        assert d['zero_optimization']['stage'] == stage
        assert all(d[k] == 'auto' for k in ('train_micro_batch_size_per_gpu', 'gradient_accumulation_steps', 'gradient_clipping'))
        cfg = VLMLabConfig.from_dict({'training': {'deepspeed': str(f)}})
        from vlmlab.trainer import sharding_arguments
        assert sharding_arguments(cfg) == {'deepspeed': str(f)}
    with pytest.raises(ConfigError, match='both set'):
        VLMLabConfig.from_dict({'training': {'deepspeed': str(REPO / 'configs' / 'deepspeed_zero2.json'), 'fsdp': 'full_shard'}})
    bad = tmp_path / 'bad.json'; bad.write_text('{"train_batch_size": 8}')
    with pytest.raises(ConfigError, match='no zero_optimization'): VLMLabConfig.from_dict({'training': {'deepspeed': str(bad)}})


def test_fsdp_settings_shard_each_block():
    from vlmlab.trainer import sharding_arguments
    cfg = VLMLabConfig.from_dict({'model': {'name_or_path': 'tiny-kit/qwen2_5_vl'}, 'training': {'fsdp': 'shard_grad_op offload'}})
    a = sharding_arguments(cfg)
    assert a['fsdp'] is True and a['fsdp_config']['transformer_layer_cls_to_wrap'] == ['Qwen2_5_VLDecoderLayer', 'Qwen2_5_VLVisionBlock']
    assert a['fsdp_config']['reshard_after_forward'] is False and a['fsdp_config']['cpu_offload'] is True
    with pytest.raises(ConfigError, match="'zero3' is not an FSDP2 option"): VLMLabConfig.from_dict({'training': {'fsdp': 'zero3'}})
