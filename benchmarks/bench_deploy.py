"""A saved pruned + shared MLP, deployed: the sparse-codebook deploy (what
``torchslim.load(deploy=True)`` gives) vs the fp32 sparse deploy of the same weights (every
shared layer decoded to fp32 values first) vs the dense model, at batch 1 and 256, on 1 and 2
threads, in one run; and the running model's weight bytes vs the file's.

    python benchmarks/bench_deploy.py                       # trains nothing: a synthetic 64-300-100-10
    python benchmarks/bench_deploy.py --model out/model.safetensors --hidden 300 100 --in 64 --classes 10

Without ``--model`` the benchmark builds the digits pipeline's shape (64-300-100-10, 90% global
magnitude pruning, 4-bit per-layer codebooks, random weights) and saves it to a temporary file.
The floor of a deployed call is the bytes its layers read / the memory bandwidth: a few tens of
KB here, so at batch 1 the figures are call overhead, not bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, time_interleaved, write_json  # noqa: E402

import torchslim  # noqa: E402
from torchslim.nn import CodebookLinear, MaskedSparseLinear  # noqa: E402
from torchslim.nn.deployed import DEPLOYED_TYPES  # noqa: E402
from torchslim.pipeline import make_mlp  # noqa: E402


def synthetic(path: str, in_f: int, hidden, classes: int) -> None:
    torch.manual_seed(0)
    model = make_mlp(in_f, hidden, classes)
    torchslim.prune.magnitude_prune(model, 0.9, scope="global")
    model = torchslim.share.cluster_weights(model, num_clusters=16)
    torchslim.save(model, path)


def fp32_sparse(model: nn.Module) -> nn.Module:
    """The same weights with every shared layer decoded to fp32 kept values (MaskedSparseLinear)."""
    for name, child in list(model.named_children()):
        if isinstance(child, CodebookLinear):
            keep = child.labels() != 0 if child.zero_pinned else torch.ones_like(child.labels(), dtype=torch.bool)
            setattr(model, name, MaskedSparseLinear.from_dense(child.to_dense(), mask=keep))
        else:
            fp32_sparse(child)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the deployed layers' buffers (structure, codes or values, codebook, bias)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, DEPLOYED_TYPES)
               for b in m.buffers(recurse=False) if b is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a torchslim file of an MLP built by torchslim.pipeline.make_mlp")
    ap.add_argument("--in", dest="in_f", type=int, default=64)
    ap.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.min_time = 2, 0.05

    tmp = None
    path = args.model
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "mlp.safetensors")
        synthetic(path, args.in_f, args.hidden, args.classes)
    skeleton = lambda: make_mlp(args.in_f, args.hidden, args.classes)  # noqa: E731
    forms = {
        "sparse_codebook_deploy": torchslim.load(path, model=skeleton().to("meta"), deploy=True),
        "fp32_sparse_deploy": torchslim.deploy(fp32_sparse(torchslim.load(path, model=skeleton()))),
        "dense": torchslim.to_dense(torchslim.load(path, model=skeleton())).eval(),
    }
    kinds = {name: sorted({type(m).__name__ for m in f.modules() if isinstance(m, DEPLOYED_TYPES)})
             for name, f in forms.items()}
    file_bytes = os.path.getsize(path)
    rows = []
    threads0 = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 256):
            x = torch.randn(batch, args.in_f)
            with torch.inference_mode():
                ref = forms["dense"](x)
                for name, f in forms.items():
                    torch.testing.assert_close(f(x), ref, rtol=1e-4, atol=1e-4)
                t = time_interleaved({name: (lambda f=f: f(x)) for name, f in forms.items()}, rounds=args.rounds,
                                     min_run_time=args.min_time)
            sc, fp, dn = (t[k]["p50"] for k in ("sparse_codebook_deploy", "fp32_sparse_deploy", "dense"))
            rows.append({"threads": threads, "batch": batch, "sparse_codebook_deploy_ms": sc,
                         "fp32_sparse_deploy_ms": fp, "dense_ms": dn, "x_fp32_sparse_deploy": fp / sc,
                         "x_dense": dn / sc})
    torch.set_num_threads(threads0)
    sc_bytes, fp_bytes = weight_bytes(forms["sparse_codebook_deploy"]), weight_bytes(forms["fp32_sparse_deploy"])
    print(f"file {file_bytes} B; running weight bytes: sparse-codebook deploy {sc_bytes} B "
          f"({sc_bytes / file_bytes:.2f}x the file), fp32 sparse deploy {fp_bytes} B ({fp_bytes / file_bytes:.2f}x)")
    print(f"layer kinds: {kinds}")
    print_table(rows, ["threads", "batch", "sparse_codebook_deploy_ms", "fp32_sparse_deploy_ms", "dense_ms",
                       "x_fp32_sparse_deploy", "x_dense"], title="deployed MLP (medians, ms; x = other / ours)")
    for r in rows:
        r.update({"file_bytes": file_bytes, "weight_bytes_sparse_codebook_deploy": sc_bytes,
                  "weight_bytes_fp32_sparse_deploy": fp_bytes, "model": args.model or "synthetic",
                  "shape": "-".join(str(s) for s in [args.in_f, *args.hidden, args.classes])})
    write_json("deploy", rows)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
