"""Accuracy, sparsity and CPU latency of gradual magnitude pruning on LeNet-300-100.

Trains a dense LeNet-300-100 (in-300-100-10, ReLU), then prunes it gradually (Zhu & Gupta
cubic schedule, global magnitude, with fine-tuning) to ``--sparsity`` and reports test
accuracy, the fraction of weights removed and inference latency (median of many calls)
of the pruned model (MaskedSparseLinear layers), and of the same model after
``torchslim.to_sparse`` (a SparseSequential: its sparse layers and ReLUs run as one fused
call), against the dense one at batch 1 and 256, plus torch.sparse CSR matmuls on the same
masks as a point of reference. The speed targets are checked on the to_sparse form. Latency is given
as wall time (p50 of torch.utils.benchmark blocks) and as CPU time per call (process
time on one thread), which other processes on a shared machine do not inflate.

    python benchmarks/bench_prune_accuracy.py                       # scikit-learn digits (64-300-100-10)
    python benchmarks/bench_prune_accuracy.py --data /path/to/mnist-t10k   # MNIST IDX, 8k/2k split
    python benchmarks/bench_prune_accuracy.py --quick

Writes benchmarks/results/prune_accuracy.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, time_ms, write_json  # noqa: E402

from torchslim.data import load_dataset  # noqa: E402
from torchslim.io import to_sparse  # noqa: E402
from torchslim.nn import MaskedSparseLinear  # noqa: E402
from torchslim.prune import GradualPruner, sparsity_report  # noqa: E402


def lenet_300_100(num_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(num_features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))


def train(model, data, epochs, lr, seed, batch_size=64, pruner=None, weight_decay=0.0):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * math.ceil(len(data.x_train) / batch_size)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step()
    model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    return 100.0 * (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


class CsrMLP(nn.Module):
    """The pruned weights as torch.sparse CSR matrices (reference point, inference only)."""

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.layers = []
        for m in model:
            if isinstance(m, MaskedSparseLinear):
                w = (m.weight.detach() * m.mask).to_sparse_csr()
                self.layers.append(("linear", w, m.bias.detach()))
            elif isinstance(m, nn.Linear):
                self.layers.append(("linear", m.weight.detach().to_sparse_csr(), m.bias.detach()))
            else:
                self.layers.append(("fn", m, None))

    def forward(self, x):
        h = x.T.contiguous()  # [features, batch]: one sparse @ dense per layer
        for kind, a, b in self.layers:
            h = torch.addmm(b[:, None], a, h) if kind == "linear" else a(h)
        return h.T


def latency_us(model, x, min_run_time) -> float:
    with torch.inference_mode():
        return 1e3 * time_ms(lambda: model(x), min_run_time=min_run_time, warmup=10)["p50"]


def cpu_us(model, x, min_run_time, repeats=7) -> float:
    """Median CPU time per call on one thread: unlike wall time it does not count the time
    slices other processes take on a shared machine (one thread, because idle OpenMP workers
    spin and would be counted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cpu_us(model, x, min_run_time, repeats)
    finally:
        torch.set_num_threads(threads)


def _cpu_us(model, x, min_run_time, repeats):
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        start = time.process_time()
        calls = 0
        while time.process_time() - start < min_run_time / repeats:
            model(x)
            calls += 1
        per_block = max(1, calls)
        samples = []
        for _ in range(repeats):
            t = time.process_time_ns()
            for _ in range(per_block):
                model(x)
            samples.append((time.process_time_ns() - t) / per_block / 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MNIST IDX folder / .npz / .csv (default: scikit-learn digits)")
    parser.add_argument("--sparsity", type=float, default=0.92)
    parser.add_argument("--scope", default="global", choices=["global", "layer"], help="magnitude ranking scope")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (30 on digits, 20 else)")
    parser.add_argument("--prune-epochs", type=int, default=None,
                        help="gradual pruning (first half) + fine-tuning epochs (30 on digits, 20 else)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay while fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for timing (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="10+10 epochs and short timings")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/prune_accuracy.json)")
    args = parser.parse_args()

    full = 30 if args.data is None else 20  # digits is small: more epochs cost little
    epochs = args.epochs or (10 if args.quick else full)
    prune_epochs = args.prune_epochs or (10 if args.quick else full)
    min_run_time = 0.05 if args.quick else 1.0
    if args.threads:
        torch.set_num_threads(args.threads)

    timing_threads = torch.get_num_threads()
    # Training is small: one thread is fast, bit-reproducible and robust on a loaded machine.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, seed=args.seed)
    steps_per_epoch = math.ceil(len(data.x_train) / 64)
    t0 = time.perf_counter()

    torch.manual_seed(args.seed)
    base = lenet_300_100(data.num_features, data.num_classes)
    train(base, data, epochs, args.lr, seed=args.seed)
    dense_acc = accuracy(base, data)
    print(f"dense: {dense_acc:.2f}% after {epochs} epochs ({time.perf_counter() - t0:.1f} s)", flush=True)

    # The same fine-tuning budget without pruning, so the comparison is fair both ways.
    dense_ft = copy.deepcopy(base)
    train(dense_ft, data, prune_epochs, args.lr, seed=args.seed + 1, weight_decay=args.weight_decay)
    dense_ft_acc = accuracy(dense_ft, data)
    print(f"dense + fine-tuning: {dense_ft_acc:.2f}% ({time.perf_counter() - t0:.1f} s)", flush=True)

    pruned = copy.deepcopy(base)
    end = steps_per_epoch * max(1, prune_epochs // 2)  # second half: fine-tuning at the final sparsity
    pruner = GradualPruner(pruned, args.sparsity, start_step=0, end_step=end, frequency=max(1, steps_per_epoch // 4), scope=args.scope)
    train(pruned, data, prune_epochs, args.lr, seed=args.seed + 1, pruner=pruner,
          weight_decay=args.weight_decay)
    pruned_acc = accuracy(pruned, data)
    print(f"pruned: {pruned_acc:.2f}% ({time.perf_counter() - t0:.1f} s)", flush=True)
    torch.set_num_threads(timing_threads)
    train_s = time.perf_counter() - t0
    report = sparsity_report(pruned)

    csr = CsrMLP(pruned)
    deployed = to_sparse(pruned).eval()  # SparseSequential: the sparse layers + ReLUs in one fused call
    with torch.no_grad():
        torch.testing.assert_close(csr(data.x_test[:8]), pruned(data.x_test[:8]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(deployed(data.x_test[:8]), pruned(data.x_test[:8]), rtol=1e-4, atol=1e-4)
    models = (("dense", base), ("pruned", pruned), ("fused", deployed), ("csr", csr))

    rows = []
    reference = max(dense_acc, dense_ft_acc)
    timings = {}
    for batch in (1, 256):
        x = data.x_test[:batch] if len(data.x_test) >= batch else data.x_test.repeat(batch // len(data.x_test) + 1, 1)[:batch]
        x = x.contiguous()
        timings[batch] = {name: latency_us(m, x, min_run_time) for name, m in models}
        timings[f"cpu{batch}"] = {name: cpu_us(m, x, min_run_time) for name, m in models}
    for name, model, acc, sp in (
        ("dense (trained)", base, dense_acc, 0.0),
        ("dense (+ same fine-tuning)", dense_ft, dense_ft_acc, 0.0),
        ("pruned (MaskedSparseLinear)", pruned, pruned_acc, report.sparsity),
        ("pruned, to_sparse (fused)", deployed, pruned_acc, report.sparsity),
        ("pruned (torch.sparse CSR)", csr, pruned_acc, report.sparsity),
    ):
        key = ("dense" if name.startswith("dense") else "pruned" if "Masked" in name
               else "fused" if "fused" in name else "csr")
        row = {"model": name, "accuracy": acc, "acc_delta": acc - reference, "sparsity": sp,
               "kept": report.kept if sp else report.weights,
               "b1_us": timings[1][key], "b256_us": timings[256][key],
               "speedup_b1": timings[1]["dense"] / timings[1][key],
               "speedup_b256": timings[256]["dense"] / timings[256][key],
               "b1_cpu_us": timings["cpu1"][key], "b256_cpu_us": timings["cpu256"][key],
               "cpu_speedup_b1": timings["cpu1"]["dense"] / timings["cpu1"][key],
               "cpu_speedup_b256": timings["cpu256"]["dense"] / timings["cpu256"][key]}
        rows.append(row)

    title = (f"LeNet-300-100 on {data.name} ({data.num_features}-300-100-{data.num_classes}), "
             f"{len(data.x_train)} train / {len(data.x_test)} test, {epochs}+{prune_epochs} epochs, {args.scope} scope, "
             f"{torch.get_num_threads()} threads, training took {train_s:.1f} s")
    print_table(rows, ["model", "accuracy", "acc_delta", "sparsity", "kept", "b1_us", "b256_us",
                       "speedup_b1", "speedup_b256"], title=title)
    print_table(rows, ["model", "b1_cpu_us", "b256_cpu_us", "cpu_speedup_b1", "cpu_speedup_b256"],
                title="CPU time per call on 1 thread (robust to other load on the machine)")
    print("\n" + report.to_markdown())
    ok_sparsity = report.sparsity >= 0.92 - 1e-9
    ok_acc = pruned_acc >= reference - 0.3
    fused = rows[3]  # the pruned model as deployed: to_sparse (one fused call per forward)
    ok_b1 = fused["speedup_b1"] >= 2.0
    ok_b256 = fused["speedup_b256"] >= 3.0
    print(f"\ntargets: sparsity >= 92%: {'met' if ok_sparsity else 'MISSED'} ({100 * report.sparsity:.2f}%); "
          f"accuracy within 0.3 points of dense ({reference:.2f}%): {'met' if ok_acc else 'MISSED'} "
          f"({pruned_acc - reference:+.2f}); to_sparse batch-1 speed-up >= 2x: {'met' if ok_b1 else 'MISSED'} "
          f"({fused['speedup_b1']:.2f}x); to_sparse batch-256 speed-up >= 3x: {'met' if ok_b256 else 'MISSED'} "
          f"({fused['speedup_b256']:.2f}x)")
    for row in rows:
        row.update({"data": data.name, "epochs": epochs, "prune_epochs": prune_epochs, "scope": args.scope,
                    "quick": args.quick})
    rows.append({"model": "layers", "layers": report.to_dict()["layers"], "train_seconds": train_s})
    write_json("prune_accuracy", rows, path=args.json)


if __name__ == "__main__":
    main()
