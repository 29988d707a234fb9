"""Shared by the benchmarks: side-by-side alternating repeats, medians, paired ratios, and the machine's description."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Callable


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    "A variant that returns the wall time of one call of `fn`."
    def run() -> float:
        t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
    return run


def alternate(variants: dict[str, Callable[[], float]], repeats: int, log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    "Run every variant once per repeat, in ABBA order (reversed on odd repeats) so that drift and load hit all of them."
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            out[k].append(float(variants[k]()))
            if log: log(f"  repeat {r + 1}/{repeats}: {k}: {out[k][-1]:.4g}")
    return out


def medians(per_repeat: dict[str, list[float]]) -> dict[str, float]:
    "Median of every variant's repeats."
    return {k: statistics.median(v) for k, v in per_repeat.items()}


def paired_ratio(per_repeat: dict[str, list[float]], num: str, den: str) -> float:
    "Median over repeats of num / den, each ratio taken within one repeat (the two ran side by side)."
    return statistics.median(a / b for a, b in zip(per_repeat[num], per_repeat[den]))


def ratio_range(per_repeat: dict[str, list[float]], num: str, den: str) -> list[float]:
    "Smallest and largest per-repeat ratio num / den: the spread that the machine's noise gave this run."
    r = [a / b for a, b in zip(per_repeat[num], per_repeat[den])]
    return [min(r), max(r)]


def _version(pkg: str) -> str | None:
    try: return metadata.version(pkg)
    except metadata.PackageNotFoundError: return None


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        kb = next(int(l.split()[1]) for l in Path('/proc/meminfo').read_text().splitlines() if l.startswith('MemTotal'))
        return round(kb / 2 ** 20, 1)
    except (OSError, StopIteration): return None


def _git_commit() -> str | None:
    "HEAD's short hash, with '-dirty' when tracked files have uncommitted changes."
    try:
        git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        head = git('rev-parse', '--short', 'HEAD')
        return (head + ('-dirty' if git('status', '--porcelain', '--untracked-files=no') else '')) or None
    except (OSError, subprocess.SubprocessError): return None


def machine() -> dict:
    "CPU model, cores, memory, load, and the versions that the numbers depend on."
    import torch
    try: usable = len(os.sched_getaffinity(0))
    except AttributeError: usable = os.cpu_count()
    return {'cpu': _cpu_model(), 'arch': platform.machine(), 'cores': os.cpu_count(), 'usable_cores': usable,
            'torch_threads': torch.get_num_threads(), 'memory_gib': _mem_gib(),
            'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            'os': platform.platform(), 'python': platform.python_version(),
            'versions': {p: _version(p) for p in ('torch', 'transformers', 'trl', 'datasets', 'accelerate', 'pillow', 'vlmlab')},
            'git_commit': _git_commit(),
            'load_average_1m_at_start': round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None}


def describe(m: dict) -> str:
    "The machine in one line."
    v = m['versions']
    return (f"{m['cpu']} ({m['arch']}), {m['usable_cores']} of {m['cores']} cores usable, "
            f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}, "
            f"{m['memory_gib']} GiB, {m['gpu'] or 'no GPU'}; torch {v['torch']}, transformers {v['transformers']}, "
            f"trl {v['trl']}, Pillow {v['pillow']}, Python {m['python']}")


def set_threads(n: int | None) -> None:
    "Use `n` torch threads (None: torch's default); on a shared machine 1 avoids OpenMP threads waiting on descheduled peers."
    if n:
        import torch
        torch.set_num_threads(n)

