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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build and hardware information")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(func=_cmd_info)
    p_bench = sub.add_parser("bench", help="run a kernel benchmark from benchmarks/")
    p_bench.add_argument("op", choices=["masked_linear", "codebook_linear", "kd_loss"], nargs="?", default="masked_linear")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
