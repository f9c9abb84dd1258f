"""Whole-model targets of save / load / deploy (issue "Any PyTorch model in, a deployable
compressed model out"), on transformers models built from configs (random weights):

- Llama (vocab 1000, hidden 1024, intermediate 2816, 4 layers: linear layers dominate),
  pruned 90% (global, lm_head excluded) + 4-bit shared (16 clusters);
- bert-base (BertForSequenceClassification, default config) pruned 90% (classifier excluded).

Per model:
- file: bytes of the compressed layers in the file vs their dense fp32 bytes (target <= 1/15),
  whole file vs ``torch.save(dense state_dict)`` (Llama target <= 1/6);
- memory: resident-set growth of ``load(path, model=meta_skeleton, deploy=True)`` in a fresh
  process, vs the dense fp32 model's bytes (target <= 1/4);
- speed under ``torch.inference_mode``, same run, models timed in turns: dense vs
  ``deploy(model)`` (Llama decode-shaped input batch 1 x sequence 1, target >= 3x; BERT
  batch 1 x sequence 128, target >= 2x), and ``torch.compile`` of the pruned model vs the
  eager pruned model (target: no slower);
- the floor: bytes the deployed model reads per call / measured memory bandwidth.

    python benchmarks/bench_models.py [--smoke] [--threads N] [--rounds N] [--no-compile]

``--smoke``: tiny configs (seconds; checks the script, its figures mean nothing).
Writes benchmarks/results/models.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def configs(smoke: bool) -> dict:
    if smoke:
        llama = dict(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        bert = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=160)
    else:
        llama = dict(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
        bert = {}  # bert-base defaults
    return {
        "llama": {"cls": "LlamaForCausalLM", "config": ("LlamaConfig", llama), "share": True,
                  "input": (1, 1)},
        "bert": {"cls": "BertForSequenceClassification", "config": ("BertConfig", bert), "share": False,
                 "input": (1, 16 if smoke else 128)},
    }


def build(spec, device=None):
    import transformers as T

    cfg = getattr(T, spec["config"][0])(**spec["config"][1])
    cls = getattr(T, spec["cls"])
    if device == "meta":
        with torch.device("meta"):
            return cls(cfg)
    return cls(cfg).eval()


def not_head(name, module):
    return not name.endswith(("lm_head", "classifier"))


def compress(model, share: bool):
    from torchslim.prune import magnitude_prune
    from torchslim.share import cluster_weights

    magnitude_prune(model, 0.9, scope="global", include=not_head)
    if share:
        cluster_weights(model, 16, scope="layer", include=not_head)
    return model


def file_figures(model, dense, path: Path) -> dict:
    import torchslim
    from safetensors import safe_open

    size = torchslim.save(model, path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["torchslim"])
    itemsize = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1}
    nbytes = {n: int(np.prod(s)) * itemsize[d] for n, (d, s, _) in header["tensors"].items()}
    compressed = sum(v for n, v in nbytes.items() if n.startswith("__ts__/"))
    layer_dense = sum(4 * node["in"] * node["out"] + (4 * node["out"] if node["bias"] else 0)
                      for node in header["layers"].values())
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        torch.save(dense.state_dict(), tmp.name)
        torch_bytes = os.path.getsize(tmp.name)
    return {"file_bytes": size, "torch_save_dense_bytes": torch_bytes, "file_ratio": torch_bytes / size,
            "compressed_layer_bytes": compressed, "compressed_layers_dense_fp32_bytes": layer_dense,
            "layer_ratio": layer_dense / max(compressed, 1)}


_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
import bench_models as B
import torchslim, torchslim.io, safetensors.torch  # imported before measuring: code is not data
spec = json.loads({spec!r})
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
skeleton = B.build(spec, device="meta")
before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = torchslim.load({path!r}, model=skeleton, deploy=True)
after, peak_after = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"rss_growth": after - before, "peak_growth": peak_after - max(peak_before, before)}}))
"""


def memory_figures(spec, path: Path, dense_bytes: int) -> dict:
    code = _CHILD.format(bench=str(Path(__file__).resolve().parent), spec=json.dumps(spec), path=str(path))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    fig["dense_fp32_bytes"] = dense_bytes
    fig["rss_ratio"] = fig["rss_growth"] / dense_bytes
    fig["peak_ratio"] = fig["peak_growth"] / dense_bytes
    return fig


def bandwidth_gbs() -> float:
    a = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB, beyond the caches
    a.fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() / best / 1e9  # read + write


def read_bytes(model) -> int:
    """Bytes of every parameter and buffer: what one forward reads at least once."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def timed_in_turns(fns: dict, rounds: int, reps: int) -> dict:
    """Median ms per call of each fn, the models taking turns (robust to a busy machine)."""
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t0) / reps * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def speed_figures(dense, pruned, deployed, shape, rounds, compile_too) -> dict:
    batch, seq = shape
    ids = torch.randint(0, 100, (batch, seq))
    kwargs = {"use_cache": False} if hasattr(dense.config, "use_cache") else {}

    def call(m):
        return lambda: m(ids, **kwargs)

    fns = {"dense": call(dense), "deploy": call(deployed), "pruned_eager": call(pruned)}
    if compile_too:
        fns["pruned_compiled"] = call(torch.compile(pruned))
        fns["deploy_compiled"] = call(torch.compile(deployed))
    with torch.inference_mode():
        ms = timed_in_turns(fns, rounds, reps=5)
    fig = {f"{k}_ms": v for k, v in ms.items()}
    fig["deploy_speedup"] = ms["dense"] / ms["deploy"]
    if compile_too:
        fig["compiled_vs_eager"] = ms["pruned_eager"] / ms["pruned_compiled"]
    return fig


def run(args) -> list[dict]:
    import copy

    import torchslim

    rows = []
    bw = bandwidth_gbs()
    for name, spec in configs(args.smoke).items():
        torch.manual_seed(0)
        dense = build(spec)
        dense_bytes = sum(p.numel() * 4 for p in dense.parameters())
        pruned = compress(copy.deepcopy(dense), spec["share"]).eval()
        deployed = torchslim.deploy(pruned)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.safetensors"
            row = {"model": name, "compression": "prune 0.9" + (" + 4-bit shared" if spec["share"] else "")}
            row.update(file_figures(pruned, dense, path))
            row.update(memory_figures({k: v for k, v in spec.items()}, path, dense_bytes))
        row.update(speed_figures(dense, pruned, deployed, spec["input"], args.rounds, not args.no_compile))
        row["deploy_read_bytes"] = read_bytes(deployed)
        row["bandwidth_gbs"] = bw
        row["floor_ms"] = row["deploy_read_bytes"] / (bw * 1e9) * 1e3
        row["input"] = "batch %d x seq %d" % spec["input"]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs: check the script runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print_table(rows, ["model", "input", "layer_ratio", "file_ratio", "rss_ratio", "peak_ratio", "dense_ms",
                       "deploy_ms", "deploy_speedup", "pruned_eager_ms", "pruned_compiled_ms", "compiled_vs_eager",
                       "floor_ms"], title="models (targets: layer_ratio >= 15, Llama file_ratio >= 6, "
                                          "rss_ratio <= 0.25, Llama speedup >= 3, BERT >= 2, compiled_vs_eager >= 1)")
    write_json("models_smoke" if args.smoke and not args.out else "models", rows, path=args.out)


if __name__ == "__main__":
    main()
