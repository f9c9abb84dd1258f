"""Benchmark torchslim.kmeans.kmeans_1d (sorted-array Lloyd) against a plain Lloyd step.

For each size n and cluster count K: the whole fit (sort, prefix sums, Lloyd to convergence
or max_iter, final labelling), its floor (one sort of the values plus one labelling pass,
which any exact assignment needs), and the cost of ONE plain Lloyd step in PyTorch
(bucketize all n values against the midpoints, then bincount sums and counts) measured in
the same run; "plain fit est." is that step times our number of Lloyd steps.

    python benchmarks/bench_kmeans.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from torchslim.kmeans import kmeans_1d  # noqa: E402


def _best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _plain_lloyd_step(w, c):
    bounds = (c[1:] + c[:-1]) * 0.5
    labels = torch.bucketize(w, bounds, right=True)
    counts = torch.bincount(labels, minlength=c.numel()).to(torch.float64)
    sums = torch.zeros(c.numel(), dtype=torch.float64).index_add_(0, labels, w.double())
    return torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).to(w.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M values, K=16 only (a few seconds)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/kmeans.json)")
    args = ap.parse_args(argv)

    sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    ks = [16] if args.quick else [16, 256]
    inits = ["linear"] if args.quick else ["linear", "density", "kmeans++", "random"]
    repeat = 1 if args.quick else 2
    rows = []
    for n in sizes:
        w = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.05
        wn = w.numpy()
        sort_s, xs = _best_of(lambda: np.sort(wn), repeat)
        for k in ks:
            c = torch.linspace(float(w.min()), float(w.max()), k)
            bounds = ((c[1:] + c[:-1]) * 0.5).numpy()
            label_s, _ = _best_of(lambda: np.searchsorted(bounds, wn, side="right"), repeat)
            step_s, _ = _best_of(lambda: _plain_lloyd_step(w, c), repeat)
            for init in inits:
                fit_s, r = _best_of(lambda: kmeans_1d(w, k, init=init, seed=0), repeat)
                rel = float((r.centroids[r.labels] - w.double()).norm() / w.double().norm())
                floor = sort_s + label_s
                rows.append({"n": n, "K": k, "init": init, "fit_s": fit_s, "floor_s": floor,
                             "fit/floor": fit_s / floor, "lloyd_steps": r.iterations, "converged": r.converged,
                             "rel_error": rel, "plain_step_s": step_s,
                             "plain_fit_est_s": step_s * max(r.iterations, 1),
                             "speedup_vs_plain": step_s * max(r.iterations, 1) / fit_s,
                             "threads": torch.get_num_threads()})
    cols = ["n", "K", "init", "fit_s", "floor_s", "fit/floor", "lloyd_steps", "rel_error", "plain_step_s",
            "plain_fit_est_s", "speedup_vs_plain"]
    print_table(rows, cols, title="kmeans_1d: sorted-array Lloyd vs plain Lloyd (seconds)")
    write_json("kmeans", rows, path=args.json)


if __name__ == "__main__":
    main()
