"""Shared benchmark helpers: the same timing discipline, table and JSON format for every op.

Timing uses torch.utils.benchmark (warm-up, then blocked autorange; CUDA synchronised by
the Timer) and reports the 20th/50th/80th percentiles of the per-block times in ms.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.benchmark as tbench

# TORCHSLIM_RESULTS_DIR redirects the JSON (benchmarks/gpu_check.sh uses it).
RESULTS_DIR = Path(os.environ.get("TORCHSLIM_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def time_ms(fn, min_run_time: float = 0.3, warmup: int = 3) -> dict:
    """Run fn() repeatedly; return {'p20', 'p50', 'p80'} in milliseconds."""
    for _ in range(warmup):
        fn()
    # Timer runs stmt on one thread unless told otherwise: time with the threads torch uses.
    measurement = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                               ).blocked_autorange(min_run_time=min_run_time)
    times = np.asarray(measurement.times) * 1e3
    return {"p20": float(np.percentile(times, 20)), "p50": float(np.percentile(times, 50)),
            "p80": float(np.percentile(times, 80))}


def thread_time_ms(fn, min_run_time: float = 0.3) -> float:
    """Median ms per call in CPU time of the calling (only) thread, over 5 blocks: other jobs'
    time slices on a shared machine do not count (their cache and memory traffic still does)."""
    fn()
    t0 = time.thread_time()
    fn()
    one = max(time.thread_time() - t0, 1e-6)
    n = max(1, int(min_run_time / 5 / one))
    samples = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        samples.append((time.thread_time() - t0) / n * 1e3)
    return sorted(samples)[2]


def time_interleaved(fns: dict, rounds: int = 3, min_run_time: float = 0.1, warmup: int = 2) -> dict:
    """Time several callables of one case in turns (round-robin, ``rounds`` times), so that a
    change in the machine's load hits them all alike; return {name: {'p20', 'p50', 'p80'}}
    in ms over the per-block times of all rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                             ).blocked_autorange(min_run_time=min_run_time)
            samples[name].extend(m.times)
    out = {}
    for name, times in samples.items():
        t = np.asarray(times) * 1e3
        out[name] = {"p20": float(np.percentile(t, 20)), "p50": float(np.percentile(t, 50)),
                     "p80": float(np.percentile(t, 80))}
    return out


def read_bandwidth_gbs(nbytes: int, device: str = "cpu", min_run_time: float = 0.2) -> float:
    """Read bandwidth (GB/s) of a sum over a float32 buffer of nbytes: far larger than the
    last-level cache for DRAM, a few MiB for the cache (bench_machine.py's method)."""
    buf = torch.rand(max(1, nbytes // 4), device=device)
    return buf.numel() * 4 / time_ms(lambda: buf.sum(), min_run_time=min_run_time)["p50"] / 1e6


def gemm_gflops(m: int, k: int, n: int, dtype=torch.float32, device: str = "cpu", min_run_time: float = 0.2) -> float:
    """Dense GEMM rate (GFLOP/s) of torch.mm at [m, k] x [k, n] in dtype."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / time_ms(lambda: torch.mm(a, b), min_run_time=min_run_time)["p50"] / 1e6


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_bytes() -> int | None:
    """Size of the largest CPU cache of cpu0 (the last-level cache) from sysfs, or None."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        best = max(best or 0, int(size.rstrip("KM")) * scale)
    return best


def machine_info(device: str = "cpu") -> dict:
    import torchslim

    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchslim": torchslim.build_info(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    """Print rows as a fixed-width table (floats to 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n## {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(name: str, rows: list[dict], device: str = "cpu", path: str | None = None) -> Path:
    """Write {'machine': ..., 'rows': rows} to benchmarks/results/<name>.json (or path)."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "machine": machine_info(device), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return out
