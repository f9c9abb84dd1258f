"""Seeded mutation fuzz of the torchslim file format: every mutated file either raises
ValueError or loads as exactly the saved model (bitwise-equal outputs and tensors).

Layouts: a Sequential MLP (masked, codebook dense / sparse layouts, BatchNorm) with raw and
entropy-coded streams, a model loaded through a manifest into a skeleton (ties and a
non-persistent buffer), and a deployed model. Mutations: bit flips and byte overwrites
(anywhere, or inside the header), truncation, appended or inserted bytes, swapped chunks.

A larger run: ``PYTHONPATH=python python tests/test_io_fuzz.py --cases 5000 --seed 1``.
"""
from __future__ import annotations

import argparse
import struct
import sys

import numpy as np
import torch
from torch import nn

import torchslim
import torchslim.io as tio
from torchslim.nn import CodebookLinear, MaskedSparseLinear


def _masked(in_f, out_f, density, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    return MaskedSparseLinear.from_dense(lin, mask=torch.rand(out_f, in_f, generator=g) < density)


def _mlp():
    torch.manual_seed(11)
    pinned = CodebookLinear.from_dense(_masked(24, 16, 0.1, 3), num_clusters=8)
    plain = CodebookLinear.from_dense(nn.Linear(16, 12), num_clusters=16)
    bn = nn.BatchNorm1d(20)
    bn.running_mean.uniform_(-1, 1)
    return nn.Sequential(_masked(30, 20, 0.2, 1), bn, nn.ReLU(), nn.Linear(20, 24), pinned, nn.Tanh(), plain,
                         _masked(12, 5, 0.5, 2)).eval()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 10)
        self.ffn = nn.ModuleList([nn.Linear(10, 20), nn.Linear(20, 10)])
        self.head = nn.Linear(10, 16, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 10), persistent=False)

    def forward(self, ids):
        h = self.emb(ids) * self.scale
        return self.head(h + self.ffn[1](torch.relu(self.ffn[0](h))))


def _tied():
    torch.manual_seed(12)
    m = _Tied()
    m.ffn[0] = _masked(10, 20, 0.3, 4)
    m.ffn[1] = CodebookLinear.from_dense(_masked(20, 10, 0.4, 5), num_clusters=4)
    return m.eval()


def _layouts():
    """name -> (model, file bytes, input, skeleton factory or None)."""
    mlp, tied = _mlp(), _tied()
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    deployed = torchslim.deploy(mlp)
    return {
        "mlp-raw": (mlp, tio.save_to_bytes(mlp, codec="none"), x, None),
        "mlp-coded": (mlp, tio.save_to_bytes(mlp, codec="auto"), x, None),
        "manifest": (tied, tio.save_to_bytes(tied), ids, _skeleton),
        "deployed": (deployed, tio.save_to_bytes(deployed, codec="zlib"), x, None),
    }


def _skeleton():
    with torch.device("meta"):
        return _Tied()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    (hlen,) = struct.unpack("<Q", data[:8])
    kind = int(rng.integers(0, 7))
    if kind == 0:  # one bit anywhere
        pos = int(rng.integers(0, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # one bit inside the header (JSON, incl. the torchslim metadata)
        pos = int(rng.integers(0, 8 + hlen))
        b[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 2:  # a few random bytes overwritten
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    elif kind == 3:  # truncated
        del b[int(rng.integers(0, len(b))):]
    elif kind == 4:  # bytes appended or inserted
        pos = int(rng.integers(0, len(b) + 1))
        b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8))
    elif kind == 5:  # two chunks swapped
        n = int(rng.integers(1, 9))
        i, j = (int(v) for v in rng.integers(0, len(b) - n, 2))
        b[i:i + n], b[j:j + n] = bytes(b[j:j + n]), bytes(b[i:i + n])
    else:  # a digit in the header changed (dimension, offset, count)
        digits = [i for i in range(8, 8 + hlen) if 48 <= b[i] <= 57]
        pos = digits[int(rng.integers(0, len(digits)))]
        b[pos] = 48 + (b[pos] - 48 + int(rng.integers(1, 10))) % 10
    return bytes(b)


def _same(model, loaded, x) -> bool:
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    sa, sb = model.state_dict(), loaded.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def fuzz(cases: int, seed: int) -> dict:
    """Counts per outcome: refused (ValueError), exact (loaded as saved), wrong (loaded as
    another model: the failure this test exists for), crashed (any other exception)."""
    layouts = _layouts()
    names = sorted(layouts)
    rng = np.random.default_rng(seed)
    counts = {"refused": 0, "exact": 0, "wrong": 0, "crashed": 0}
    failures = []
    for case in range(cases):
        name = names[case % len(names)]
        model, data, x, skeleton = layouts[name]
        bad = _mutate(data, rng)
        try:
            loaded = tio.load_bytes(bad, model=None if skeleton is None else skeleton())
        except ValueError:
            counts["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001  (anything but ValueError is a bug)
            counts["crashed"] += 1
            failures.append((case, name, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            ok = _same(model, loaded, x)
        except Exception as exc:  # noqa: BLE001  (loaded, then failed in forward)
            ok = False
            failures.append((case, name, f"forward failed: {type(exc).__name__}: {exc}"))
        if ok:
            counts["exact"] += 1
        else:
            counts["wrong"] += 1
            failures.append((case, name, "loaded as a different model"))
    counts["failures"] = failures
    return counts


def test_layouts_load_intact():
    for name, (model, data, x, skeleton) in _layouts().items():
        loaded = tio.load_bytes(data, model=None if skeleton is None else skeleton())
        assert _same(model, loaded, x), name


def test_seeded_mutation_fuzz():
    result = fuzz(cases=320, seed=0)
    assert result["failures"] == [], result["failures"][:5]
    assert result["wrong"] == 0 and result["crashed"] == 0
    assert result["refused"] > 250  # the checksums refuse nearly every mutation


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    out = fuzz(args.cases, args.seed)
    for f in out["failures"][:20]:
        print("FAIL", *f)
    print({k: v for k, v in out.items() if k != "failures"})
    sys.exit(1 if out["failures"] else 0)
