"""Masked sparse linear vs dense F.linear and vs torch.sparse CSR, measured in one run.

Tables (median ms and speed-up ratios, each with its floor):
  * inference grid: shapes 1024x1024 / 4096x4096, sparsity 0.5..0.98, batch 1/64/256
    (warm: repeated calls on one layer);
  * batch 1 cold: rotating over enough layers that their data exceeds the last-level cache;
  * training step (forward + backward to input, weight and bias), batch 256, 1024x1024;
  * a pruned 784-300-100-10 MLP at batch 1 (per-call overhead).
Floors: bytes moved / the copy bandwidth measured here, and flops / the dense GEMM rate
measured here; "floor x" is the speed-up those floors allow.

Usage: python benchmarks/bench_masked_linear.py [--quick] [--device cpu|cuda] [--threads N] [--cpu-time]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, thread_time_ms, time_ms, write_json  # noqa: E402,F401

from torchslim.nn import MaskedSparseLinear  # noqa: E402
from torchslim.ops._reference import ref_masked_linear  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


CPU_TIME = False


def p50(fn, min_run_time: float) -> float:
    """Median ms per call: wall clock (_common.time_ms), or with --cpu-time this thread's CPU
    time (_common.thread_time_ms)."""
    return thread_time_ms(fn, min_run_time) if CPU_TIME else time_ms(fn, min_run_time)["p50"]


def measure_bandwidth(device: str) -> float:
    """Copy bandwidth in bytes/s (read + write) on a buffer far larger than the LLC."""
    n = 64 * 1024 * 1024 // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    t = p50(lambda: b.copy_(a), min_run_time=0.3)
    return 2 * a.numel() * 4 / (t * 1e-3)


def measure_gemm_rate(device: str) -> float:
    """Dense GEMM rate in flop/s at the training shape (batch 256, 1024x1024)."""
    x = torch.randn(256, 1024, device=device)
    w = torch.randn(1024, 1024, device=device)
    t = p50(lambda: F.linear(x, w), min_run_time=0.3)
    return 2 * 256 * 1024 * 1024 / (t * 1e-3)


def make_layer(n_out, n_in, sparsity, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    mask = torch.rand(n_out, n_in, generator=gen) >= sparsity
    layer = MaskedSparseLinear.from_dense(lin, mask).to(device)
    dense_w = (lin.weight * mask).detach().to(device)
    return layer, dense_w, lin.bias.detach().to(device)


def sparse_bytes(layer, batch):
    nnz = int(layer.mask.sum())
    idx = 2 if layer.in_features <= 32767 else 4
    return nnz * (4 + idx) + 4 * (layer.out_features + 1) + 4 * batch * (layer.in_features + layer.out_features)


def inference_grid(args, bw, gemm, rows):
    dev = args.device
    shapes = [(1024, 1024)] if args.quick else [(1024, 1024), (4096, 4096)]
    sparsities = [0.9] if args.quick else [0.5, 0.8, 0.9, 0.95, 0.98]
    batches = [1, 256] if args.quick else [1, 64, 256]
    for n_out, n_in in shapes:
        for sp in sparsities:
            layer, dense_w, bias = make_layer(n_out, n_in, sp, dev)
            csr = dense_w.to_sparse_csr()
            for batch in batches:
                x = torch.randn(batch, n_in, device=dev)
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), ref_masked_linear(x, dense_w, layer.mask, bias),
                                               rtol=1e-3, atol=1e-3)
                    t_dense = p50(lambda: F.linear(x, dense_w, bias), args.min_time)
                    t_csr = p50(lambda: torch.sparse.mm(csr, x.t()).t() + bias, args.min_time)
                    t_ours = p50(lambda: layer(x), args.min_time)
                path = layer.last_path
                flops = 2 * batch * int(layer.mask.sum())
                floor_ms = max(sparse_bytes(layer, 0) / bw if batch == 1 else 0.0, flops / gemm) * 1e3
                dense_floor = max(4 * n_out * n_in / bw if batch == 1 else 0.0, 2 * batch * n_out * n_in / gemm) * 1e3
                rows.append({"table": "inference", "shape": f"{n_out}x{n_in}", "sparsity": sp, "batch": batch,
                             "path": path, "dense_ms": t_dense, "torch_sparse_ms": t_csr, "ours_ms": t_ours,
                             "x_dense": t_dense / t_ours, "x_torch_sparse": t_csr / t_ours,
                             "floor_ms": floor_ms, "floor_x": dense_floor / floor_ms})


def batch1_warm_cold(args, bw, rows):
    dev = args.device
    n = 4096
    sp = 0.9
    layer, dense_w, bias = make_layer(n, n, sp, dev)
    csr = dense_w.to_sparse_csr()
    x = torch.randn(1, n, device=dev)
    with torch.no_grad():
        warm = {
            "dense": p50(lambda: F.linear(x, dense_w, bias), args.min_time),
            "torch_sparse": p50(lambda: torch.sparse.mm(csr, x.t()).t() + bias, args.min_time),
            "ours": p50(lambda: layer(x), args.min_time),
        }
    # Cold: rotate over layers whose data together is >= 4x a 32 MiB last-level cache.
    llc = 32 * 1024 * 1024
    n_sparse = max(2, -(-4 * llc // sparse_bytes(layer, 1)))
    n_dense = max(2, -(-4 * llc // (4 * n * n)))
    layers, csrs, denses = [], [], []
    for i in range(n_sparse):
        lay, w, _ = make_layer(n, n, sp, dev, seed=i)
        layers.append(lay)
        csrs.append(w.to_sparse_csr())
        if i < n_dense:
            denses.append(w)
    with torch.no_grad():
        for lay in layers:
            lay(x)  # build the caches once: the rotation then measures memory traffic only
        state = {"i": 0}

        def rot(seq, call):
            def fn():
                state["i"] = (state["i"] + 1) % len(seq)
                return call(seq[state["i"]])
            return fn

        cold = {
            "dense": p50(rot(denses, lambda w: F.linear(x, w, bias)), args.min_time),
            "torch_sparse": p50(rot(csrs, lambda c: torch.sparse.mm(c, x.t()).t() + bias), args.min_time),
            "ours": p50(rot(layers, lambda lay: lay(x)), args.min_time),
        }
    floor_cold = sparse_bytes(layer, 1) / bw * 1e3
    dense_floor = 4 * n * n / bw * 1e3
    for name, t in (("warm (one layer)", warm), (f"cold ({n_sparse} layers rotated)", cold)):
        rows.append({"table": "batch1", "case": name, "shape": f"{n}x{n}", "sparsity": sp,
                     "dense_ms": t["dense"], "torch_sparse_ms": t["torch_sparse"], "ours_ms": t["ours"],
                     "x_dense": t["dense"] / t["ours"], "x_torch_sparse": t["torch_sparse"] / t["ours"],
                     "floor_ms": floor_cold, "floor_x": dense_floor / floor_cold})


def training(args, gemm, rows):
    dev = args.device
    batch, n = 256, 1024
    sparsities = [0.9, 0.98] if args.quick else [0.5, 0.8, 0.9, 0.95, 0.98]
    for sp in sparsities:
        layer, dense_w, bias = make_layer(n, n, sp, dev)
        lin = nn.Linear(n, n).to(dev)
        x = torch.randn(batch, n, device=dev, requires_grad=True)
        g = torch.randn(batch, n, device=dev)

        def step(mod):
            def fn():
                return torch.autograd.grad(mod(x), (x, mod.weight, mod.bias), g)
            return fn

        t_dense = p50(step(lin), args.min_time)
        t_ours = p50(step(layer), args.min_time)
        nnz = int(layer.mask.sum())
        floor_ms = 3 * 2 * batch * nnz / gemm * 1e3
        dense_floor = 3 * 2 * batch * n * n / gemm * 1e3
        rows.append({"table": "training", "shape": f"{n}x{n}", "sparsity": sp, "batch": batch, "path": layer.last_path,
                     "dense_ms": t_dense, "ours_ms": t_ours, "x_dense": t_dense / t_ours, "floor_ms": floor_ms,
                     "floor_x": dense_floor / floor_ms})


def mlp_batch1(args, rows):
    dev = args.device
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).to(dev)
    for sp in (0.9, 0.95):
        layers = []
        for m in dense:
            if isinstance(m, nn.Linear):
                w = m.weight.detach()
                thr = w.abs().flatten().kthvalue(int(sp * w.numel())).values
                layers.append(MaskedSparseLinear.from_dense(m, w.abs() > thr))
            else:
                layers.append(m)
        sparse = nn.Sequential(*layers).to(dev)
        x = torch.randn(1, 784, device=dev)
        with torch.no_grad():
            t_dense = p50(lambda: dense(x), args.min_time)
            t_ours = p50(lambda: sparse(x), args.min_time)
        rows.append({"table": "mlp", "model": "784-300-100-10", "sparsity": sp, "batch": 1,
                     "dense_ms": t_dense, "ours_ms": t_ours, "x_dense": t_dense / t_ours})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced set, a few seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by its CPU time (stable on a shared machine)")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/masked_linear.json)")
    args = parser.parse_args(argv)
    global CPU_TIME
    if args.cpu_time:
        CPU_TIME = True
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    args.min_time = 0.1 if args.quick else 0.3
    bw = measure_bandwidth(args.device)
    gemm = measure_gemm_rate(args.device)
    timer = "CPU time of one thread" if CPU_TIME else "wall clock"
    print(f"device {args.device}, threads {torch.get_num_threads()}, {timer}: copy bandwidth {bw / 1e9:.1f} GB/s, "
          f"dense GEMM (256x1024x1024) {gemm / 1e9:.1f} GFLOP/s")
    rows: list[dict] = []
    batch1_warm_cold(args, bw, rows)
    print_table([r for r in rows if r["table"] == "batch1"],
                ["case", "shape", "sparsity", "dense_ms", "torch_sparse_ms", "ours_ms", "x_dense", "x_torch_sparse",
                 "floor_ms", "floor_x"], "batch 1, 4096x4096, 90% sparse (median ms)")
    training(args, gemm, rows)
    print_table([r for r in rows if r["table"] == "training"],
                ["shape", "sparsity", "batch", "path", "dense_ms", "ours_ms", "x_dense", "floor_ms", "floor_x"],
                "training step: forward + backward (input, weight, bias)")
    mlp_batch1(args, rows)
    print_table([r for r in rows if r["table"] == "mlp"], ["model", "sparsity", "batch", "dense_ms", "ours_ms", "x_dense"],
                "pruned MLP, batch 1 inference")
    inference_grid(args, bw, gemm, rows)
    print_table([r for r in rows if r["table"] == "inference"],
                ["shape", "sparsity", "batch", "path", "dense_ms", "torch_sparse_ms", "ours_ms", "x_dense",
                 "x_torch_sparse", "floor_ms", "floor_x"], "inference (warm), median ms")
    write_json("masked_linear", rows, device=args.device, path=args.json)


if __name__ == "__main__":
    main()
