"""Whole-model structured pruning: parameters, MACs and CPU latency before / after.

For a BP network (Sequential MLP) and transformers' BERT, Llama (grouped-query attention) and
GPT-2 (Conv1D) built from configs (random weights, no download), in one run:

- dense: the model as built;
- torchslim: ``prune_neurons(model, 0.5)`` (every FFN hidden dimension halved) then
  ``prune_heads(model, 0.25)`` (a quarter of the heads; Llama: of the key/value groups);
- torch-pruning (when ``import torch_pruning`` works): Torch-Pruning's MetaPruner asked for
  the same thing (L1 group importance, 50% of the FFN hidden channels, 25% of the heads,
  nothing else), its head-count attributes updated as its HF examples do.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) for one forward;
latency is torch.utils.benchmark's p20/p50/p80 of a forward under ``torch.inference_mode``.

    python benchmarks/bench_structured.py            # bench sizes (hidden 256, 4 layers, seq 128)
    python benchmarks/bench_structured.py --quick    # tiny sizes, a smoke run

Writes benchmarks/results/structured.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, time_ms, write_json  # noqa: E402

from torchslim.structured import StructuredPruningWarning, prune_heads, prune_neurons  # noqa: E402


def build(kind: str, quick: bool):
    """(model, example inputs as kwargs or tensor, description)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    h, layers, heads, seq, vocab = (64, 2, 4, 16, 256) if quick else (256, 4, 8, 128, 1000)
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(3, vocab, (1, seq))}
    if kind == "mlp":
        width = 128 if quick else 1024
        model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        return model.eval(), torch.randn(1 if quick else 64, 784), f"784-{width}-{width}-10"
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=4 * h, vocab_size=vocab, max_position_embeddings=seq)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval(), ids, f"h{h} L{layers} heads{heads} seq{seq}"
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=heads // 2, intermediate_size=(8 * h) // 3,
                                       vocab_size=vocab, max_position_embeddings=seq, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0, use_cache=False)
        return transformers.LlamaForCausalLM(cfg).eval(), ids, f"h{h} L{layers} heads{heads}/kv{heads // 2} seq{seq}"
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=h, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=seq,
                                      bos_token_id=1, eos_token_id=2, use_cache=False)
        return transformers.GPT2LMHeadModel(cfg).eval(), ids, f"h{h} L{layers} heads{heads} seq{seq}"
    raise ValueError(kind)


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def macs(model, inputs) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call(model, inputs)
    return counter.get_total_flops() // 2


def ours(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StructuredPruningWarning)
        small = prune_neurons(model, 0.5, example_inputs=inputs)
        if not isinstance(model, nn.Sequential):
            small = prune_heads(small, 0.25, example_inputs=inputs)
    return small


def run_torch_pruning(kind, model, inputs):
    """Torch-Pruning's MetaPruner on the same target: 50% FFN channels, 25% heads, nothing else."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ffn, num_heads, attn, ignored = [], {}, [], []
    for name, m in model.named_modules():
        if kind == "mlp" and isinstance(m, nn.Linear) and m.out_features != 10:
            ffn.append(m)
        if kind == "bert" and name.endswith("intermediate.dense") or kind == "llama" and name.endswith("mlp.gate_proj") \
                or kind == "gpt2" and name.endswith("mlp.c_fc"):
            ffn.append(m)
        if kind == "bert" and hasattr(m, "attention_head_size") and hasattr(m, "query"):
            for lin in (m.query, m.key, m.value):
                num_heads[lin] = m.num_attention_heads
            attn.append(m)
        if kind == "llama" and hasattr(m, "q_proj") and hasattr(m, "num_key_value_groups"):
            num_heads[m.q_proj] = m.config.num_attention_heads
            num_heads[m.k_proj] = num_heads[m.v_proj] = m.config.num_key_value_heads
            attn.append(m)
        if kind == "gpt2" and hasattr(m, "c_attn") and hasattr(m, "split_size"):
            num_heads[m.c_attn] = m.num_heads
            attn.append(m)
    for name, m in model.named_modules():  # the output layers keep their width
        if name.endswith(("lm_head", "classifier")) or (kind == "mlp" and isinstance(m, nn.Linear) and m.out_features == 10):
            ignored.append(m)
    out = (lambda o: o.sum()) if kind == "mlp" else \
        (lambda o: (o.logits if hasattr(o, "logits") else o.last_hidden_state).sum())
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.0,
        pruning_ratio_dict={m: 0.5 for m in ffn}, num_heads=num_heads, prune_num_heads=bool(num_heads),
        prune_head_dims=False, head_pruning_ratio=0.25 if num_heads else 0.0, ignored_layers=ignored,
        output_transform=out)
    pruner.step()
    for m in attn:  # what Torch-Pruning's HF examples do after pruning
        if kind == "bert":
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.num_attention_heads * m.attention_head_size
        elif kind == "llama":
            m.num_key_value_groups = pruner.num_heads[m.q_proj] // pruner.num_heads[m.k_proj]
        elif kind == "gpt2":
            m.num_heads = pruner.num_heads[m.c_attn]
            m.split_size = m.num_heads * m.head_dim
    return model


def _main_output(y):
    return y if isinstance(y, torch.Tensor) else (y.logits if hasattr(y, "logits") else y.last_hidden_state)


def measure(name, variant, model, inputs, dense_out, prune_s, min_run_time):
    with torch.inference_mode():
        y = _main_output(call(model, inputs))
    lat = time_ms(lambda: call(model, inputs), min_run_time=min_run_time)
    return {"model": name, "variant": variant, "params": sum(p.numel() for p in model.parameters()),
            "macs": macs(model, inputs), "p20_ms": lat["p20"], "p50_ms": lat["p50"], "p80_ms": lat["p80"],
            "prune_s": prune_s, "out_shape_ok": tuple(y.shape) == tuple(dense_out.shape)}


def torch_pruning_row(kind, name, args) -> dict:
    """Torch-Pruning runs in a child process (same seed, so the same weights): on some models
    its group search takes very long or crashes, which must not take the whole run down."""
    cmd = [sys.executable, __file__, "--torch-pruning-only", kind, "--threads", str(torch.get_num_threads())]
    cmd += ["--quick"] if args.quick else []
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tp_timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "variant": "torch-pruning", "error": f"no result within {args.tp_timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return {"model": name, "variant": "torch-pruning", "error": f"exit code {res.returncode}: {tail}"[:300]}
    row = json.loads(lines[-1])
    row["model"] = name
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, short timing (smoke run)")
    ap.add_argument("--models", default="mlp,bert,llama,gpt2")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/structured.json)")
    ap.add_argument("--tp-timeout", type=float, default=300, help="seconds Torch-Pruning may take per model")
    ap.add_argument("--torch-pruning-only", default=None, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own; 1 with --quick)")
    args = ap.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.torch_pruning_only:
        kind = args.torch_pruning_only
        model, inputs, _ = build(kind, args.quick)
        with torch.inference_mode():
            dense_out = _main_output(call(model, inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            pruned = run_torch_pruning(kind, model, inputs)
            row = measure(kind, "torch-pruning", pruned, inputs, dense_out, time.perf_counter() - t,
                          0.05 if args.quick else 0.5)
        print(json.dumps(row))
        return
    min_run_time = 0.05 if args.quick else 0.5
    rows = []
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except Exception:
        have_tp = False
    for kind in args.models.split(","):
        model, inputs, desc = build(kind, args.quick)
        with torch.inference_mode():
            dense_out = _main_output(call(model, inputs))
        name = f"{kind} ({desc})"
        rows.append(measure(name, "dense", model, inputs, dense_out, 0.0, min_run_time))
        t = time.perf_counter()
        small = ours(model, inputs)
        rows.append(measure(name, "torchslim", small, inputs, dense_out, time.perf_counter() - t, min_run_time))
        if have_tp:
            rows.append(torch_pruning_row(kind, name, args))
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        if "params" in r:
            d = dense[r["model"]]
            r["params_ratio"] = r["params"] / d["params"]
            r["macs_ratio"] = r["macs"] / d["macs"]
            r["speedup_p50"] = d["p50_ms"] / r["p50_ms"]
    print_table([r for r in rows if "params" in r], ["model", "variant", "params", "params_ratio", "macs", "macs_ratio",
                                                      "p50_ms", "speedup_p50", "prune_s"],
                title="structured pruning: 50% FFN neurons + 25% heads, CPU, inference_mode")
    for r in rows:
        if "error" in r:
            print(f"{r['model']} {r['variant']}: {r['error']}")
    write_json("structured", rows, path=args.json)


if __name__ == "__main__":
    main()
