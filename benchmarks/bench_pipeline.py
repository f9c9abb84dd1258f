"""End-to-end pipeline benchmark: the issue's targets for `torchslim run`.

1. `torchslim run` defaults on scikit-learn's digits: final model >= 20x smaller than the
   dense fp32 model at <= 1 point of accuracy lost, in < 2 minutes.
2. LeNet-300-100 on MNIST t10k (8k/2k split; --data FOLDER, default ../shared/data/mnist-t10k
   when present): >= 40x smaller at <= 0.5 point lost; a 784-100-10 student distilled from
   the dense network beats the same student trained without the teacher.
3. The compressed model's CPU latency >= 2x better than the dense model's at batch 1 and
   >= 3x at batch 256 (both measured in the same run; the "ideal" column is params/non-zeros,
   the speed-up a kernel doing only the kept multiply-adds at the dense rate would reach).
   The speed-ups come from a re-timing after the runs that takes the models in turns
   (dense, shared, deploy, dense, ...; median of --rounds), robust to a busy machine; the
   per-stage tables hold each stage's own timing.

    python benchmarks/bench_pipeline.py [--quick] [--data FOLDER] [--threads N]

Prints a table and writes benchmarks/results/pipeline.json (and each run's report.* and
plots under benchmarks/results/pipeline/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# LeNet-300-100 settings: Han et al. keep ~8% of the weights of LeNet-300-100 and use
# 6-bit codebooks; with 8k training samples we prune harder and use 4-bit codebooks.
MNIST = dict(hidden=(300, 100), epochs=20, sparsity=0.95, prune_epochs=20, bits=4, share_epochs=8,
             student_hidden=(100,), distill_epochs=20, temperature=4.0, alpha=0.9)


def _default_mnist() -> Path | None:
    for cand in (ROOT.parent / "shared" / "data" / "mnist-t10k", ROOT / ".." / ".." / "shared" / "data" / "mnist-t10k",
                 Path("/work/shared/data/mnist-t10k")):
        if cand.is_dir():
            return cand.resolve()
    return None


def _stage(payload, name):
    return next(s for s in payload["stages"] if s["name"] == name)


def _plain_student(cfg, payload) -> float:
    """The distilled student's architecture trained on labels only (same seed, epochs, data)."""
    from torchslim.data import load_dataset
    from torchslim.distill import accuracy, fit
    from torchslim.pipeline import make_mlp
    from torch.utils.data import DataLoader, TensorDataset

    split = load_dataset(cfg.data, seed=cfg.seed, test_fraction=cfg.test_fraction)
    torch.manual_seed(cfg.seed * 1000 + 10)  # the pipeline's student seed
    model = make_mlp(split.num_features, cfg.student_hidden, split.num_classes)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 10)
    loader = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=cfg.batch_size, shuffle=True, generator=g)
    epochs = cfg.distill_epochs if cfg.distill_epochs is not None else cfg.epochs
    lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.optimizer == "adam" else 0.05)
    old = torch.get_num_threads()
    if cfg.train_threads:
        torch.set_num_threads(cfg.train_threads)  # as the pipeline trains
    try:
        fit(model, loader, epochs=epochs, lr=lr, optimizer=cfg.optimizer, progress=cfg.progress)
    finally:
        torch.set_num_threads(old)
    return accuracy(model, split.x_test, split.y_test)


def _interleaved(pipe, names, rounds: int, min_run_time: float = 0.05) -> dict:
    """Re-time the named stages' models in turns (dense, shared, deploy, dense, ...) and take
    the median over rounds, so a load spike on a shared machine hits every model alike.
    Returns {name: {batch: median ms}}."""
    import numpy as np
    from torchslim.report import measure_latency

    x = pipe.x_test[:256]
    times = {n: {1: [], 256: []} for n in names}
    for _ in range(rounds):
        for n in names:
            for b, ms in measure_latency(pipe.models[n], x, (1, 256), min_run_time).items():
                times[n][b].append(ms)
    return {n: {b: float(np.median(v)) for b, v in t.items()} for n, t in times.items()}


def _run(cfg):
    from torchslim.pipeline import Pipeline

    pipe = Pipeline(cfg)
    return pipe.run(), pipe


def main() -> None:
    from torchslim.pipeline import PipelineConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke run; targets not expected)")
    parser.add_argument("--data", default=None, help="MNIST IDX folder (default ../shared/data/mnist-t10k)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "pipeline"))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (%(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    quick = dict(epochs=2, prune_epochs=2, share_epochs=1, distill_epochs=2) if args.quick else {}
    rows, runs = [], {}

    def check(target, measured, threshold, ok, unit=""):
        rows.append({"target": target, "measured": measured, "threshold": threshold, "unit": unit,
                     "pass": "yes" if ok else "NO"})

    if not args.skip_digits:
        cfg = PipelineConfig(out=str(out / "digits"), device=args.device, progress=args.progress, **quick)
        t0 = time.perf_counter()
        p, pipe = _run(cfg)
        elapsed = time.perf_counter() - t0
        runs["digits"] = p
        dense, final = p["stages"][0], p["stages"][-1]
        shared = _stage(p, "shared")
        drop = 100 * (dense["accuracy"] - final["accuracy"])
        check("digits defaults: compression (x)", final["compression_ratio"], ">= 20", final["compression_ratio"] >= 20)
        check("digits defaults: accuracy lost (points)", drop, "<= 1.0", drop <= 1.0)
        check("digits defaults: wall time (s)", elapsed, "< 120", elapsed < 120)
        names = [s["name"] for s in (dense, shared, final)]
        inter = _interleaved(pipe, list(dict.fromkeys(names)), args.rounds)
        p["interleaved_latency_ms"] = inter
        for stage in (shared, final) if final is not shared else (final,):
            for b in (1, 256):
                sp = inter["dense"][b] / inter[stage["name"]][b]
                need = 2 if b == 1 else 3
                check(f"digits {stage['name']}: latency speed-up batch {b} (x)", sp,
                      f">= {need} (ideal {dense['params'] / stage['nonzeros']:.1f})", sp >= need)

    mnist = None if args.skip_mnist else (Path(args.data) if args.data else _default_mnist())
    if mnist is not None:
        settings = dict(MNIST)
        settings.update(quick)
        cfg = PipelineConfig(data=str(mnist), out=str(out / "mnist"), device=args.device, progress=args.progress,
                             **settings)
        t0 = time.perf_counter()
        p, pipe = _run(cfg)
        elapsed = time.perf_counter() - t0
        runs["mnist"] = p
        dense, shared = _stage(p, "dense"), _stage(p, "shared")
        deploy = next((s for s in p["stages"] if s["name"] == "deploy"), shared)
        drop = 100 * (dense["accuracy"] - deploy["accuracy"])
        check("LeNet-300-100: compression (x)", deploy["compression_ratio"], ">= 40", deploy["compression_ratio"] >= 40)
        check("LeNet-300-100: accuracy lost (points)", drop, "<= 0.5", drop <= 0.5)
        stages = (shared, deploy) if deploy is not shared else (shared,)
        inter = _interleaved(pipe, ["dense"] + [s["name"] for s in stages], args.rounds)
        p["interleaved_latency_ms"] = inter
        for stage in stages:
            for b in (1, 256):
                sp = inter["dense"][b] / inter[stage["name"]][b]
                need = 2 if b == 1 else 3
                check(f"LeNet-300-100 {stage['name']}: latency speed-up batch {b} (x)", sp,
                      f">= {need} (ideal {dense['params'] / stage['nonzeros']:.1f})", sp >= need)
        plain = _plain_student(cfg, p)
        student = _stage(p, "student")
        check("784-100-10 distilled accuracy - plain (points)", 100 * (student["accuracy"] - plain), "> 0",
              student["accuracy"] > plain)
        p["plain_student_accuracy"] = plain
        final = p["stages"][-1]
        check("LeNet student-shared: compression (x)", final["compression_ratio"], "(info)", True)
        check("LeNet student-shared: accuracy lost vs dense (points)", 100 * (dense["accuracy"] - final["accuracy"]),
              "(info)", True)
        check("LeNet run wall time (s)", elapsed, "(info)", True)
    elif not args.skip_mnist:
        print("MNIST folder not found: pass --data FOLDER to run the LeNet-300-100 part", file=sys.stderr)

    for name, p in runs.items():
        print_table([{**s, "accuracy": 100 * s["accuracy"], "compression_ratio": s["compression_ratio"]}
                     for s in p["stages"]],
                    ["name", "accuracy", "params", "nonzeros", "bytes", "compression_ratio", "latency_b1_ms",
                     "latency_b256_ms"], title=f"{name} stages")
    print_table(rows, ["target", "measured", "threshold", "pass"], title="targets" + (" (--quick)" if args.quick else ""))
    payload_rows = [dict(r) for r in rows]
    for name, p in runs.items():
        for s in p["stages"]:
            payload_rows.append({"run": name, **{k: v for k, v in s.items() if k != "note"}})
        for stage, t in p.get("interleaved_latency_ms", {}).items():
            payload_rows.append({"run": name, "interleaved_stage": stage, "latency_b1_ms": t[1],
                                 "latency_b256_ms": t[256]})
    inter_rows = [{"run": name, "stage": stage, "b1_ms": t[1], "b256_ms": t[256]}
                  for name, p in runs.items() for stage, t in p.get("interleaved_latency_ms", {}).items()]
    if inter_rows:
        print_table(inter_rows, ["run", "stage", "b1_ms", "b256_ms"], title="interleaved latency (median of rounds)")
    write_json("pipeline_quick" if args.quick else "pipeline", payload_rows, device=args.device)


if __name__ == "__main__":
    main()
