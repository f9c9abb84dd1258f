"""Fused distillation loss vs the PyTorch composite (log_softmax, kl_div and their backward).

For each (N, C) and dtype: forward-only and forward+backward time (p20/p50/p80 ms) of
torchslim.ops.kd_kl_div and of the float reference ref_kd_kl_div (the same PyTorch ops
users write), measured in the same run, the speed-up, and the peak extra memory of one
forward+backward call (inputs excluded, the returned gradient included). Forward+backward
is also timed for torch.compile of the same composite (fb_compile_ms, fb_vs_compile =
compiled time / ours; --no-compile skips it).

CPU time: the machine may be shared, so next to wall-clock time the CPU time the process
spent per call (user + system, from getrusage, divided by the thread count) is reported;
on an otherwise idle machine the two agree.

Peak memory: on the CPU from the allocation/free events that torch.profiler records for
torch's allocator (running sum of the bytes, highest point); on CUDA from
torch.cuda.max_memory_allocated. The floor column is the time to read both inputs once and
write the gradient once at the bandwidth measured here, in the same run.

    python benchmarks/bench_kd_loss.py [--quick] [--device cpu|cuda] [--temperature 4] [--no-compile]
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, time_ms, write_json  # noqa: E402

from torchslim.ops import kd_kl_div  # noqa: E402
from torchslim.ops._reference import ref_kd_kl_div  # noqa: E402

SHAPES = [(4096, 10), (4096, 100), (4096, 1000), (512, 32000), (64, 128256), (128, 128256)]
QUICK_SHAPES = [(4096, 10), (512, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_extra_bytes(fn, device) -> int:
    """Highest amount of memory allocated above the starting point during one fn() call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return int(peak)


def cpu_ms_per_thread(fn, min_calls: int = 3, min_seconds: float = 0.2) -> float:
    """Process CPU time (user + system) per call, divided by the intra-op thread count."""
    import time

    fn()

    def used():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    calls, start, wall = 0, used(), time.perf_counter()
    while calls < min_calls or time.perf_counter() - wall < min_seconds:
        fn()
        calls += 1
    return (used() - start) / calls / torch.get_num_threads() * 1e3


def bandwidth_gbs(device) -> tuple[float, float]:
    """(read, write) bandwidth in GB/s over a buffer much larger than the caches."""
    buf = torch.rand(64 << 20, device=device)  # 256 MiB
    read = buf.numel() * 4 / time_ms(lambda: buf.sum(), min_run_time=0.2)["p50"] / 1e6
    write = buf.numel() * 4 / time_ms(lambda: buf.fill_(1.0), min_run_time=0.2)["p50"] / 1e6
    return read, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, short timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--no-compile", action="store_true", help="do not time torch.compile of the composite")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/kd_loss[_cuda].json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_kd_loss: --device cuda asked for but no CUDA device is available")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    run_time = 0.1 if args.quick else 0.4
    T = args.temperature

    read_bw, write_bw = bandwidth_gbs(device)
    print(f"bandwidth here: read {read_bw:.1f} GB/s, write {write_bw:.1f} GB/s, threads {torch.get_num_threads()}")

    rows = []
    for (n, c) in shapes:
        for dname, dtype in DTYPES.items():
            gen = torch.Generator().manual_seed(0)
            s = (torch.randn(n, c, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
            t = (torch.randn(n, c, generator=gen) * 3).to(device=device, dtype=dtype)

            def ours_fwd():
                with torch.no_grad():
                    return kd_kl_div(s, t, T)

            def ref_fwd():
                with torch.no_grad():
                    return ref_kd_kl_div(s, t, T)

            def ours_full():
                return torch.autograd.grad(kd_kl_div(s, t, T), s)[0]

            def ref_full():
                return torch.autograd.grad(ref_kd_kl_div(s, t, T), s)[0]

            # torch.compile of the same composite, forward and backward in one compiled graph.
            compiled = None if args.no_compile else torch.compile(
                lambda s_, t_: torch.autograd.grad(ref_kd_kl_div(s_, t_, T), s_)[0], dynamic=False)

            esize = s.element_size()
            floor_ms = (2 * n * c * esize / read_bw + n * c * esize / write_bw) / 1e6
            tf_ours, tf_ref = time_ms(ours_fwd, run_time), time_ms(ref_fwd, run_time)
            tb_ours, tb_ref = time_ms(ours_full, run_time), time_ms(ref_full, run_time)
            tb_comp = time_ms(lambda: compiled(s, t), run_time)["p50"] if compiled else float("nan")
            mem_ours, mem_ref = peak_extra_bytes(ours_full, device), peak_extra_bytes(ref_full, device)
            cpu_ours = cpu_ms_per_thread(ours_full, min_seconds=run_time) if device.type == "cpu" else float("nan")
            cpu_ref = cpu_ms_per_thread(ref_full, min_calls=2, min_seconds=run_time) if device.type == "cpu" else float("nan")
            grad_bytes = n * c * esize
            rows.append({
                "N": n, "C": c, "dtype": dname,
                "fwd_ours_ms": tf_ours["p50"], "fwd_torch_ms": tf_ref["p50"], "fwd_speedup": tf_ref["p50"] / tf_ours["p50"],
                "fb_ours_ms": tb_ours["p50"], "fb_torch_ms": tb_ref["p50"], "fb_speedup": tb_ref["p50"] / tb_ours["p50"],
                "fb_compile_ms": tb_comp, "fb_vs_compile": tb_comp / tb_ours["p50"],
                "floor_ms": floor_ms,
                "fb_ours_cpu_ms": cpu_ours, "fb_torch_cpu_ms": cpu_ref, "cpu_speedup": cpu_ref / cpu_ours,
                "peak_ours_MiB": mem_ours / 2**20, "peak_torch_MiB": mem_ref / 2**20,
                "peak_ours_in_grads": mem_ours / grad_bytes, "peak_torch_in_grads": mem_ref / grad_bytes,
                "fb_ours_p20_p80": [tb_ours["p20"], tb_ours["p80"]], "fb_torch_p20_p80": [tb_ref["p20"], tb_ref["p80"]],
            })
            print_table(rows[-1:], ["N", "C", "dtype", "fb_ours_ms", "fb_torch_ms", "fb_speedup", "fb_compile_ms",
                                    "fb_vs_compile", "fb_ours_cpu_ms",
                                    "fb_torch_cpu_ms", "cpu_speedup", "floor_ms"])
            del s, t

    cols = ["N", "C", "dtype", "fwd_ours_ms", "fwd_torch_ms", "fwd_speedup", "fb_ours_ms", "fb_torch_ms", "fb_speedup",
            "fb_compile_ms", "fb_vs_compile",
            "fb_ours_cpu_ms", "fb_torch_cpu_ms", "cpu_speedup", "floor_ms", "peak_ours_in_grads", "peak_torch_in_grads"]
    print_table(rows, cols, title=f"kd_kl_div vs PyTorch composite ({args.device}, T={T}; peak memory in [N, C] gradients)")
    for r in rows:
        r["bandwidth_read_GBs"], r["bandwidth_write_GBs"] = read_bw, write_bw
    name = "kd_loss" if device.type == "cpu" else "kd_loss_cuda"
    write_json(name, rows, device=args.device, path=args.json)


if __name__ == "__main__":
    main()
