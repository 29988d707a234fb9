"""The prepared GPU check (`make gpu-check`): packed == solo in bf16 for every family and attention, packed vs padded
training tokens/s and peak memory at a real model size, the trainer page's sync-point cell, and the hybrid family
with flash-linear-attention where it installs. Results go to benchmarks/results/gpu.json.

On a machine without a GPU it says so, runs the same code paths on CPU at small sizes (float32, under two minutes),
writes the same JSON with `"dry_run": true`, and exits 0; `make test` runs that dry run.

    python benchmarks/gpu_check.py [--dry-run] [--out benchmarks/results/gpu.json] [--budget-s 420]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))

# bf16 packed vs solo: both runs do the same matmuls on different row layouts, so kernels may pick other tilings;
# logits of a random model are O(1) and bf16 keeps 8 bits of mantissa: 1/16 of the logit scale is the stated bound.
BF16_TOLERANCE = 0.0625
FP32_TOLERANCE = 1e-5
DEFAULT_MROPE_SECTION = {'qwen2_5_vl': [16, 24, 24], 'qwen3_5': [11, 11, 10]}   # modeling code defaults


def installed(module: str) -> bool:
    "Whether `module` can be imported here (without importing it)."
    return importlib.util.find_spec(module) is not None


class PeakMemory:
    "Peak memory of a block: CUDA max allocated on a GPU, else the peak resident set size above the start (sampled)."
    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); self.base = torch.cuda.memory_allocated()
        else:
            import psutil
            self.proc = psutil.Process(); self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True); self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005): self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(); self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set(); self.thread.join()
        return False


def kit_samples(family: str, work: Path, n: int, size_range: tuple[int, int], seed: int = 0) -> tuple[list, object, object]:
    "Processed grounding samples of the tiny kit's shapes data for `family`: (samples, tokenizer, image processor)."
    from transformers import AutoImageProcessor, AutoTokenizer
    from vlmlab.chat import ChatProcessor
    from vlmlab.data import convert, make_shapes, read_jsonl
    from vlmlab.tiny import tiny_kit
    from vlmlab.vision import ResizeSpec
    kit = tiny_kit(family)
    raw, ds = work / f'raw-{seed}-{n}', work / f'ds-{family}-{seed}-{n}'
    if not raw.exists(): make_shapes(raw, n=n, seed=seed, old_format=0, size_range=size_range, max_objects=6)
    convert(raw, ds, ResizeSpec.from_pretrained(kit), progress=False)
    tok, ip = AutoTokenizer.from_pretrained(kit), AutoImageProcessor.from_pretrained(kit)
    proc = ChatProcessor(tok, ip, family, ds, target='grounding')
    return [proc(r, 0) for _, r, _ in read_jsonl(ds / 'train.jsonl')], tok, ip


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    "A collated batch on `device`, pixel values in `dtype`."
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v): v = v.to(device, dtype=dtype if v.is_floating_point() else v.dtype)
        out[k] = v
    return out


def packed_vs_solo(family: str, attn: str, device: torch.device, dtype: torch.dtype, work: Path) -> dict:
    "Max |logit difference| between a packed row of 4 samples and their solo runs, tiny kit model of `family`."
    from transformers import AutoModelForImageTextToText
    from vlmlab.collators import PackedDataCollator, StandardDataCollator, model_inputs
    from vlmlab.hybrid import prepare_for_packing
    from vlmlab.tiny import tiny_kit
    samples, tok, _ = kit_samples(family, work, 4, (96, 320))
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_kit(family), dtype=dtype, attn_implementation=attn).to(device).eval()
    impl = prepare_for_packing(vlm) if attn != 'flash_attention_2' else attn   # what the trainer does before packed rows
    packed = to_device(PackedDataCollator(tok.pad_token_id, flash_attn_kwargs=True)(samples), device, dtype)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        out = vlm(**model_inputs(packed)).logits[0].float()
        cu = packed['cu_seqlens'].tolist()
        for s, a, b in zip(samples, cu, cu[1:]):
            solo = to_device(StandardDataCollator(tok.pad_token_id)([s]), device, dtype)
            ref = vlm(**model_inputs(solo)).logits[0].float()
            worst = max(worst, (out[a:b] - ref).abs().max().item()); scale = max(scale, ref.abs().max().item())
    tol = BF16_TOLERANCE if dtype == torch.bfloat16 else FP32_TOLERANCE
    return {'family': family, 'attention': impl, 'dtype': str(dtype).split('.')[-1], 'max_abs_logit_diff': worst,
            'logit_scale': scale, 'tolerance': tol, 'passed': worst <= tol, 'tokens': cu[-1]}


def real_size_config(family: str, layers: int, dry_run: bool):
    "A random-weight config at a released size (fewer layers): Qwen2.5-VL-3B's text and vision widths, or Qwen3.5-2B's."
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(family)
    t, v = cfg.text_config, cfg.vision_config
    if family == 'qwen2_5_vl':   # Qwen2.5-VL-3B-Instruct's config.json: hidden 2048, 16 heads, 2 kv heads, 11008 MLP; ViT 1280
        t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 2048, 11008, 16, 2
        v.hidden_size, v.out_hidden_size, v.intermediate_size, v.num_heads = 1280, 2048, 3420, 16
    if dry_run:   # the same code path at a size a CPU runs in seconds
        t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 128, 256, 4, 2
        v.hidden_size, v.out_hidden_size, v.intermediate_size, v.num_heads, v.depth = 64, 128, 128, 2, 1
        if hasattr(t, 'head_dim'): t.head_dim = 32
        for k in ('linear_key_head_dim', 'linear_value_head_dim'):
            if hasattr(t, k): setattr(t, k, 32)
        for k in ('linear_num_key_heads', 'linear_num_value_heads'):
            if hasattr(t, k): setattr(t, k, 2)
        if hasattr(v, 'num_position_embeddings'): v.num_position_embeddings = 64
        if hasattr(v, 'deepstack_visual_indexes'): v.deepstack_visual_indexes = [0]
        if hasattr(v, 'fullatt_block_indexes'): v.fullatt_block_indexes = [0]
    else:
        v.depth = max(4, layers)
        if hasattr(v, 'fullatt_block_indexes'): v.fullatt_block_indexes = [v.depth - 1]
        if hasattr(v, 'deepstack_visual_indexes'): v.deepstack_visual_indexes = [1, v.depth - 1]
    t.num_hidden_layers = layers
    rope = dict(getattr(t, 'rope_parameters', None) or {})
    sec = rope.get('mrope_section') or DEFAULT_MROPE_SECTION[family]   # the model's code default when the config has none
    head = getattr(t, 'head_dim', None) or t.hidden_size // t.num_attention_heads
    half = int(head * (rope.get('partial_rotary_factor') or getattr(t, 'partial_rotary_factor', None) or 1.0)) // 2
    scaled = [max(1, v * half // sum(sec)) for v in sec]; scaled[0] += half - sum(scaled)   # the sections must fill the rotary half
    t.rope_parameters = dict(rope, mrope_section=scaled)
    if getattr(t, 'layer_types', None) is not None:
        t.layer_types = (t.layer_types * layers)[:layers] if family == 'qwen2_5_vl' else \
            ['full_attention' if (i + 1) % 4 == 0 else 'linear_attention' for i in range(layers)]
    return cfg


def train_throughput(family: str, mode: str, lora: bool, device: torch.device, dtype: torch.dtype, work: Path,
                     layers: int, steps: int, dry_run: bool) -> dict:
    "Real tokens/s and peak memory of forward + backward + AdamW steps on padded batches or packed rows of the same samples."
    from transformers import AutoModelForImageTextToText
    from vlmlab.collators import PackedDataCollator, StandardDataCollator, model_inputs, plan_packs
    from vlmlab.hybrid import prepare_for_packing
    from vlmlab.model import add_lora
    kit_family = family
    samples, tok, ip = kit_samples(kit_family, work, 4 if dry_run else 64, (56, 112) if dry_run else (224, 896), seed=1)
    cfg = real_size_config(family, layers, dry_run)
    for k in ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id'):
        setattr(cfg, k, getattr(tok, 'convert_tokens_to_ids')({'image_token_id': '<|image_pad|>', 'video_token_id': '<|video_pad|>',
                'vision_start_token_id': '<|vision_start|>', 'vision_end_token_id': '<|vision_end|>'}[k]))
    cfg.text_config.vocab_size = len(tok) if dry_run else max(cfg.text_config.vocab_size, len(tok))   # real vocab on a GPU
    torch.manual_seed(0)
    vlm = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation='sdpa').to(device).train()
    if mode == 'packed': prepare_for_packing(vlm)   # the trainer's packing set-up
    if lora: add_lora(vlm, r=16)
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = 4
    if mode == 'padded':
        order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
        groups = [order[i:i + batch] for i in range(0, len(order), batch)]
        make = lambda g: StandardDataCollator(tok.pad_token_id)([samples[i] for i in g])
    else:
        lengths = [len(s) for s in samples]
        cap = max(max(lengths), batch * sum(lengths) // len(lengths))
        groups = plan_packs(lengths, cap)
        make = lambda g: PackedDataCollator(tok.pad_token_id, flash_attn_kwargs=True)([samples[i] for i in g])
    batches = [to_device(make(g), device, dtype) for g in groups]
    real = lambda b: int(b['attention_mask'].sum()) if b.get('attention_mask') is not None else int(b['cu_seqlens'][-1])
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def step(b):
        out = vlm(**model_inputs(b))
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    step(batches[0]); sync()   # warm-up (kernels, allocator)
    tokens, t0 = 0, time.perf_counter()
    with PeakMemory(device) as mem:
        for k in range(steps):
            b = batches[k % len(batches)]; step(b); tokens += real(b)
        sync()
    dt = time.perf_counter() - t0
    del vlm, opt
    if device.type == 'cuda': torch.cuda.empty_cache()
    return {'tokens_per_s': tokens / dt, 'peak_memory_mib': mem.peak / 2 ** 20, 'steps': steps, 'real_tokens': tokens}


def throughput_table(family: str, lora: bool, device, dtype, work, layers, steps, dry_run, repeats: int) -> dict:
    "Packed and padded alternating (ABBA), the packed / padded ratio per repeat, medians."
    per = {'padded': [], 'packed': []}
    mem = {'padded': 0.0, 'packed': 0.0}
    for r in range(repeats):
        for mode in (('padded', 'packed') if r % 2 == 0 else ('packed', 'padded')):
            res = train_throughput(family, mode, lora, device, dtype, work, layers, steps, dry_run)
            per[mode].append(res['tokens_per_s']); mem[mode] = max(mem[mode], res['peak_memory_mib'])
    ratios = [a / b for a, b in zip(per['packed'], per['padded'])]
    return {'family': family, 'lora': lora, 'layers': layers, 'dtype': str(dtype).split('.')[-1],
            'tokens_per_s': {k: statistics.median(v) for k, v in per.items()}, 'per_repeat': per,
            'packed_over_padded': statistics.median(ratios), 'ratio_range': [min(ratios), max(ratios)],
            'peak_memory_mib': mem}


def sync_point_cell(out_dir: Path, dry_run: bool) -> dict:
    "Execute nbs/07_trainer.ipynb with its `gpu` cells (slow cells skipped) and keep the executed notebook."
    if dry_run: return {'ran': False, 'why': 'no GPU: the `gpu` cells of 07_trainer (bug index row 52) need CUDA'}
    dest = out_dir / '07_trainer.executed.ipynb'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'run_notebook.py'), str(REPO / 'nbs' / '07_trainer.ipynb'), 'slow', str(dest)],
                       capture_output=True, text=True, timeout=300)
    return {'ran': r.returncode == 0, 'notebook': str(dest), 'tail': (r.stdout + r.stderr)[-2000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dry-run', action='store_true', help='run the CPU dry run even where a GPU is present')
    ap.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' / 'gpu.json'), help='results file')
    ap.add_argument('--budget-s', type=float, default=420.0, help='skip the remaining sections after this many seconds')
    a = ap.parse_args()
    gpu = torch.cuda.is_available() and not a.dry_run
    dry = not gpu
    device = torch.device('cuda' if gpu else 'cpu')
    dtype = torch.bfloat16 if gpu else torch.float32
    if dry: print('gpu-check: no GPU here' + (' (--dry-run)' if torch.cuda.is_available() else '') +
                  ': dry run of the same code paths on CPU, float32, small sizes')
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '2')))
    from vlmlab.families import FAMILIES
    from vlmlab.tiny import HYBRID_FAMILIES, VLM_FAMILIES
    t_start = time.time()
    res = {'dry_run': dry, 'device': torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
           'torch': torch.__version__, 'cuda': torch.version.cuda, 'flash_attn': installed('flash_attn'),
           'flash_linear_attention': installed('fla'), 'causal_conv1d': installed('causal_conv1d'),
           'tolerance': {'bfloat16': BF16_TOLERANCE, 'float32': FP32_TOLERANCE}, 'packed_vs_solo': [], 'throughput': [],
           'skipped': [], 'errors': []}
    out_dir = Path(a.out).parent; out_dir.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn):
        if time.time() - t_start > a.budget_s: res['skipped'].append(f"{name}: over the {a.budget_s:.0f} s budget"); return None
        t0 = time.time()
        try:
            v = fn(); print(f"  {name}: {time.time() - t0:.1f} s", flush=True); return v
        except Exception as e:   # one failing section must not hide the others' results
            res['errors'].append(f"{name}: {type(e).__name__}: {e}"); traceback.print_exc(); return None

    with tempfile.TemporaryDirectory(prefix='vlmlab-gpu-check-') as w:
        work = Path(w)
        attns = ['sdpa'] + (['flash_attention_2'] if gpu and res['flash_attn'] else [])
        for fam in VLM_FAMILIES + HYBRID_FAMILIES:
            for attn in attns:
                if attn == 'flash_attention_2' and FAMILIES[fam].packing == 'linear_attention' and not res['flash_linear_attention']:
                    res['skipped'].append(f"{fam} with flash attention: flash-linear-attention is not installed"); continue
                r = section(f"packed vs solo {fam} {attn}", lambda: packed_vs_solo(fam, attn, device, dtype, work))
                if r: res['packed_vs_solo'].append(r); print(f"    max |diff| {r['max_abs_logit_diff']:.3g} (tolerance {r['tolerance']}, "
                                                              f"{r['attention']}): {'PASS' if r['passed'] else 'FAIL'}")
        big = [('qwen2_5_vl', 8 if gpu else 2)] + [('qwen3_5', 8 if gpu else 4)]
        for fam, layers in big:
            for lora in ((True, False) if gpu or fam == 'qwen2_5_vl' else (False,)):   # dry run: LoRA's path is the same for both
                r = section(f"throughput {fam} {'LoRA' if lora else 'full'}",
                            lambda: throughput_table(fam, lora, device, dtype, work, layers, 12 if gpu else 2, dry, 2 if gpu else 1))
                if r: res['throughput'].append(r); print(f"    packed / padded tokens/s {r['packed_over_padded']:.2f}, "
                                                         f"peak MiB {r['peak_memory_mib']}")
        r = section('sync-point cell', lambda: sync_point_cell(out_dir, dry))
        if r: res['sync_point_cell'] = r
    res['seconds'] = time.time() - t_start
    res['passed'] = not res['errors'] and all(r['passed'] for r in res['packed_vs_solo'])
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
    print(f"gpu-check: {'PASS' if res['passed'] else 'FAIL'} in {res['seconds']:.0f} s -> {a.out}")
    return 0 if res['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
