"""torchslim next to its peers, measured side by side in one run, written as one JSON schema.

Cases (shapes are OUTxIN, the weight's [out, in]; MLP 768-3072-768 is Linear(768, 3072),
ReLU, Linear(3072, 768)):

  * linear: dense fp32 and bf16 ``F.linear``; at each sparsity torch.sparse CSR
    (``torch.sparse.addmm`` of the CSR weight) and torchslim ``MaskedSparseLinear`` (fp32,
    inference: eval, no grad); at 4 and 8 bits torchslim ``CodebookLinear`` (16 / 256
    shared values, fp32) and torch's weight-only CPU kernels with bf16 activations
    (``aten._weight_int4pack_mm_for_cpu``, group size 128; ``aten._weight_int8pack_mm``).
  * mlp: the same per layer, plus torchslim's fused ``SparseSequential`` (``to_sparse``).
  * kd_loss: forward + backward of the KD loss, eager PyTorch composite, ``torch.compile``
    of the same composite and torchslim ``kd_kl_div`` (fp32 and bf16).
  * train: one training step's forward + backward (input and weight gradients, fp32) of a
    pruned layer: dense ``nn.Linear`` (the masked weight), torchslim ``MaskedSparseLinear`` and,
    when importable, SparseProp's ``SparseLinear`` (built from the same masked weight).
  * DeepSparse (inference) and SparseProp (training) only where importable; otherwise the
    JSON records them as not installed.

Every row: {case, shape, batch, sparsity, bits, impl, median_ms, p20, p80,
ratio_vs_dense_fp32, floor_ms, note}. ratio_vs_dense_fp32 is dense fp32 time / this time
(> 1: faster than dense fp32) for the same case, shape and batch; for kd_loss the baseline
is the eager composite in fp32. floor_ms is the larger of bytes moved / the read bandwidth
measured in this run (the LLC rate when the data fits in half the last-level cache, the
DRAM rate otherwise) and flops / the GEMM rate measured in this run for that dtype.
All implementations of one case are timed in turns (interleaved, _common.time_interleaved)
with torch's thread count.

    python benchmarks/bench_peers.py --quick            # a few shapes and batches (< 2 min)
    python benchmarks/bench_peers.py --full             # the whole grid
    python benchmarks/bench_peers.py --markdown [PATH]  # render results/peers.json as markdown
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, gemm_gflops, llc_bytes, print_table, read_bandwidth_gbs,  # noqa: E402
                     time_interleaved, write_json)

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

FULL = {
    "shapes": [(4096, 4096), (768, 3072), (3072, 768), (11008, 4096)],
    "batches": [1, 8, 16, 64, 128, 512],
    "sparsities": [0.9, 0.95, 0.98],
    "bits": [4, 8],
    "mlp": True,
    "kd_shapes": [(4096, 10), (4096, 100), (512, 32000), (64, 128256)],
    "kd_dtypes": ["fp32", "bf16"],
    "train_shapes": [(3072, 768), (768, 3072), (4096, 4096)],
    "train_batches": [16, 64, 256],
}
QUICK = {
    "shapes": [(4096, 4096), (3072, 768)],
    "batches": [1, 64],
    "sparsities": [0.9],
    "bits": [4, 8],
    "mlp": True,
    "kd_shapes": [(4096, 10), (512, 32000)],
    "kd_dtypes": ["fp32", "bf16"],
    "train_shapes": [(3072, 768)],
    "train_batches": [64, 256],
}
INT4_GROUP = 128
KD_T = 4.0
COLUMNS = ["case", "shape", "batch", "sparsity", "bits", "impl", "median_ms", "p20", "p80",
           "ratio_vs_dense_fp32", "floor_ms", "note"]


# ------------------------------------------------------------------ machine ceilings


class Ceilings:
    """Bandwidths and GEMM rates measured once per run; floor() of a (bytes, flops) pair."""

    def __init__(self, quick: bool):
        self.llc = llc_bytes() or (32 << 20)
        self.bw_dram = read_bandwidth_gbs((64 if quick else 512) << 20)
        self.bw_llc = read_bandwidth_gbs(max(1 << 20, self.llc // 4))
        m, k, n = (256, 1024, 1024) if quick else (256, 4096, 4096)
        self.gemm = {"fp32": gemm_gflops(m, k, n, torch.float32), "bf16": gemm_gflops(m, k, n, torch.bfloat16)}

    def floor_ms(self, nbytes: float, flops: float = 0.0, dtype: str = "fp32") -> float:
        bw = self.bw_llc if nbytes <= self.llc / 2 else self.bw_dram
        return max(nbytes / bw / 1e6, flops / self.gemm[dtype] / 1e6)

    def as_dict(self) -> dict:
        return {"llc_bytes": self.llc, "read_bw_dram_GBs": self.bw_dram, "read_bw_llc_GBs": self.bw_llc,
                "gemm_fp32_GFLOPs": self.gemm["fp32"], "gemm_bf16_GFLOPs": self.gemm["bf16"]}


# ------------------------------------------------------------------ training step


def train_case(shape, batch, cfg, peers, ceil, run_time, rows):
    """Forward + backward (input and weight gradients) of one pruned layer, fp32."""
    from torchslim.nn import MaskedSparseLinear

    out_f, in_f = shape
    name = f"{out_f}x{in_f}"
    gen = torch.Generator().manual_seed(out_f * 11 + in_f)
    x = torch.randn(batch, in_f, generator=gen, requires_grad=True)
    grad = torch.randn(batch, out_f, generator=gen)
    for sp in cfg["sparsities"]:
        mask = _random_mask(out_f, in_f, sp, gen)
        nnz = int(mask.sum())
        dense = nn.Linear(in_f, out_f)
        with torch.no_grad():
            dense.weight.mul_(mask)
        ours = MaskedSparseLinear.from_dense(copy.deepcopy(dense), mask).train()
        fns = {"dense_fp32": dense, "torchslim_sparse": ours}
        if peers["sparseprop"].startswith("installed"):
            from sparseprop.modules import SparseLinear

            fns["sparseprop"] = SparseLinear.from_dense(copy.deepcopy(dense))

        def step(m):
            def fn():
                m.zero_grad(set_to_none=True)
                x.grad = None
                m(x).backward(grad)
            return fn

        # the same gradients from every implementation before timing them (kept weights in
        # row-major order: the mask's, and SparseProp's CSR values)
        grads = {}
        for impl, m in fns.items():
            step(m)()
            gw = m.W_val.grad if impl == "sparseprop" else m.weight.grad[mask]
            grads[impl] = (x.grad.clone(), gw.clone())
        for impl in fns:
            for got, want in zip(grads[impl], grads["dense_fp32"]):
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        t = time_interleaved({impl: step(m) for impl, m in fns.items()}, rounds=3, min_run_time=run_time)
        act = 4 * batch * (in_f + out_f) * 3  # x, grad and their gradients, read or written
        floors = {"dense_fp32": ceil.floor_ms(3 * 4 * out_f * in_f + act, 3 * 2 * batch * out_f * in_f)}
        floors["torchslim_sparse"] = floors["sparseprop"] = ceil.floor_ms(3 * nnz * 6 + act, 3 * 2 * batch * nnz)
        for impl in fns:
            rows.append(_row("train", name, batch, impl, t[impl], floors[impl], sparsity=sp,
                             note="forward + backward (input and weight gradients), fp32"))


# ------------------------------------------------------------------ peers that may be absent


def probe_peers() -> dict:
    """What is importable here: torch's weight-only kernels, DeepSparse, SparseProp."""
    out = {}
    for name in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm"):
        out[name] = hasattr(torch.ops.aten, name)
    for mod in ("deepsparse", "sparseprop"):
        if importlib.util.find_spec(mod) is None:
            out[mod] = "not installed"
            continue
        try:
            m = importlib.import_module(mod)
            out[mod] = f"installed {getattr(m, '__version__', '?')}"
        except Exception as exc:  # installed but broken: say why
            out[mod] = f"import failed: {type(exc).__name__}: {exc}"[:200]
    return out


def int4_weight(w: torch.Tensor):
    """torch's int4 weight-only format of w [out, in]: asymmetric per group of INT4_GROUP
    inputs, packed for the CPU kernel; returns (packed, scales_and_zeros bf16)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    saz = torch.stack([scale.t(), zero.t()], dim=2).to(torch.bfloat16).contiguous()
    return packed, saz


def int8_weight(w: torch.Tensor):
    """Symmetric per-output-channel int8 of w [out, in] and its bf16 scales."""
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


# ------------------------------------------------------------------ cases


def _row(case, shape, batch, impl, t, floor, sparsity=None, bits=None, note=""):
    return {"case": case, "shape": shape, "batch": batch, "sparsity": sparsity, "bits": bits, "impl": impl,
            "median_ms": t["p50"], "p20": t["p20"], "p80": t["p80"], "ratio_vs_dense_fp32": None,
            "floor_ms": floor, "note": note}


def _set_ratios(rows):
    base = {}
    for r in rows:
        if r["impl"] in ("dense_fp32", "eager_composite_fp32"):
            base[(r["case"], r["shape"], r["batch"])] = r["median_ms"]
    for r in rows:
        b = base.get((r["case"], r["shape"], r["batch"]))
        if b is not None and r["median_ms"]:
            r["ratio_vs_dense_fp32"] = b / r["median_ms"]


def _random_mask(out_f, in_f, sparsity, gen):
    return torch.rand(out_f, in_f, generator=gen) >= sparsity


def linear_case(shape, batch, cfg, peers, ceil, run_time, rows, ds_python=None):
    from torchslim.nn import CodebookLinear, MaskedSparseLinear

    out_f, in_f = shape
    name = f"{out_f}x{in_f}"
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    lin = nn.Linear(in_f, out_f)
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(batch, in_f, generator=gen)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    act = 4 * batch * (in_f + out_f)
    fns, floors, meta, sparse_weights = {}, {}, {}, {}
    fns["dense_fp32"] = lambda: F.linear(x, w, b)
    floors["dense_fp32"] = ceil.floor_ms(4 * w.numel() + act, 2 * batch * w.numel())
    fns["dense_bf16"] = lambda: F.linear(xb, wb, bb)
    floors["dense_bf16"] = ceil.floor_ms(2 * w.numel() + act / 2, 2 * batch * w.numel(), "bf16")

    for sp in cfg["sparsities"]:
        mask = _random_mask(out_f, in_f, sp, gen)
        nnz = int(mask.sum())
        wm = w * mask
        sparse_weights[sp] = wm
        csr = wm.to_sparse_csr()
        bcol = b[:, None]
        fns[f"torch_csr@{sp}"] = lambda csr=csr, bcol=bcol: torch.sparse.addmm(bcol, csr, x.t()).t()
        floors[f"torch_csr@{sp}"] = ceil.floor_ms(nnz * (4 + 8) + 8 * (out_f + 1) + act, 2 * batch * nnz)
        layer = MaskedSparseLinear.from_dense(lin, mask).eval()
        idx = 2 if in_f <= 32767 else 4
        fns[f"torchslim_sparse@{sp}"] = lambda layer=layer: layer(x)
        floors[f"torchslim_sparse@{sp}"] = ceil.floor_ms(nnz * (4 + idx) + 4 * (out_f + 1) + act, 2 * batch * nnz)
        meta[f"torch_csr@{sp}"] = meta[f"torchslim_sparse@{sp}"] = {"sparsity": sp}

    for bits in cfg["bits"]:
        cb = CodebookLinear(in_f, out_f, num_clusters=2 ** bits).eval()
        fns[f"torchslim_codebook@{bits}"] = lambda cb=cb: cb(x)
        floors[f"torchslim_codebook@{bits}"] = ceil.floor_ms(w.numel() * bits / 8 + act, 2 * batch * w.numel())
        meta[f"torchslim_codebook@{bits}"] = {"bits": bits}
        if bits == 4:
            if peers["_weight_int4pack_mm_for_cpu"] and peers["_convert_weight_to_int4pack_for_cpu"] and in_f % INT4_GROUP == 0:
                packed, saz = int4_weight(w)
                fns["torch_int4_wo_bf16@4"] = lambda packed=packed, saz=saz: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, packed, INT4_GROUP, saz)
                floors["torch_int4_wo_bf16@4"] = ceil.floor_ms(w.numel() / 2 + saz.numel() * 2 + act / 2,
                                                               2 * batch * w.numel(), "bf16")
                meta["torch_int4_wo_bf16@4"] = {"bits": 4, "note": f"group {INT4_GROUP}, bf16 activations"}
            else:
                rows.append(_row("linear", name, batch, "torch_int4_wo_bf16", {"p50": None, "p20": None, "p80": None},
                                 None, bits=4, note="not available in this torch"))
        if bits == 8:
            if peers["_weight_int8pack_mm"]:
                q8, s8 = int8_weight(w)
                fns["torch_int8_wo_bf16@8"] = lambda q8=q8, s8=s8: torch.ops.aten._weight_int8pack_mm(xb, q8, s8)
                floors["torch_int8_wo_bf16@8"] = ceil.floor_ms(w.numel() + 2 * out_f + act / 2,
                                                               2 * batch * w.numel(), "bf16")
                meta["torch_int8_wo_bf16@8"] = {"bits": 8, "note": "per-channel scales, bf16 activations"}
            else:
                rows.append(_row("linear", name, batch, "torch_int8_wo_bf16", {"p50": None, "p20": None, "p80": None},
                                 None, bits=8, note="not available in this torch"))

    with torch.inference_mode():
        times = time_interleaved(fns, min_run_time=run_time)
    for key, t in times.items():
        impl = key.split("@")[0]
        m = meta.get(key, {})
        rows.append(_row("linear", name, batch, impl, t, floors[key], sparsity=m.get("sparsity"), bits=m.get("bits"),
                         note=m.get("note", "")))
    if ds_python:
        for sp, wm in sparse_weights.items():
            _deepsparse_row("linear", name, batch, sp, [(wm, b)], ds_python, floors[f"torchslim_sparse@{sp}"],
                            run_time, rows)


def mlp_case(batch, cfg, ceil, run_time, rows, ds_python=None):
    import torchslim
    from torchslim.nn import MaskedSparseLinear

    dims = (768, 3072, 768)
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    dense = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2])).eval()
    x = torch.randn(batch, dims[0], generator=gen)
    n_w = dims[0] * dims[1] + dims[1] * dims[2]
    act = 4 * batch * (dims[0] + 2 * dims[1] + dims[2])
    fns, floors, meta = {}, {}, {}
    fns["dense_fp32"] = lambda: dense(x)
    floors["dense_fp32"] = ceil.floor_ms(4 * n_w + act, 2 * batch * n_w)
    dense_bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    xb = x.bfloat16()
    fns["dense_bf16"] = lambda: dense_bf16(xb)
    floors["dense_bf16"] = ceil.floor_ms(2 * n_w + act / 2, 2 * batch * n_w, "bf16")
    ds_layers = {}
    for sp in cfg["sparsities"]:
        masks = [_random_mask(dense[i].out_features, dense[i].in_features, sp, gen) for i in (0, 2)]
        nnz = sum(int(m.sum()) for m in masks)
        csrs = [(dense[i].weight.detach() * m).to_sparse_csr() for i, m in zip((0, 2), masks)]
        biases = [dense[i].bias.detach()[:, None] for i in (0, 2)]

        def csr_mlp(csrs=csrs, biases=biases):
            h = torch.sparse.addmm(biases[0], csrs[0], x.t()).relu_()
            return torch.sparse.addmm(biases[1], csrs[1], h).t()

        per_layer = nn.Sequential(MaskedSparseLinear.from_dense(dense[0], masks[0]), nn.ReLU(),
                                  MaskedSparseLinear.from_dense(dense[2], masks[1])).eval()
        fused = torchslim.to_sparse(per_layer).eval()
        sp_bytes = nnz * (4 + 2) + 4 * (sum(dims[1:]) + 2) + act
        fns[f"torch_csr@{sp}"] = csr_mlp
        floors[f"torch_csr@{sp}"] = ceil.floor_ms(nnz * 12 + act, 2 * batch * nnz)
        fns[f"torchslim_sparse_per_layer@{sp}"] = lambda m=per_layer: m(x)
        floors[f"torchslim_sparse_per_layer@{sp}"] = ceil.floor_ms(sp_bytes, 2 * batch * nnz)
        fns[f"torchslim_sparse_fused@{sp}"] = lambda m=fused: m(x)
        floors[f"torchslim_sparse_fused@{sp}"] = floors[f"torchslim_sparse_per_layer@{sp}"]
        meta[f"torchslim_sparse_fused@{sp}"] = {"note": f"to_sparse: {type(fused).__name__}"}
        for k in ("torch_csr", "torchslim_sparse_per_layer", "torchslim_sparse_fused"):
            meta.setdefault(f"{k}@{sp}", {})["sparsity"] = sp
        ds_layers[sp] = [(dense[i].weight.detach() * m, dense[i].bias.detach()) for i, m in zip((0, 2), masks)]
    with torch.inference_mode():
        times = time_interleaved(fns, min_run_time=run_time)
    for key, t in times.items():
        m = meta.get(key, {})
        rows.append(_row("mlp", "768-3072-768", batch, key.split("@")[0], t, floors[key], sparsity=m.get("sparsity"),
                         note=m.get("note", "")))
    if ds_python:
        for sp, layers in ds_layers.items():
            _deepsparse_row("mlp", "768-3072-768", batch, sp, layers, ds_python,
                            floors[f"torchslim_sparse_fused@{sp}"], run_time, rows)


def kd_case(shape, dtypes, ceil, run_time, rows):
    from torchslim.ops import kd_kl_div
    from torchslim.ops._reference import ref_kd_kl_div

    n, c = shape
    name = f"{n}x{c}"
    fns, floors, meta = {}, {}, {}
    for dname in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        gen = torch.Generator().manual_seed(n + c)
        s = (torch.randn(n, c, generator=gen) * 3).to(dtype).requires_grad_()
        t = (torch.randn(n, c, generator=gen) * 3).to(dtype)

        def composite(s_, t_):
            return torch.autograd.grad(ref_kd_kl_div(s_, t_, KD_T), s_)[0]

        compiled = torch.compile(composite, dynamic=False)
        fns[f"eager_composite_{dname}"] = lambda s=s, t=t: composite(s, t)
        fns[f"compiled_composite_{dname}"] = lambda s=s, t=t, f=compiled: f(s, t)
        fns[f"torchslim_kd_kl_div_{dname}"] = lambda s=s, t=t: torch.autograd.grad(kd_kl_div(s, t, KD_T), s)[0]
        esize = s.element_size()
        for k in ("eager_composite", "compiled_composite", "torchslim_kd_kl_div"):
            floors[f"{k}_{dname}"] = ceil.floor_ms(3 * n * c * esize)  # read both inputs, write the gradient
            meta[f"{k}_{dname}"] = "forward + backward, T=4, batchmean"
    times = time_interleaved(fns, min_run_time=run_time)
    for key, t in times.items():
        rows.append(_row("kd_loss", name, n, key, t, floors[key], note=meta[key]))


# ------------------------------------------------------------------ DeepSparse (own process)

# Runs in the interpreter that has DeepSparse (often a separate venv without torch): builds
# the ONNX graph of the pruned layer / MLP (Gemm transB=1 as torch exports nn.Linear, Relu
# between layers) from the saved weights, compiles an engine for the batch, checks its
# output against numpy and times engine.run.
_DS_RUNNER = r"""
import json, sys, time
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from deepsparse import Engine

spec = json.loads(sys.argv[1])
d = np.load(spec["npz"])
n_layers = int(d["n_layers"])
batch = int(spec["batch"])
nodes, inits, cur = [], [], "x"
for i in range(n_layers):
    inits += [numpy_helper.from_array(d[f"w{i}"], f"w{i}"), numpy_helper.from_array(d[f"b{i}"], f"b{i}")]
    nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
    cur = f"h{i}"
    if i < n_layers - 1:
        nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
        cur = f"r{i}"
in_f, out_f = d["w0"].shape[1], d[f"w{n_layers - 1}"].shape[0]
graph = helper.make_graph(nodes, "peers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_f])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [batch, out_f])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
path = spec["npz"] + ".onnx"
onnx.save(model, path)
engine = Engine(model=path, batch_size=batch, num_cores=int(spec["threads"]))
x = np.random.default_rng(0).standard_normal((batch, in_f)).astype(np.float32)
ref = x
for i in range(n_layers):
    ref = ref @ d[f"w{i}"].T + d[f"b{i}"]
    if i < n_layers - 1:
        ref = np.maximum(ref, 0)
got = engine.run([x])[0]
err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
for _ in range(3):
    engine.run([x])
one = time.perf_counter(); engine.run([x]); one = max(time.perf_counter() - one, 1e-6)
per_block = max(1, int(0.01 / one))
times, start = [], time.perf_counter()
while len(times) < 5 or time.perf_counter() - start < float(spec["run_time"]) * 3:
    t0 = time.perf_counter()
    for _ in range(per_block):
        engine.run([x])
    times.append((time.perf_counter() - t0) / per_block * 1e3)
print(json.dumps({"p20": float(np.percentile(times, 20)), "p50": float(np.percentile(times, 50)),
                  "p80": float(np.percentile(times, 80)), "rel_err": err}))
"""


def deepsparse_python(explicit: str | None) -> tuple[str | None, str]:
    """(interpreter that imports deepsparse, its status): --deepsparse-python, then
    $TORCHSLIM_DEEPSPARSE_PYTHON, then this interpreter."""
    import os
    import subprocess

    for cand in (explicit, os.environ.get("TORCHSLIM_DEEPSPARSE_PYTHON"), sys.executable):
        if not cand:
            continue
        try:
            proc = subprocess.run([cand, "-c", "import deepsparse, onnx; print(deepsparse.__version__)"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return cand, f"installed {proc.stdout.strip()} ({cand})"
    return None, "not installed"


def deepsparse_time(ds_python: str, layers, batch: int, run_time: float) -> dict:
    """Median etc. of DeepSparse on the layers [(w [out, in], b)] at this batch, or an error."""
    import subprocess
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "layers.npz")
        arrays = {"n_layers": np.array(len(layers))}
        for i, (w, b) in enumerate(layers):
            arrays[f"w{i}"] = w.detach().float().contiguous().numpy()
            arrays[f"b{i}"] = b.detach().float().contiguous().numpy()
        np.savez(npz, **arrays)
        spec = {"npz": npz, "batch": batch, "threads": torch.get_num_threads(), "run_time": run_time}
        proc = subprocess.run([ds_python, "-c", _DS_RUNNER, json.dumps(spec)], capture_output=True, text=True,
                              timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _deepsparse_row(case, name, batch, sp, layers, ds_python, floor, run_time, rows):
    res = deepsparse_time(ds_python, layers, batch, run_time)
    if "error" in res:
        rows.append(_row(case, name, batch, "deepsparse", {"p50": None, "p20": None, "p80": None}, floor, sparsity=sp,
                         note=f"failed: {res['error']}"))
        return
    rows.append(_row(case, name, batch, "deepsparse", res, floor, sparsity=sp,
                     note=f"ONNX Gemm graph, own process (not interleaved); max rel. error {res['rel_err']:.1e}"))


# ------------------------------------------------------------------ output


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_markdown(data: dict) -> str:
    """The peers table (one row per measurement) from a peers.json, for RESULTS.md."""
    m = data.get("machine", {})
    c = data.get("ceilings", {})
    p = data.get("peers", {})
    lines = [
        f"Measured {m.get('time', '?')} on {m.get('cpu', '?')}, {m.get('threads', '?')} threads, "
        f"torch {m.get('torch', '?')}, mode {data.get('mode', '?')}. Ceilings in this run: read "
        f"{_fmt(c.get('read_bw_dram_GBs'), 1)} GB/s (DRAM), {_fmt(c.get('read_bw_llc_GBs'), 1)} GB/s (LLC), "
        f"GEMM {_fmt(c.get('gemm_fp32_GFLOPs'), 0)} GFLOP/s fp32, {_fmt(c.get('gemm_bf16_GFLOPs'), 0)} bf16. "
        f"DeepSparse: {p.get('deepsparse', '?')}; SparseProp: {p.get('sparseprop', '?')}.",
        "",
        "x dense = dense fp32 time / this time (kd_loss: eager fp32 composite / this time); "
        "floor = max(bytes / read bandwidth, flops / GEMM rate).",
        "",
        "| case | shape | batch | sparsity | bits | impl | median ms | p20-p80 ms | x dense fp32 | floor ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("rows", []):
        spread = "-" if r.get("p20") is None else f"{_fmt(r['p20'], 4)}-{_fmt(r['p80'], 4)}"
        lines.append("| " + " | ".join([
            str(r["case"]), str(r["shape"]), str(r["batch"]), _fmt(r.get("sparsity")), _fmt(r.get("bits")), r["impl"],
            _fmt(r.get("median_ms"), 4), spread, _fmt(r.get("ratio_vs_dense_fp32"), 2), _fmt(r.get("floor_ms"), 4),
            r.get("note") or ""]) + " |")
    return "\n".join(lines) + "\n"


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text):
    out = []
    for part in text.split(","):
        a, _, b = part.strip().partition("x")
        if not (a.isdigit() and b.isdigit()):
            raise argparse.ArgumentTypeError(f"expected shapes like 4096x4096,768x3072, got {text!r}")
        out.append((int(a), int(b)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few shapes and batches, short timing (< 2 min)")
    mode.add_argument("--full", action="store_true", help="the whole grid (default)")
    mode.add_argument("--markdown", nargs="?", const=str(RESULTS_DIR / "peers.json"), metavar="JSON",
                      help="render a peers.json (default benchmarks/results/peers.json) as markdown and exit")
    parser.add_argument("--shapes", type=_shapes, help="override the linear shapes, e.g. 4096x4096,768x3072")
    parser.add_argument("--batches", type=_ints, help="override the batch sizes, e.g. 1,64")
    parser.add_argument("--cases", default="linear,mlp,kd_loss,train", help="which cases to run (%(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/peers.json)")
    parser.add_argument("--out", default=None, help="with --markdown: write the table here instead of stdout")
    parser.add_argument("--deepsparse-python", default=None, metavar="PYTHON",
                        help="an interpreter with deepsparse and onnx (e.g. a separate venv's bin/python); "
                             "default $TORCHSLIM_DEEPSPARSE_PYTHON, then this one")
    args = parser.parse_args(argv)

    if args.markdown is not None:
        path = Path(args.markdown)
        if not path.exists():
            print(f"bench_peers: {path} not found (run the benchmark first)", file=sys.stderr)
            return 2
        text = render_markdown(json.loads(path.read_text()))
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
        else:
            print(text, end="")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.shapes:
        cfg["shapes"] = args.shapes
    if args.batches:
        cfg["batches"] = args.batches
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = cases - {"linear", "mlp", "kd_loss", "train"}
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from linear, mlp, kd_loss, train")
    run_time = 0.05 if args.quick else 0.2

    peers = probe_peers()
    ds_python, peers["deepsparse"] = deepsparse_python(args.deepsparse_python)
    ceil = Ceilings(args.quick)
    print(f"threads {torch.get_num_threads()}; peers: {peers}")
    print("ceilings:", {k: round(v, 1) for k, v in ceil.as_dict().items()})
    rows: list[dict] = []
    if "linear" in cases:
        for shape in cfg["shapes"]:
            for batch in cfg["batches"]:
                linear_case(shape, batch, cfg, peers, ceil, run_time, rows, ds_python)
                print(f"linear {shape[0]}x{shape[1]} batch {batch}: done", flush=True)
    if "mlp" in cases and cfg["mlp"]:
        for batch in cfg["batches"]:
            mlp_case(batch, cfg, ceil, run_time, rows, ds_python)
            print(f"mlp batch {batch}: done", flush=True)
    if "kd_loss" in cases:
        for shape in cfg["kd_shapes"]:
            kd_case(shape, cfg["kd_dtypes"], ceil, run_time, rows)
            print(f"kd_loss {shape[0]}x{shape[1]}: done", flush=True)
    if ds_python is None:
        rows.append(_row("peer", "-", None, "deepsparse", {"p50": None, "p20": None, "p80": None}, None,
                         note=peers["deepsparse"]))
    if "train" in cases:
        for shape in cfg["train_shapes"]:
            for batch in cfg["train_batches"]:
                train_case(shape, batch, cfg, peers, ceil, run_time, rows)
                print(f"train {shape[0]}x{shape[1]} batch {batch}: done", flush=True)
    if not peers["sparseprop"].startswith("installed"):
        rows.append(_row("peer", "-", None, "sparseprop", {"p50": None, "p20": None, "p80": None}, None,
                         note=peers["sparseprop"]))
    _set_ratios(rows)
    print_table(rows, COLUMNS, title="peers (ratio = dense fp32 time / this time)")
    out = write_json("peers", rows, path=args.json)
    data = json.loads(out.read_text())
    data.update({"mode": "quick" if args.quick else "full", "ceilings": ceil.as_dict(), "peers": peers,
                 "schema": COLUMNS})
    out.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
