"""sparse_codebook_linear vs dense F.linear, torchslim's fp32 sparse path and the dense-codebook
kernel, measured in one run (issue 13 "Targets").

Tables (median ms, speed-up ratios, each with its floor):
  * batch 1, 4096x4096, 90% pruned, 16 clusters (packed 4-bit codes): warm (one layer,
    repeated) and cold (rotating over layers whose data together is >= 4x the last-level
    cache), vs dense F.linear and vs the fp32 sparse kernel of MaskedSparseLinear on the
    same mask (``_masked_spmm``: 4 B value + 2 B column per kept weight; the module call
    is timed warm too);
  * batch 16 and 128, the same layer, warm;
  * density sweep (shapes 4096x4096, 1024x1024, 300x784; batch 1/16/128): ours vs the
    dense-codebook kernel ``codebook_linear`` (what a CodebookLinear runs today) and vs
    the fp32 sparse kernel: the data for the density rule a module should use;
  * a pruned + shared 784-300-100-10 MLP (90% pruned, 16 clusters), batch 1 and 256:
    the three layers chained on ours vs the fp32 sparse kernel.
Floor per row: bytes moved / the copy bandwidth measured here (bytes = bytes per kept
weight x kept weights + row pointers; ours 2.5 B = 2 B int16 column + 0.5 B code, fp32
sparse 6 B, dense 4 B per weight); for batched rows also flops / the dense GEMM rate.

Usage: python benchmarks/bench_sparse_codebook.py [--quick] [--threads N] [--cpu-time] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llc_bytes, print_table, thread_time_ms, time_ms, write_json  # noqa: E402

from torchslim.nn import MaskedSparseLinear  # noqa: E402
from torchslim.ops import codebook_linear, sparse_codebook_linear, sparse_codebook_pack  # noqa: E402
from torchslim.ops._reference import pack_int4  # noqa: E402
from torchslim.ops.sparse_codebook_linear import cpu_path  # noqa: E402

_ops = torch.ops.torchslim
CPU_TIME = False


def p50(fn, min_run_time: float) -> float:
    """Median ms per call: wall clock (_common.time_ms), or with --cpu-time this thread's CPU
    time (_common.thread_time_ms)."""
    return thread_time_ms(fn, min_run_time) if CPU_TIME else time_ms(fn, min_run_time)["p50"]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str) -> float:
    """Copy bandwidth in bytes/s (read + write) on a buffer far larger than the LLC."""
    a = torch.randn(64 * 1024 * 1024 // 4, device=device)
    b = torch.empty_like(a)
    t = p50(lambda: b.copy_(a), 0.3)
    return 2 * a.numel() * 4 / (t * 1e-3)


def measure_gemm_rate(device: str) -> float:
    x = torch.randn(256, 1024, device=device)
    w = torch.randn(1024, 1024, device=device)
    t = p50(lambda: F.linear(x, w), 0.3)
    return 2 * 256 * 1024 * 1024 / (t * 1e-3)


class Layer:
    """One pruned + shared layer in every form the benchmark runs."""

    def __init__(self, n_out, n_in, density, k, device, seed=0, dense=True):
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, k, (n_out, n_in), generator=gen)
        mask = torch.rand(n_out, n_in, generator=gen) < density
        self.codebook = torch.randn(k, generator=gen).to(device)
        self.bias = torch.randn(n_out, generator=gen).to(device)
        self.row_ptr, self.col_idx, self.codes = (t.to(device) for t in sparse_codebook_pack(labels, mask, k))
        self.nnz = int(mask.sum())
        self.k = k
        weight = torch.where(mask, self.codebook.cpu()[labels], torch.zeros(())).to(device)
        # the fp32 sparse path of MaskedSparseLinear on the same mask
        m = mask.to(device)
        self.m_row_ptr, self.m_col_idx, _, _ = _ops._masked_structure(m)
        self.values = _ops._masked_gather(weight, self.m_row_ptr, self.m_col_idx, False)
        self.weight = weight if dense else None
        self.mask = m if dense else None
        self.indices = None
        if dense:  # dense-codebook form (CodebookLinear's kernel): code 0 reserved for pruned positions
            idx = torch.where(mask, labels + 1, torch.zeros((), dtype=labels.dtype))
            cb0 = torch.cat((torch.zeros(1), self.codebook.cpu()))
            self.cb_dense = cb0.to(device)
            self.indices = (pack_int4(idx) if k + 1 <= 16 else idx.to(torch.uint8)).to(device)

    def ours(self, x):
        return sparse_codebook_linear(x, self.row_ptr, self.col_idx, self.codes, self.codebook, self.bias)

    def fp32_sparse(self, x):
        return _ops._masked_spmm(x, self.values, self.m_row_ptr, self.m_col_idx, self.bias)

    def dense(self, x):
        return F.linear(x, self.weight, self.bias)

    def dense_codebook(self, x):
        return codebook_linear(x, self.indices, self.cb_dense, self.bias)

    def bytes_ours(self):
        return self.codes.numel() + self.col_idx.numel() * self.col_idx.element_size() + 4 * self.row_ptr.numel()

    def bytes_fp32_sparse(self):
        return self.nnz * (4 + self.m_col_idx.element_size()) + 4 * self.m_row_ptr.numel()


def rotating(seq, call):
    state = {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % len(seq)
        return call(seq[state["i"]])
    return fn


def batch1_targets(args, bw, gemm, rows):
    dev = args.device
    n, density, k = 4096, 0.1, 16
    layer = Layer(n, n, density, k, dev)
    x = torch.randn(1, n, device=dev)
    with torch.no_grad():
        torch.testing.assert_close(layer.ours(x), layer.dense(x), rtol=1e-3, atol=1e-3)
        lin = nn.Linear(n, n).to(dev)
        lin.weight.data.copy_(layer.weight)
        lin.bias.data.copy_(layer.bias)
        module = MaskedSparseLinear.from_dense(lin, layer.mask).eval()
        module(x)
        warm = {"dense": p50(lambda: layer.dense(x), args.min_time),
                "fp32_sparse": p50(lambda: layer.fp32_sparse(x), args.min_time),
                "ours": p50(lambda: layer.ours(x), args.min_time)}
        t_module = p50(lambda: module(x), args.min_time)
    del module, lin
    # Cold: rotate over enough layers that each form's data is >= 4x the last-level cache.
    llc = llc_bytes() or 32 << 20
    n_ours = max(2, -(-4 * llc // layer.bytes_ours()))
    n_sparse = max(2, -(-4 * llc // layer.bytes_fp32_sparse()))
    n_dense = max(2, -(-4 * llc // (4 * n * n)))
    many = [Layer(n, n, density, k, dev, seed=i + 1, dense=i < n_dense) for i in range(max(n_ours, n_sparse))]
    with torch.no_grad():
        for lay in many:
            lay.ours(x)  # checks each structure once: the rotation then measures the kernels only
        cold = {"dense": p50(rotating(many[:n_dense], lambda l: l.dense(x)), args.min_time),
                "fp32_sparse": p50(rotating(many[:n_sparse], lambda l: l.fp32_sparse(x)), args.min_time),
                "ours": p50(rotating(many[:n_ours], lambda l: l.ours(x)), args.min_time)}
    del many
    floor = layer.bytes_ours() / bw * 1e3
    for case, t in (("warm (one layer)", warm), (f"cold ({n_ours}/{n_sparse}/{n_dense} layers rotated)", cold)):
        rows.append({"table": "batch1", "case": case, "shape": f"{n}x{n}", "density": density, "clusters": k,
                     "dense_ms": t["dense"], "fp32_sparse_ms": t["fp32_sparse"], "ours_ms": t["ours"],
                     "x_dense": t["dense"] / t["ours"], "x_fp32_sparse": t["fp32_sparse"] / t["ours"],
                     "floor_ms": floor, "fp32_sparse_floor_ms": layer.bytes_fp32_sparse() / bw * 1e3,
                     "dense_floor_ms": 4 * n * n / bw * 1e3,
                     "module_ms": t_module if case.startswith("warm") else None})
    return layer


def batched_targets(args, layer, bw, gemm, rows):
    dev = args.device
    n = layer.row_ptr.numel() - 1
    for batch in (16, 128):
        x = torch.randn(batch, n, device=dev)
        with torch.no_grad():
            torch.testing.assert_close(layer.ours(x), layer.dense(x), rtol=1e-3, atol=1e-3)
            t = {"dense": p50(lambda: layer.dense(x), args.min_time),
                 "fp32_sparse": p50(lambda: layer.fp32_sparse(x), args.min_time),
                 "ours": p50(lambda: layer.ours(x), args.min_time)}
        floor = max(layer.bytes_ours() / bw, 2 * batch * layer.nnz / gemm) * 1e3
        rows.append({"table": "batched", "shape": f"{n}x{n}", "density": 0.1, "clusters": layer.k, "batch": batch,
                     "path": cpu_path(layer.k, True, batch),
                     "dense_ms": t["dense"], "fp32_sparse_ms": t["fp32_sparse"], "ours_ms": t["ours"],
                     "x_dense": t["dense"] / t["ours"], "x_fp32_sparse": t["fp32_sparse"] / t["ours"],
                     "floor_ms": floor})


def density_sweep(args, bw, gemm, rows):
    dev = args.device
    shapes = [(1024, 1024)] if args.quick else [(4096, 4096), (1024, 1024), (300, 784)]
    densities = [0.05, 0.2] if args.quick else [0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    batches = [1, 128] if args.quick else [1, 16, 128]
    for n_out, n_in in shapes:
        for d in densities:
            layer = Layer(n_out, n_in, d, 15, dev, seed=7)  # 15 clusters + the pinned zero: packed dense codebook
            for batch in batches:
                x = torch.randn(batch, n_in, device=dev)
                with torch.no_grad():
                    torch.testing.assert_close(layer.ours(x), layer.dense_codebook(x), rtol=1e-3, atol=1e-3)
                    t = {"dense": p50(lambda: layer.dense(x), args.min_time),
                         "codebook": p50(lambda: layer.dense_codebook(x), args.min_time),
                         "fp32_sparse": p50(lambda: layer.fp32_sparse(x), args.min_time),
                         "ours": p50(lambda: layer.ours(x), args.min_time)}
                rows.append({"table": "sweep", "shape": f"{n_out}x{n_in}", "density": d, "batch": batch,
                             "dense_ms": t["dense"], "codebook_ms": t["codebook"], "fp32_sparse_ms": t["fp32_sparse"],
                             "ours_ms": t["ours"], "x_codebook": t["codebook"] / t["ours"],
                             "x_fp32_sparse": t["fp32_sparse"] / t["ours"], "x_dense": t["dense"] / t["ours"]})


def mlp(args, rows):
    dev = args.device
    sizes = [784, 300, 100, 10]
    layers = [Layer(o, i, 0.1, 16, dev, seed=i) for i, o in zip(sizes[:-1], sizes[1:])]

    def run(form, x):
        for j, lay in enumerate(layers):
            x = getattr(lay, form)(x)
            if j + 1 < len(layers):
                x = torch.relu(x)
        return x

    for batch in (1, 256):
        x = torch.randn(batch, 784, device=dev)
        with torch.no_grad():
            torch.testing.assert_close(run("ours", x), run("fp32_sparse", x), rtol=1e-3, atol=1e-3)
            t_s = p50(lambda: run("fp32_sparse", x), args.min_time)
            t_o = p50(lambda: run("ours", x), args.min_time)
        rows.append({"table": "mlp", "shape": "784-300-100-10", "density": 0.1, "batch": batch,
                     "fp32_sparse_ms": t_s, "ours_ms": t_o, "x_fp32_sparse": t_s / t_o,
                     "weight_bytes_ours": sum(l.bytes_ours() for l in layers),
                     "weight_bytes_fp32_sparse": sum(l.bytes_fp32_sparse() for l in layers)})


def main():
    global CPU_TIME
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep, short timings (smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/sparse_codebook.json)")
    args = ap.parse_args()
    CPU_TIME = args.cpu_time
    if args.cpu_time:
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.3
    torch.manual_seed(0)
    bw = measure_bandwidth(args.device)
    gemm = measure_gemm_rate(args.device)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s, dense GEMM {gemm / 1e9:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    rows = []
    layer = batch1_targets(args, bw, gemm, rows)
    batched_targets(args, layer, bw, gemm, rows)
    density_sweep(args, bw, gemm, rows)
    mlp(args, rows)
    print_table([r for r in rows if r["table"] == "batch1"],
                ["case", "dense_ms", "fp32_sparse_ms", "ours_ms", "x_dense", "x_fp32_sparse", "floor_ms",
                 "fp32_sparse_floor_ms", "dense_floor_ms", "module_ms"], "batch 1, 4096x4096, 90% pruned, K=16")
    print_table([r for r in rows if r["table"] == "batched"],
                ["batch", "path", "dense_ms", "fp32_sparse_ms", "ours_ms", "x_dense", "x_fp32_sparse", "floor_ms"],
                "batched, same layer, warm")
    print_table([r for r in rows if r["table"] == "sweep"],
                ["shape", "density", "batch", "dense_ms", "codebook_ms", "fp32_sparse_ms", "ours_ms", "x_codebook",
                 "x_fp32_sparse", "x_dense"], "density sweep (K=15 + pinned zero)")
    print_table([r for r in rows if r["table"] == "mlp"],
                ["shape", "batch", "fp32_sparse_ms", "ours_ms", "x_fp32_sparse", "weight_bytes_ours",
                 "weight_bytes_fp32_sparse"], "pruned + shared MLP")
    for r in rows:
        r["bandwidth_GBps"] = bw / 1e9
        r["gemm_GFLOPs"] = gemm / 1e9
    write_json("sparse_codebook", rows, args.device, args.json)


if __name__ == "__main__":
    main()
