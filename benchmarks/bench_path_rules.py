"""Re-measures the path rules (torchslim/_path_rules.py): for each layer type, the density at
which the sparse kernel stops beating the dense one, per dtype, batch and thread count.

    python benchmarks/bench_path_rules.py [--quick] [--threads 1 2]

For each (shape, dtype, batch) it times, interleaved, the dense product (F.linear of the
masked weight, in the layer's dtype: bf16 runs oneDNN's bf16 kernels) and the sparse path
the module takes (``force_path("sparse")``) over a density sweep, and reports the largest
density where the sparse path is still faster ("crossover"), beside the density the current
rule allows. Inference only (no gradient); the training rule is measured by
bench_masked_linear.py. Writes benchmarks/results/path_rules.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, time_interleaved, write_json  # noqa: E402

from torchslim import _path_rules as rules  # noqa: E402
from torchslim.nn import MaskedSparseLinear, force_path  # noqa: E402

DENSITIES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def masked_layer(out_f, in_f, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    mask = torch.rand(out_f, in_f, generator=g) < density
    return MaskedSparseLinear.from_dense(lin, mask=mask).to(dtype).eval()


def crossover(times: dict) -> float:
    """The largest density at which sparse beat dense, scanning up from the sparsest (0 if never)."""
    best = 0.0
    for d in sorted(times):
        dense_ms, sparse_ms = times[d]
        if sparse_ms < dense_ms:
            best = d
        else:
            break
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=0.05)
    args = ap.parse_args()
    shapes = [(3072, 768), (4096, 4096)] if not args.quick else [(1024, 512)]
    batches = (1, 8, 64, 256) if not args.quick else (1, 64)
    dtypes = (torch.float32, torch.bfloat16)
    densities = DENSITIES if not args.quick else (0.05, 0.2, 0.4)
    rows = []
    threads0 = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out_f, in_f in shapes:
            for dtype in dtypes:
                layers = {d: masked_layer(out_f, in_f, d, dtype) for d in densities}
                dense_w = {d: (m.weight * m.mask).detach() for d, m in layers.items()}
                for batch in batches:
                    x = torch.randn(batch, in_f).to(dtype)
                    times = {}
                    with torch.inference_mode():
                        for d, m in layers.items():
                            def sparse(m=m):
                                with force_path("sparse"):
                                    return m(x)
                            w, b = dense_w[d], m.bias
                            t = time_interleaved({"dense": lambda w=w, b=b: F.linear(x, w, b), "sparse": sparse},
                                                 rounds=2, min_run_time=args.min_time)
                            times[d] = (t["dense"]["p50"], t["sparse"]["p50"])
                    rule = max([d for d in densities
                                if rules.masked_sparse_faster(layers[d].density, batch, out_f * in_f)], default=0.0)
                    row = {"op": "masked_sparse_linear", "threads": threads, "shape": f"{out_f}x{in_f}",
                           "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                           "measured_crossover": crossover(times), "rule_allows": rule}
                    row.update({f"x_at_{d:g}": times[d][0] / times[d][1] for d in densities})
                    rows.append(row)
                    print(row, flush=True)
    torch.set_num_threads(threads0)
    print_table(rows, ["threads", "shape", "dtype", "batch", "measured_crossover", "rule_allows"],
                title="masked sparse vs dense: largest density where sparse wins (x_at_d = dense / sparse)")
    write_json("path_rules", rows)


if __name__ == "__main__":
    main()
