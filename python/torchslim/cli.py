"""Command line: `torchslim info | bench | run` (also `python -m torchslim ...`)."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import torchslim

    info = torchslim.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>20}: {value}")
    return 0


def _cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    script = bench_dir / f"bench_{args.op}.py"
    if not script.exists():
        print(f"benchmark script {script} not found (benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes like 300,100, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive layer sizes like 300,100, got {text!r}")
    return values


def _cmd_run(args) -> int:
    from torchslim.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        data=args.data, seed=args.seed, test_fraction=args.test_fraction, hidden=args.hidden, dropout=args.dropout,
        optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
        prune=not args.no_prune, sparsity=args.sparsity, prune_epochs=args.prune_epochs,
        share=not args.no_share, bits=args.bits, global_codebook=args.global_codebook,
        share_epochs=args.share_epochs, share_lr=args.share_lr, student_hidden=args.student_hidden,
        distill_epochs=args.distill_epochs, temperature=args.temperature, alpha=args.alpha, mixup=args.mixup, device=args.device,
        out=args.out, progress=not args.no_progress, plots=not args.no_plots, latency=not args.no_latency,
        deploy_sparse=not args.no_deploy_sparse, threads=args.threads, train_threads=args.train_threads or None, latency_min_run_time=args.latency_time)
    try:
        run_pipeline(cfg)
    except ValueError as exc:
        print(f"torchslim run: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_run_parser(sub) -> None:
    d = __import__("torchslim.pipeline", fromlist=["PipelineConfig"]).PipelineConfig()
    p = sub.add_parser("run", help="train, prune, weight-share (and distil) a BP network; write a report",
                       description="The whole pipeline: train a dense BP network, prune it gradually with "
                                   "fine-tuning, share weights with k-means codebooks and fine-tune the centroids, "
                                   "optionally distil a smaller student and compress it likewise. Prints a table "
                                   "and writes report.md, report.json, PNG plots and the compressed model to --out.")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a .npz (X, y or x_train/y_train/x_test/y_test), a .csv (label last) or a folder of MNIST "
                        "IDX files; default: scikit-learn's digits")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the split, initialisation and shuffling (%(default)s)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="held-out fraction (%(default)s)")
    g = p.add_argument_group("dense network")
    g.add_argument("--hidden", type=_int_list, default=list(d.hidden), help="hidden layer sizes (default 300,100)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout after each hidden layer (%(default)s)")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer)
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 adam, 0.05 sgd)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--epochs", type=int, default=d.epochs, help="dense training epochs (%(default)s)")
    g = p.add_argument_group("pruning")
    g.add_argument("--no-prune", action="store_true", help="skip pruning")
    g.add_argument("--sparsity", type=float, default=d.sparsity, help="final fraction of zero weights (%(default)s)")
    g.add_argument("--prune-epochs", type=int, default=d.prune_epochs, help="fine-tuning epochs while pruning (%(default)s)")
    g = p.add_argument_group("weight sharing")
    g.add_argument("--no-share", action="store_true", help="skip weight sharing")
    g.add_argument("--bits", type=int, default=d.bits, help="codebook index bits: 2**bits clusters (%(default)s)")
    g.add_argument("--global-codebook", action="store_true", help="one codebook shared by all layers")
    g.add_argument("--share-epochs", type=int, default=d.share_epochs, help="centroid fine-tuning epochs (%(default)s)")
    g.add_argument("--share-lr", type=float, default=None, help="centroid learning rate (default lr/10)")
    g = p.add_argument_group("distillation")
    g.add_argument("--student-hidden", type=_int_list, default=None,
                   help="hidden sizes of a student distilled from the dense teacher, e.g. 100 (default: no student)")
    g.add_argument("--distill-epochs", type=int, default=None, help="student epochs (default: 2 x --epochs)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature (%(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the soft-target loss (%(default)s)")
    g.add_argument("--mixup", action="store_true",
                   help="also distil on mixed inputs (lam*x_i + (1-lam)*x_j) labelled by the teacher only")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for inference and latency (default: torch's choice)")
    g.add_argument("--train-threads", type=int, default=d.train_threads,
                   help="CPU threads while training (%(default)s: small MLPs train fastest on one; 0: as --threads)")
    g.add_argument("--out", default=d.out, help="output folder (%(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurements")
    g.add_argument("--no-deploy-sparse", action="store_true",
                   help="no final 'deploy' stage (the weight-shared file run as sparse layers after loading)")
    g.add_argument("--latency-time", type=float, default=d.latency_min_run_time, metavar="SECONDS",
                   help="minimum timing time per stage and batch size (%(default)s)")
    p.set_defaults(func=_cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build and hardware information")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(func=_cmd_info)
    p_bench = sub.add_parser("bench", help="run a kernel benchmark from benchmarks/")
    p_bench.add_argument("op", choices=["masked_linear", "codebook_linear", "kd_loss", "peers"], nargs="?",
                         default="masked_linear",
                         help="peers: torchslim next to dense fp32/bf16, torch.sparse CSR, torch int4/int8, "
                              "torch.compile and DeepSparse in one run (--quick, --full, --markdown)")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p_bench.set_defaults(func=_cmd_bench)
    _add_run_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
