"""The machine's ceilings, against which every kernel figure in RESULTS.md is compared.

Measures (same timing discipline as the op benchmarks): memory read bandwidth (a sum over
a buffer far larger than the last-level cache), copy bandwidth, last-level cache size,
dense fp32 GEMM rate (torch.mm) and dense GEMV time at 4096x4096 (bandwidth-bound).

    python benchmarks/bench_machine.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import torch

from _common import llc_bytes, print_table, time_ms, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mb", type=int, default=512, help="buffer size for the bandwidth test")
    args = parser.parse_args()
    dev = torch.device(args.device)
    rows = []

    buf = torch.rand(args.mb * (1 << 20) // 4, device=dev)
    out = torch.empty_like(buf)
    t = time_ms(lambda: buf.sum())["p50"]
    rows.append({"measure": "read bandwidth (sum)", "value": buf.numel() * 4 / t / 1e6, "unit": "GB/s"})
    t = time_ms(lambda: out.copy_(buf))["p50"]
    rows.append({"measure": "copy bandwidth (read+write)", "value": 2 * buf.numel() * 4 / t / 1e6, "unit": "GB/s"})
    del buf, out

    for m, k, n in [(1024, 1024, 1024), (256, 1024, 1024), (256, 4096, 4096)]:
        a = torch.randn(m, k, device=dev)
        b = torch.randn(k, n, device=dev)
        t = time_ms(lambda: torch.mm(a, b))["p50"]
        rows.append({"measure": f"fp32 GEMM {m}x{k}x{n}", "value": 2 * m * k * n / t / 1e6, "unit": "GFLOP/s"})
    w = torch.randn(4096, 4096, device=dev)
    x = torch.randn(1, 4096, device=dev)
    t = time_ms(lambda: torch.nn.functional.linear(x, w))["p50"]
    rows.append({"measure": "fp32 GEMV 4096x4096 (dense F.linear, batch 1)", "value": t, "unit": "ms"})
    rows.append({"measure": "  = effective bandwidth", "value": w.numel() * 4 / t / 1e6, "unit": "GB/s"})
    if dev.type == "cpu":
        llc = llc_bytes()
        if llc:
            rows.append({"measure": "largest CPU cache (per cpu0)", "value": llc / (1 << 20), "unit": "MiB"})
    rows.append({"measure": "threads", "value": float(torch.get_num_threads()), "unit": ""})
    print_table(rows, ["measure", "value", "unit"], title=f"machine ceilings ({args.device})")
    write_json("machine", rows, device=args.device)


if __name__ == "__main__":
    main()
