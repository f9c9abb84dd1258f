"""codebook_linear vs dense F.linear, measured in the same run.

Timings are wall-clock p20/p50/p80 of torch.utils.benchmark blocks (benchmarks/_common.py);
ratio = dense p50 / ours p50 (ratio_p20 on the 20th percentiles: less sensitive to other
load on the machine). floor = the best ratio the machine allows (see the notes).

Rows: shape (out x in), K (16 = packed 4-bit, 256 = uint8), batch, mode:
  fwd-warm   repeated forward calls on one layer;
  fwd-cold   batch 1, rotating over enough layers that their weights exceed the last-level
             cache (dense rotates over as many dense layers);
  train      forward + backward at batch 256 with gradients to input, codebook (ours) /
             weight (dense) and bias.
plus the layer's weight memory against fp32, and the machine's floors measured in the same
run (read bandwidth from DRAM and from the last-level cache, fp32 GEMM rate).

    python benchmarks/bench_codebook_linear.py [--quick] [--device cpu|cuda] [--json PATH]
    python benchmarks/bench_codebook_linear.py --gemv [--repeat N] [--threads T]

--gemv: only the batch-1 warm rows at 4096 x 4096 (K = 16 packed, K = 256 uint8), dense and
ours timed back to back N times (default 3: batch-1 dense times move by up to 30% from run
to run on a shared machine), one row per repeat plus the median; writes
benchmarks/results/codebook_linear_gemv.json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llc_bytes, print_table, time_ms, write_json  # noqa: E402

from torchslim.ops import codebook_linear  # noqa: E402
from torchslim.ops._reference import pack_int4  # noqa: E402


def floors(dev, quick):
    """Read bandwidth from DRAM and from the LLC (GB/s), fp32 GEMM rate (GFLOP/s)."""
    big = torch.rand((64 if quick else 512) * (1 << 20) // 4, device=dev)
    bw_dram = big.numel() * 4 / time_ms(lambda: big.sum(), min_run_time=0.2)["p50"] / 1e6
    del big
    small = torch.rand(8 * (1 << 20) // 4, device=dev)  # 8 MiB: fits in the LLC
    bw_llc = small.numel() * 4 / time_ms(lambda: small.sum(), min_run_time=0.2)["p50"] / 1e6
    m, k, n = (256, 1024, 1024) if quick else (256, 4096, 4096)
    a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
    gemm = 2 * m * k * n / time_ms(lambda: torch.mm(a, b), min_run_time=0.2)["p50"] / 1e6
    return bw_dram, bw_llc, gemm


def make_layer(out_f, in_f, k, dev, gen):
    idx = torch.randint(0, k, (out_f, in_f), generator=gen).to(torch.uint8)
    ind = pack_int4(idx) if k <= 16 else idx
    return ind.to(dev), torch.randn(k, generator=gen).to(dev), torch.randn(out_f, generator=gen).to(dev)


def gemv_main(args) -> None:
    """Batch-1 warm 4096 x 4096: dense vs 4-bit vs 8-bit, repeated (see --gemv)."""
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.randn(1, n, generator=gen).to(dev)
    w_dense = torch.randn(n, n, generator=gen).to(dev)
    b_dense = torch.randn(n, generator=gen).to(dev)
    layers = {k: make_layer(n, n, k, dev, gen) for k in (16, 256)}
    rows = []
    for rep in range(args.repeat):
        d = time_ms(lambda: F.linear(x, w_dense, b_dense), min_run_time=0.3)
        row = {"repeat": rep, "threads": torch.get_num_threads(), "dense": d["p50"], "dense_p20": d["p20"]}
        for k, (ind, cb, bias) in layers.items():
            o = time_ms(lambda: codebook_linear(x, ind, cb, bias), min_run_time=0.3)
            row[f"K{k}"] = o["p50"]
            row[f"K{k}_p20"] = o["p20"]
            row[f"ratio_K{k}"] = d["p50"] / o["p50"]
        rows.append(row)
    med = {"repeat": "median", "threads": torch.get_num_threads()}
    for c in ("dense", "dense_p20", "K16", "K16_p20", "ratio_K16", "K256", "K256_p20", "ratio_K256"):
        med[c] = float(sorted(r[c] for r in rows)[len(rows) // 2])
    rows.append(med)
    print_table(rows, ["repeat", "threads", "dense", "dense_p20", "K16", "K16_p20", "ratio_K16", "K256", "K256_p20",
                       "ratio_K256"],
                title=f"codebook_linear batch 1, 4096x4096, warm ({args.device}; ms p50 / p20, ratio = dense p50 / ours p50)")
    write_json("codebook_linear_gemv", rows, device=args.device, path=args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced set, a few seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/codebook_linear.json)")
    parser.add_argument("--gemv", action="store_true", help="only batch-1 warm 4096x4096 rows, repeated")
    parser.add_argument("--repeat", type=int, default=3, help="repeats for --gemv")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for --gemv (0: default)")
    args = parser.parse_args()
    if args.gemv:
        gemv_main(args)
        return
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    run = 0.05 if args.quick else 0.3
    shapes = [(1024, 1024)] if args.quick else [(1024, 1024), (4096, 4096)]
    batches = [1, 64] if args.quick else [1, 16, 256]
    llc = (llc_bytes() or (32 << 20)) if dev.type == "cpu" else 50 << 20

    bw_dram, bw_llc, gemm = floors(dev, args.quick)
    print(f"floors: read bandwidth DRAM {bw_dram:.1f} GB/s, LLC {bw_llc:.1f} GB/s, fp32 GEMM {gemm:.1f} GFLOP/s, "
          f"LLC {llc >> 20} MiB, threads {torch.get_num_threads()}")
    rows = []
    for out_f, in_f in shapes:
        w_dense = torch.randn(out_f, in_f, generator=gen).to(dev)
        b_dense = torch.randn(out_f, generator=gen).to(dev)
        dense_bytes = w_dense.numel() * 4
        dense_ms = {}
        for batch in batches:
            x = torch.randn(batch, in_f, generator=gen).to(dev)
            dense_ms[batch] = time_ms(lambda: F.linear(x, w_dense, b_dense), min_run_time=run)
        # dense cold: rotate over layers whose total exceeds 2x the LLC (at least 2 layers)
        cold_bytes = (llc if args.quick else 2 * llc)
        n_dense = max(2, math.ceil(cold_bytes / dense_bytes))
        dense_layers = [torch.randn(out_f, in_f, generator=gen).to(dev) for _ in range(n_dense)]
        x1 = torch.randn(1, in_f, generator=gen).to(dev)
        it = [0]

        def dense_cold():
            it[0] = (it[0] + 1) % n_dense
            return F.linear(x1, dense_layers[it[0]], b_dense)

        dense_cold_ms = time_ms(dense_cold, min_run_time=run)
        del dense_layers
        # dense training step at the largest batch
        bt = batches[-1]
        xt = torch.randn(bt, in_f, generator=gen).to(dev)
        gy = torch.randn(bt, out_f, generator=gen).to(dev)
        wt = w_dense.clone().requires_grad_()
        bb = b_dense.clone().requires_grad_()
        xg = xt.clone().requires_grad_()

        def dense_train():
            wt.grad = bb.grad = xg.grad = None
            F.linear(xg, wt, bb).backward(gy)

        dense_train_ms = time_ms(dense_train, min_run_time=run)

        for k in (16, 256):
            ind, cb, bias = make_layer(out_f, in_f, k, dev, gen)
            ours_bytes = ind.numel() * ind.element_size() + cb.numel() * 4
            mem = {"shape": f"{out_f}x{in_f}", "K": k, "batch": "-", "mode": "weight bytes",
                   "dense": float(dense_bytes), "ours": float(ours_bytes), "ratio": dense_bytes / ours_bytes,
                   "floor": 8.0 if k <= 16 else 4.0}
            rows.append(mem)
            for batch in batches:
                x = torch.randn(batch, in_f, generator=gen).to(dev)
                ours = time_ms(lambda: codebook_linear(x, ind, cb, bias), min_run_time=run)
                d = dense_ms[batch]
                # floor: the best ratio the machine allows, each side limited by its bytes
                # (from the LLC when they fit in half of it, else DRAM) or by the GEMM rate
                # (batch 1 has no GEMM term: a GEMV's arithmetic is not what limits either side)
                flops = 2 * batch * out_f * in_f if batch > 1 else 0
                t_dense = max(dense_bytes / (bw_llc if dense_bytes <= llc // 2 else bw_dram), flops / gemm) / 1e6
                t_ours = max(ours_bytes / (bw_llc if ours_bytes <= llc // 2 else bw_dram), flops / gemm) / 1e6
                floor = t_dense / t_ours
                rows.append({"shape": f"{out_f}x{in_f}", "K": k, "batch": batch, "mode": "fwd-warm",
                             "dense": d["p50"], "ours": ours["p50"], "ours_p20": ours["p20"], "ours_p80": ours["p80"],
                             "ratio": d["p50"] / ours["p50"], "ratio_p20": d["p20"] / ours["p20"], "floor": floor})
            # cold batch 1
            n_ours = max(2, math.ceil(cold_bytes / ours_bytes))
            layers = [make_layer(out_f, in_f, k, dev, gen) for _ in range(n_ours)]
            jt = [0]

            def ours_cold():
                jt[0] = (jt[0] + 1) % n_ours
                li, lc, lb = layers[jt[0]]
                return codebook_linear(x1, li, lc, lb)

            oc = time_ms(ours_cold, min_run_time=run)
            rows.append({"shape": f"{out_f}x{in_f}", "K": k, "batch": 1, "mode": f"fwd-cold ({n_ours}/{n_dense} layers)",
                         "dense": dense_cold_ms["p50"], "ours": oc["p50"], "ours_p20": oc["p20"], "ours_p80": oc["p80"],
                         "ratio": dense_cold_ms["p50"] / oc["p50"], "ratio_p20": dense_cold_ms["p20"] / oc["p20"],
                         "floor": dense_bytes / ours_bytes})
            del layers
            # training step with the codebook gradient
            cbg = cb.clone().requires_grad_()
            bg = bias.clone().requires_grad_()
            xo = xt.clone().requires_grad_()

            def ours_train():
                cbg.grad = bg.grad = xo.grad = None
                codebook_linear(xo, ind, cbg, bg).backward(gy)

            ot = time_ms(ours_train, min_run_time=run)
            rows.append({"shape": f"{out_f}x{in_f}", "K": k, "batch": bt, "mode": "train (fwd+bwd)",
                         "dense": dense_train_ms["p50"], "ours": ot["p50"], "ours_p20": ot["p20"], "ours_p80": ot["p80"],
                         "ratio": dense_train_ms["p50"] / ot["p50"], "ratio_p20": dense_train_ms["p20"] / ot["p20"],
                         "floor": 1.0})
    print_table(rows, ["shape", "K", "batch", "mode", "dense", "ours", "ours_p20", "ours_p80", "ratio", "ratio_p20",
                       "floor"],
                title=f"codebook_linear vs dense F.linear ({args.device}; ms p50, ratio = dense/ours, "
                      "ratio_p20 = same on the 20th percentiles, weight bytes ratio = dense/ours)")
    meta = {"bw_dram_GBps": bw_dram, "bw_llc_GBps": bw_llc, "gemm_GFLOPs": gemm, "llc_bytes": llc}
    write_json("codebook_linear", rows + [{"mode": "floors", **meta}], device=args.device, path=args.json)


if __name__ == "__main__":
    main()
