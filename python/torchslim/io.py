"""Compact model files: ``save`` / ``load`` (safetensors + a JSON architecture header, no
pickle) and ``to_dense`` (plain ``nn.Linear`` everywhere, e.g. for ONNX export).

File layout
-----------
A standard safetensors file. Its ``__metadata__`` holds one key, ``"torchslim"``, whose
value is a JSON document::

    {"format": "torchslim", "version": 1,
     "codebooks": {"cb0": {"k": 16}, ...},
     "model": <node>}

where ``<node>`` is ``{"type": "Sequential", "children": [[name, <node>], ...]}`` or a layer
node (``Linear``, ``MaskedSparseLinear``, ``CodebookLinear``, ``BatchNorm1d`` or one of the
whitelisted activations / ``Dropout`` / ``Flatten`` / ``Identity``). Layer tensors are named
``"<module path>/<field>"``. Storage per layer:

* ``Linear``: ``weight`` [out, in] and ``bias`` [out] as they are.
* ``MaskedSparseLinear``: the kept weights as one packed ``values`` vector [nnz] (row-major
  order) plus two integer streams: ``rows`` (kept count per output row) and ``cols`` (the
  column gaps inside each row: ``col - previous_col - 1``, the first column of a row taken
  relative to -1). Masked-out weights are not stored (they do not affect the output).
* ``CodebookLinear``: the codebook (stored once in ``codebook/<key>`` and shared by every
  layer that used the same ``Parameter``) and the cluster indices, either ``dense`` (4-bit
  packed when ``k <= 16``, else one byte each) or, when ``zero_pinned`` (index 0 is the
  pruned weight 0.0), ``sparse``: ``rows`` / ``cols`` streams as above plus the indices of the
  kept positions only.

Integer streams are LEB128 varints (one byte for gaps < 128), each optionally
entropy-coded (zlib or raw LZMA2), which is the role Huffman coding plays in Deep
Compression; ``codec="auto"`` keeps the smallest. All streams are concatenated in one uint8
tensor, ``streams``; a layer names its streams as ``{"o": offset, "z": stored bytes,
"c": codec, "n": decoded bytes}``.

``load`` validates every field against the tensors actually present before allocating:
bad JSON, unknown layer types, wrong dtypes or sizes, out-of-range indices, streams that
decode to the wrong length and declared shapes too large for the file all raise a
``ValueError`` naming the layer and the field.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
import json
import lzma
import math
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.nn import MaskedSparseLinear
import torchslim.nn as _tsnn

FORMAT = "torchslim"
VERSION = 1
META_KEY = "torchslim"
CODECS = ("none", "zlib", "lzma")

# Raw LZMA2: the decoder's dictionary size is ours, never the file's.
_LZMA_DICT = 1 << 20
_LZMA_DECODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": _LZMA_DICT}]
_LZMA_ENCODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": _LZMA_DICT}]

_MAX_HEADER_BYTES = 16 << 20
_MAX_FEATURES = 1 << 31
_MAX_DEPTH = 64
_MAX_NODES = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,128}$")

_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _codebook_cls():
    # Looked up at call time so the module attribute is whatever torchslim.nn provides.
    return _tsnn.CodebookLinear


# --------------------------------------------------------------------------------------
# to_dense
# --------------------------------------------------------------------------------------

def _is_compressed_linear(module: nn.Module) -> bool:
    return isinstance(module, (MaskedSparseLinear, _codebook_cls()))


def _dense_linear(module: nn.Module) -> nn.Linear:
    if hasattr(module, "to_dense"):
        linear = module.to_dense()
    else:  # pragma: no cover - every compressed layer in the contract has to_dense
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
    linear.train(module.training)
    return linear


def to_dense(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``MaskedSparseLinear`` / ``CodebookLinear`` replaced
    by a plain ``nn.Linear`` computing the same function (masked weights are zero, codebook
    indices decoded). The input model is not modified. Useful for ONNX / TorchScript export
    and as the dense baseline of a compressed model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_dense expects an nn.Module, got {type(model).__name__}")
    if _is_compressed_linear(model):
        return _dense_linear(model)
    out = copy.deepcopy(model)
    _replace_in_place(out)
    return out


def _replace_in_place(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if _is_compressed_linear(child):
            setattr(module, name, _dense_linear(child))
        else:
            _replace_in_place(child)


def to_sparse(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` prepared for fast inference by the sparse kernels:

    - every ``CodebookLinear`` becomes a ``MaskedSparseLinear`` holding the decoded weights,
      masked where the index is the pinned zero (``zero_pinned`` layers; other layers keep
      every weight): same function, run by the sparse kernels instead of the codebook kernel;
    - every ``nn.Sequential`` holding a ``MaskedSparseLinear`` becomes a
      ``torchslim.nn.SparseSequential`` (same children and state_dict keys), which runs its
      sparse layers and the ReLUs between them as one fused call when no gradient is needed.

    Store the compact model with ``save``; after ``load`` (or after pruning) call
    ``to_sparse`` for deployment."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse expects an nn.Module, got {type(model).__name__}")
    cb_cls = _codebook_cls()

    def convert(layer):
        dense = layer.to_dense()
        idx = layer.indices
        if idx.shape[1] != layer.in_features:
            from torchslim.ops._reference import unpack_int4
            idx = unpack_int4(idx, layer.in_features)
        keep = idx != 0 if getattr(layer, "zero_pinned", False) else torch.ones_like(idx, dtype=torch.bool)
        sparse = MaskedSparseLinear.from_dense(dense, mask=keep.to(dense.weight.device))
        sparse.train(layer.training)
        return sparse

    if isinstance(model, cb_cls):
        return convert(model)
    from torchslim.nn import SparseSequential

    def fused(seq):
        if type(seq) is nn.Sequential and any(isinstance(m, MaskedSparseLinear) for m in seq.children()):
            out = SparseSequential(OrderedDict(seq._modules.items()))
            out.train(seq.training)
            return out
        return seq

    def walk(module):
        for name, child in list(module.named_children()):
            if isinstance(child, cb_cls):
                setattr(module, name, convert(child))
            else:
                walk(child)
                setattr(module, name, fused(child))
    out = copy.deepcopy(model)
    walk(out)
    return fused(out)


# --------------------------------------------------------------------------------------
# integer streams: varint + optional entropy coding
# --------------------------------------------------------------------------------------

def _varint_encode(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        nbytes += (v >= np.uint64(1 << (7 * k))).astype(np.int64)
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        chunk = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = chunk | more
    return out.tobytes()


def _varint_decode(data: bytes, count: int, what: str, max_bytes: int = 5) -> np.ndarray:
    """Decode exactly ``count`` varints (each at most ``max_bytes`` long) from ``data``."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (count == 0 and b.size):
        raise ValueError(f"{what}: varint stream holds {ends.size} values in {b.size} bytes, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > max_bytes:
        raise ValueError(f"{what}: varint longer than {max_bytes} bytes")
    values = np.zeros(count, dtype=np.int64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        values[sel] |= (b[starts[sel] + k].astype(np.int64) & 0x7F) << (7 * k)
    return values


def _compress(raw: bytes, codec: str) -> tuple[str, bytes]:
    if codec == "none":
        return "none", raw
    if codec == "zlib":
        return "zlib", zlib.compress(raw, 9)
    if codec == "lzma":
        return "lzma", lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_ENCODE_FILTERS)
    if codec == "auto":
        best = ("none", raw)
        for c in ("zlib", "lzma"):
            cand = _compress(raw, c)
            if len(cand[1]) < len(best[1]):
                best = cand
        return best
    raise ValueError(f"codec must be one of 'auto', 'none', 'zlib', 'lzma', got {codec!r}")


def _decompress(data: bytes, codec: str, n: int, what: str) -> bytes:
    """Decode exactly n bytes; never produces more than n (no decompression bombs)."""
    try:
        if codec == "none":
            out, done = data, True
        elif codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, n) if n else d.decompress(data, 1)
            done = d.eof and not d.unconsumed_tail and not d.unused_data
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_DECODE_FILTERS)
            out = d.decompress(data, max_length=n) if n else d.decompress(data, max_length=1)
            if not d.eof and len(out) == n:
                out += d.decompress(b"", max_length=1)
            done = d.eof and not d.unused_data
        else:
            raise ValueError(f"{what}: unknown codec {codec!r} (expected one of {CODECS})")
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise ValueError(f"{what}: corrupt {codec} stream ({exc})") from None
    if len(out) != n or not done:
        raise ValueError(f"{what}: {codec} stream decodes to a different length than the declared {n} bytes")
    return out


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------

class _Writer:
    def __init__(self, codec: str):
        self.codec = codec
        self.tensors: dict[str, torch.Tensor] = {}
        self.codebooks: dict[int, str] = {}      # id(Parameter) -> key
        self.codebook_meta: dict[str, dict] = {}

        self.streams: list[tuple[dict, bytes]] = []

    def tensor(self, name: str, t: torch.Tensor) -> str:
        self.tensors[name] = t.detach().to("cpu").contiguous().clone()
        return name

    def encode(self, raw: bytes) -> tuple[dict, bytes]:
        """An integer stream, entropy-coded; not yet part of the file (see ``commit``)."""
        codec, data = _compress(raw, self.codec)
        return {"o": 0, "z": len(data), "c": codec, "n": len(raw)}, data

    def commit(self, *streams: tuple[dict, bytes]) -> None:
        self.streams.extend(streams)

    def finish(self) -> None:
        """Lay every committed stream out in one uint8 tensor, ``streams``."""
        blob = bytearray()
        for spec, data in self.streams:
            spec["o"] = len(blob)
            blob += data
        if blob:
            self.tensors["streams"] = torch.frombuffer(blob, dtype=torch.uint8).clone()


def _float_tensor_check(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {t.dtype} (expected a floating point tensor)")


def _sparse_streams(w: _Writer, keep: torch.Tensor):
    """rows/cols streams (uncommitted) for a boolean [out, in] keep-mask, and the flat kept
    positions."""
    keep_np = keep.detach().to("cpu").numpy().astype(bool)
    rows, cols = np.nonzero(keep_np)  # row-major order
    counts = keep_np.sum(axis=1).astype(np.int64)
    gaps = np.empty_like(cols, dtype=np.int64)
    if cols.size:
        prev = np.empty_like(cols, dtype=np.int64)
        prev[0] = -1
        prev[1:] = cols[:-1]
        first = np.ones(cols.size, dtype=bool)
        first[1:] = rows[1:] != rows[:-1]
        prev[first] = -1
        gaps = cols.astype(np.int64) - prev - 1
    return (w.encode(_varint_encode(counts)), w.encode(_varint_encode(gaps)), rows * keep_np.shape[1] + cols)


def _nibble_pack_flat(codes: np.ndarray) -> bytes:
    c = codes.astype(np.uint8).reshape(-1)
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, dtype=np.uint8)])
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8).tobytes()


def _encode(module: nn.Module, path: str, w: _Writer, depth: int) -> dict:
    if depth > _MAX_DEPTH:
        raise ValueError(f"model nesting deeper than {_MAX_DEPTH} levels")
    prefix = path or "root"
    cb_cls = _codebook_cls()
    if isinstance(module, nn.Sequential):
        children = []
        for name, child in module.named_children():
            children.append([name, _encode(child, f"{path}.{name}" if path else name, w, depth + 1)])
        return {"type": "Sequential", "children": children}
    if type(module) is nn.Linear:
        _float_tensor_check(module.weight, f"{prefix}.weight")
        node = {"type": "Linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
        w.tensor(f"{prefix}/weight", module.weight)
        if module.bias is not None:
            w.tensor(f"{prefix}/bias", module.bias)
        return node
    if isinstance(module, MaskedSparseLinear):
        _float_tensor_check(module.weight, f"{prefix}.weight")
        mask = module.mask.to("cpu").bool()
        rows, cols, flat = _sparse_streams(w, mask)
        w.commit(rows, cols)
        values = module.weight.detach().to("cpu").reshape(-1)[torch.from_numpy(flat).long()]
        w.tensor(f"{prefix}/values", values)
        node = {"type": "MaskedSparseLinear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None, "nnz": int(flat.size), "rows": rows[0], "cols": cols[0]}
        if module.bias is not None:
            w.tensor(f"{prefix}/bias", module.bias)
        return node
    if isinstance(module, cb_cls):
        codebook = module.codebook
        _float_tensor_check(codebook, f"{prefix}.codebook")
        k = int(codebook.numel())
        in_f, out_f = int(module.in_features), int(module.out_features)
        key = w.codebooks.get(id(codebook))
        if key is None:
            key = f"cb{len(w.codebooks)}"
            w.codebooks[id(codebook)] = key
            w.codebook_meta[key] = {"k": k}
            w.tensor(f"codebook/{key}", codebook.reshape(-1))
        idx = module.indices.detach().to("cpu")
        if idx.dim() == 2 and idx.shape[1] != in_f:
            from torchslim.ops._reference import unpack_int4
            idx = unpack_int4(idx, in_f)
        idx_np = idx.numpy().astype(np.uint8)
        zero_pinned = bool(getattr(module, "zero_pinned", False))
        node = {"type": "CodebookLinear", "in": in_f, "out": out_f, "bias": module.bias is not None,
                "k": k, "zero_pinned": zero_pinned, "codebook": key}
        if k <= 16:
            from torchslim.ops._reference import pack_int4
            dense_raw = pack_int4(torch.from_numpy(idx_np)).numpy().tobytes() if out_f else b""
        else:
            dense_raw = idx_np.tobytes()
        dense_codes = w.encode(dense_raw)
        choice = {"enc": "dense", "codes": dense_codes}
        best = dense_codes[0]["z"]
        if zero_pinned:
            # The sparse layout: positions of the non-zero indices (index 0 is the pruned
            # weight) and their indices, one byte each or 4-bit packed, whichever is smaller.
            rows, cols, flat = _sparse_streams(w, torch.from_numpy(idx_np != 0))
            kept = idx_np.reshape(-1)[flat].astype(np.uint8)
            codes, packed = w.encode(kept.tobytes()), False
            if k <= 16:
                nib = w.encode(_nibble_pack_flat(kept))
                if nib[0]["z"] < codes[0]["z"]:
                    codes, packed = nib, True
            size = rows[0]["z"] + cols[0]["z"] + codes[0]["z"] + 60  # + its header entries
            if size < best:
                choice = {"enc": "sparse", "nnz": int(flat.size), "rows": rows, "cols": cols, "codes": codes,
                          "packed": packed}
        for key, value in choice.items():
            if isinstance(value, tuple):
                w.commit(value)
                value = value[0]
            node[key] = value
        if module.bias is not None:
            w.tensor(f"{prefix}/bias", module.bias)
        return node
    if type(module) is nn.BatchNorm1d:
        node = {"type": "BatchNorm1d", "num_features": module.num_features, "eps": float(module.eps),
                "momentum": None if module.momentum is None else float(module.momentum),
                "affine": bool(module.affine), "track": bool(module.track_running_stats)}
        if module.affine:
            w.tensor(f"{prefix}/weight", module.weight)
            w.tensor(f"{prefix}/bias", module.bias)
        if module.track_running_stats:
            w.tensor(f"{prefix}/running_mean", module.running_mean)
            w.tensor(f"{prefix}/running_var", module.running_var)
            w.tensor(f"{prefix}/num_batches_tracked", module.num_batches_tracked.reshape(1))
        return node
    for name, spec in _SIMPLE.items():
        if type(module) is spec[0]:
            return {"type": name, **{a: _simple_attr(module, a) for a in spec[1]}}
    raise TypeError(
        f"torchslim.save: cannot store module {prefix!r} of type {type(module).__name__}; supported: nn.Sequential of "
        f"Linear, MaskedSparseLinear, CodebookLinear, BatchNorm1d, {', '.join(_SIMPLE)} (for other models use "
        f"torch.save on the state_dict or torchslim.to_dense + ONNX export)")


def _simple_attr(module, attr):
    value = getattr(module, attr)
    return float(value) if isinstance(value, float) else value


# name -> (class, attributes stored, validators per attribute)
def _v_float(lo=None, hi=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    return check


def _v_int(lo, hi):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_SIMPLE = {
    "ReLU": (nn.ReLU, (), {}),
    "ReLU6": (nn.ReLU6, (), {}),
    "Tanh": (nn.Tanh, (), {}),
    "Sigmoid": (nn.Sigmoid, (), {}),
    "SiLU": (nn.SiLU, (), {}),
    "GELU": (nn.GELU, ("approximate",), {"approximate": lambda v: v in ("none", "tanh")}),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",), {"negative_slope": _v_float(-1e6, 1e6)}),
    "ELU": (nn.ELU, ("alpha",), {"alpha": _v_float(-1e6, 1e6)}),
    "Softmax": (nn.Softmax, ("dim",), {"dim": lambda v: v is None or _v_int(-8, 8)(v)}),
    "LogSoftmax": (nn.LogSoftmax, ("dim",), {"dim": lambda v: v is None or _v_int(-8, 8)(v)}),
    "Dropout": (nn.Dropout, ("p",), {"p": _v_float(0.0, 1.0)}),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim"), {"start_dim": _v_int(-8, 8), "end_dim": _v_int(-8, 8)}),
    "Identity": (nn.Identity, (), {}),
}


def save(model: nn.Module, path, *, codec: str = "auto") -> int:
    """Write ``model`` to ``path`` in the compact torchslim format; returns the file size.

    ``model``: an ``nn.Sequential`` (nested allowed) or a single layer built from
    ``nn.Linear``, ``MaskedSparseLinear``, ``CodebookLinear``, ``BatchNorm1d``, ``Dropout``,
    ``Flatten``, ``Identity`` and the activations ReLU, ReLU6, Tanh, Sigmoid, SiLU, GELU,
    LeakyReLU, ELU, Softmax, LogSoftmax. ``codec``: entropy coding of the integer streams,
    ``"auto"`` (smallest of none / zlib / lzma, per stream), ``"none"``, ``"zlib"`` or
    ``"lzma"``. Layers sharing one codebook ``Parameter`` store it once.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if codec not in ("auto", *CODECS):
        raise ValueError(f"codec must be one of 'auto', 'none', 'zlib', 'lzma', got {codec!r}")
    w = _Writer(codec)
    with torch.no_grad():
        root = _encode(model, "", w, 0)
    w.finish()
    header = {"format": FORMAT, "version": VERSION, "codebooks": w.codebook_meta, "model": root}
    path = Path(path)
    save_file(w.tensors, str(path), metadata={META_KEY: json.dumps(header, separators=(",", ":"))})
    return path.stat().st_size


def save_to_bytes(model: nn.Module, *, codec: str = "auto") -> bytes:
    """The bytes ``save`` would write."""
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save(model, tmp, codec=codec)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def saved_size(model: nn.Module, *, codec: str = "auto") -> int:
    """Size in bytes of the file ``save(model, ...)`` writes (measured by writing it)."""
    return len(save_to_bytes(model, codec=codec))


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "U8": (torch.uint8, 1),
}


def _parse_safetensors(data: bytes, src: str) -> tuple[dict, dict]:
    """Validate the safetensors container; return (metadata, {name: tensor}) without copying
    more than the file holds."""
    if len(data) < 8:
        raise ValueError(f"{src}: not a torchslim file (only {len(data)} bytes)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > _MAX_HEADER_BYTES:
        raise ValueError(f"{src}: truncated or corrupt file (header declares {hlen} bytes, file holds {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{src}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{src}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{src}: not a torchslim file (no string metadata)")
    body = memoryview(data)[8 + hlen:]
    tensors = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{src}: corrupt safetensors entry for {name!r}")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{src}: tensor {name!r} has unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 40) for s in shape)):
            raise ValueError(f"{src}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= len(body)):
            raise ValueError(f"{src}: tensor {name!r} lies outside the file (offsets {offs!r}, {len(body)} data bytes): truncated?")
        torch_dtype, itemsize = _ST_DTYPES[dt]
        numel = math.prod(shape)
        if numel * itemsize != offs[1] - offs[0]:
            raise ValueError(f"{src}: tensor {name!r} declares shape {shape} ({numel * itemsize} bytes) but holds "
                             f"{offs[1] - offs[0]} bytes")
        spans.append((offs[0], offs[1]))
        buf = bytes(body[offs[0]:offs[1]])
        t = torch.frombuffer(bytearray(buf), dtype=torch_dtype) if buf else torch.zeros(0, dtype=torch_dtype)
        tensors[name] = t.reshape(shape)
    spans.sort()
    pos = 0
    for a, b in spans:
        if a != pos:
            raise ValueError(f"{src}: corrupt safetensors data layout (overlapping or gapped tensors)")
        pos = b
    if pos != len(body):
        raise ValueError(f"{src}: {len(body) - pos} trailing bytes after the tensors: corrupt file")
    return meta, tensors


class _Reader:
    def __init__(self, tensors: dict, src: str, max_numel: int):
        self.tensors = tensors
        self.src = src
        self.max_numel = max_numel
        self.numel = 0
        self.nodes = 0
        self.used: set[str] = set()
        self.codebooks: dict[str, nn.Parameter] = {}
        self.spans: list[tuple[int, int]] = []

    def err(self, where: str, msg: str) -> ValueError:
        return ValueError(f"{self.src}: {where or 'model'}: {msg}")

    def charge(self, where: str, n: int) -> None:
        self.numel += n
        if self.numel > self.max_numel:
            raise self.err(where, f"declared shapes add up to more than {self.max_numel} elements (the limit for a "
                                  f"file of this size; pass max_numel= to load a larger model)")

    def tensor(self, where: str, name: str, shape: tuple, kind: str = "float") -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise self.err(where, f"tensor {name!r} missing")
        if kind == "float" and t.dtype not in _FLOAT_DTYPES:
            raise self.err(where, f"tensor {name!r} has dtype {t.dtype}, expected floating point")
        if kind == "int64" and t.dtype != torch.int64:
            raise self.err(where, f"tensor {name!r} has dtype {t.dtype}, expected int64")
        if tuple(t.shape) != tuple(shape):
            raise self.err(where, f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if kind == "float" and not bool(torch.isfinite(t).all()):
            raise self.err(where, f"tensor {name!r} holds non-finite values")
        self.used.add(name)
        return t

    def stream(self, where: str, spec, field: str, exact_len: int | None = None,
               min_len: int = 0, max_len: int | None = None) -> bytes:
        what = f"{self.src}: {where or 'root'}.{field}"
        if not isinstance(spec, dict) or set(spec) != {"o", "z", "c", "n"}:
            raise ValueError(f"{what}: expected a stream spec {{o, z, c, n}}, got {str(spec)[:100]!r}")
        off, size, codec, n = spec["o"], spec["z"], spec["c"], spec["n"]
        if not all(_is_int(v) and v >= 0 for v in (off, size, n)) or codec not in CODECS:
            raise ValueError(f"{what}: invalid stream spec {str(spec)[:100]!r}")
        if exact_len is not None and n != exact_len:
            raise ValueError(f"{what}: stream declares {n} bytes, expected {exact_len}")
        if n < min_len or (max_len is not None and n > max_len):
            raise ValueError(f"{what}: stream declares {n} bytes, expected between {min_len} and {max_len}")
        blob = self.tensors.get("streams")
        if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"{what}: the file has no uint8 'streams' tensor")
        if off + size > blob.numel():
            raise ValueError(f"{what}: stream [{off}, {off + size}) lies outside the {blob.numel()}-byte streams tensor")
        self.used.add("streams")
        self.spans.append((off, off + size))
        return _decompress(blob[off:off + size].numpy().tobytes(), codec, n, what)

    def check_streams_cover(self) -> None:
        blob = self.tensors.get("streams")
        pos = 0
        for a, b in sorted(self.spans):
            if a != pos:
                raise ValueError(f"{self.src}: streams overlap or leave gaps in the streams tensor")
            pos = b
        if blob is not None and pos != blob.numel():
            raise ValueError(f"{self.src}: {blob.numel() - pos} bytes of the streams tensor belong to no layer")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(node: dict, where: str, reader: _Reader, keys: dict) -> None:
    """Check node holds exactly the keys given (name -> validator)."""
    if set(node) != set(keys) | {"type"}:
        raise reader.err(where, f"{node.get('type')} node has fields {sorted(node)}, expected {sorted(set(keys) | {'type'})}")
    for key, ok in keys.items():
        if not ok(node[key]):
            raise reader.err(where, f"invalid {key}={node[key]!r}")


_feat = _v_int(1, _MAX_FEATURES)
_bool = lambda v: isinstance(v, bool)  # noqa: E731


def _decode_sparse(reader: _Reader, where: str, node: dict, in_f: int, out_f: int, nnz: int):
    """rows/cols streams -> (row, col) int64 arrays of length nnz, validated."""
    rows_raw = reader.stream(where, node["rows"], "rows", min_len=out_f, max_len=5 * out_f)
    counts = _varint_decode(rows_raw, out_f, f"{reader.src}: {where}.rows")
    if out_f and (int(counts.max()) > in_f):
        raise reader.err(where, f"a row declares more than in_features={in_f} kept entries")
    if int(counts.sum()) != nnz:
        raise reader.err(where, f"row counts add up to {int(counts.sum())}, expected nnz={nnz}")
    cols_raw = reader.stream(where, node["cols"], "cols", min_len=nnz, max_len=5 * nnz)
    gaps = _varint_decode(cols_raw, nnz, f"{reader.src}: {where}.cols")
    if nnz and int(gaps.max()) >= in_f:
        raise reader.err(where, "column index out of range")
    steps = gaps + 1
    csum = np.cumsum(steps)
    row_ptr = np.concatenate([[0], np.cumsum(counts)])
    base = np.concatenate([[0], csum])[row_ptr[:-1]]
    cols = csum - np.repeat(base, counts) - 1
    if nnz and int(cols.max()) >= in_f:
        raise reader.err(where, f"column index out of range (max {int(cols.max())} >= in_features={in_f})")
    rows = np.repeat(np.arange(out_f, dtype=np.int64), counts)
    return rows, cols


def _unpack_nibbles(raw: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    both = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(-1)
    return both[:count]


def _decode(node, where: str, reader: _Reader, depth: int, meta: dict) -> nn.Module:
    reader.nodes += 1
    if depth > _MAX_DEPTH or reader.nodes > _MAX_NODES:
        raise reader.err(where, "model nesting too deep or too many modules")
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise reader.err(where, f"expected a module node with a 'type', got {type(node).__name__}")
    kind = node["type"]
    prefix = where or "root"
    if kind == "Sequential":
        _need(node, where, reader, {"children": lambda v: isinstance(v, list)})
        seq = nn.Sequential()
        for item in node["children"]:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not _NAME_RE.match(item[0]) or item[0] in seq._modules):
                raise reader.err(where, f"invalid or duplicate child entry {str(item)[:80]!r}")
            name = item[0]
            seq.add_module(name, _decode(item[1], f"{where}.{name}" if where else name, reader, depth + 1, meta))
        return seq
    if kind == "Linear":
        _need(node, where, reader, {"in": _feat, "out": _feat, "bias": _bool})
        in_f, out_f = node["in"], node["out"]
        reader.charge(where, in_f * out_f)
        weight = reader.tensor(where, f"{prefix}/weight", (out_f, in_f))
        layer = nn.Linear(in_f, out_f, bias=node["bias"], device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.clone())
        if node["bias"]:
            layer.bias = nn.Parameter(reader.tensor(where, f"{prefix}/bias", (out_f,)).to(weight.dtype).clone())
        return layer
    if kind == "MaskedSparseLinear":
        _need(node, where, reader, {"in": _feat, "out": _feat, "bias": _bool, "nnz": _v_int(0, 1 << 62),
                                    "rows": lambda v: True, "cols": lambda v: True})
        in_f, out_f, nnz = node["in"], node["out"], node["nnz"]
        if nnz > in_f * out_f:
            raise reader.err(where, f"nnz={nnz} exceeds in_features*out_features={in_f * out_f}")
        values = reader.tensor(where, f"{prefix}/values", (nnz,))
        reader.charge(where, in_f * out_f)
        rows, cols = _decode_sparse(reader, where, node, in_f, out_f, nnz)
        bias = reader.tensor(where, f"{prefix}/bias", (out_f,)) if node["bias"] else None
        layer = MaskedSparseLinear(in_f, out_f, bias=node["bias"], device="meta", dtype=values.dtype)
        weight = torch.zeros(out_f, in_f, dtype=values.dtype)
        mask = torch.zeros(out_f, in_f, dtype=torch.bool)
        r, c = torch.from_numpy(rows), torch.from_numpy(cols)
        weight[r, c] = values
        mask[r, c] = True
        layer.weight = nn.Parameter(weight)
        layer.mask = mask
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(values.dtype).clone())
        return layer
    if kind == "CodebookLinear":
        common = {"in": _feat, "out": _feat, "bias": _bool, "k": _v_int(1, 256), "zero_pinned": _bool,
                  "codebook": lambda v: isinstance(v, str), "enc": lambda v: v in ("dense", "sparse"),
                  "codes": lambda v: True}
        if node.get("enc") == "sparse":
            common.update({"nnz": _v_int(0, 1 << 62), "rows": lambda v: True, "cols": lambda v: True, "packed": _bool})
        _need(node, where, reader, common)
        in_f, out_f, k, key = node["in"], node["out"], node["k"], node["codebook"]
        cb_meta = meta.get(key)
        if not isinstance(cb_meta, dict) or cb_meta.get("k") != k:
            raise reader.err(where, f"codebook {key!r} is not declared with k={k}")
        reader.charge(where, in_f * out_f)
        if key not in reader.codebooks:
            cb = reader.tensor(where, f"codebook/{key}", (k,))
            reader.codebooks[key] = nn.Parameter(cb.clone())
        codebook = reader.codebooks[key]
        if node["enc"] == "dense":
            row_bytes = (in_f + 1) // 2 if k <= 16 else in_f
            raw = reader.stream(where, node["codes"], "codes", exact_len=row_bytes * out_f)
            if k <= 16:
                b = np.frombuffer(raw, dtype=np.uint8).reshape(out_f, row_bytes)
                idx = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(out_f, 2 * row_bytes)[:, :in_f]
            else:
                idx = np.frombuffer(raw, dtype=np.uint8).reshape(out_f, in_f)
        else:
            if not node["zero_pinned"]:
                raise reader.err(where, "sparse index layout requires zero_pinned")
            nnz = node["nnz"]
            if nnz > in_f * out_f:
                raise reader.err(where, f"nnz={nnz} exceeds in_features*out_features={in_f * out_f}")
            rows, cols = _decode_sparse(reader, where, node, in_f, out_f, nnz)
            packed = node["packed"]
            if packed and k > 16:
                raise reader.err(where, "4-bit packed codes need k <= 16")
            raw = reader.stream(where, node["codes"], "codes", exact_len=(nnz + 1) // 2 if packed else nnz)
            kept = _unpack_nibbles(raw, nnz) if packed else np.frombuffer(raw, dtype=np.uint8)
            if nnz and int(kept.min()) == 0:
                raise reader.err(where, "sparse layout stores index 0 (the pruned code) at a kept position")
            idx = np.zeros((out_f, in_f), dtype=np.uint8)
            idx[rows, cols] = kept
        if idx.size and int(idx.max()) >= k:
            raise reader.err(where, f"cluster index {int(idx.max())} out of range for k={k}")
        bias = reader.tensor(where, f"{prefix}/bias", (out_f,)) if node["bias"] else None
        return _build_codebook_linear(in_f, out_f, k, node["zero_pinned"], codebook,
                                      torch.from_numpy(np.array(idx, dtype=np.uint8, copy=True)), bias)
    if kind == "BatchNorm1d":
        _need(node, where, reader, {"num_features": _feat, "eps": _v_float(0.0, 1.0),
                                    "momentum": lambda v: v is None or _v_float(0.0, 1.0)(v),
                                    "affine": _bool, "track": _bool})
        nf = node["num_features"]
        reader.charge(where, nf)
        bn = nn.BatchNorm1d(nf, eps=node["eps"], momentum=node["momentum"], affine=node["affine"],
                            track_running_stats=node["track"])
        with torch.no_grad():
            if node["affine"]:
                bn.weight.copy_(reader.tensor(where, f"{prefix}/weight", (nf,)))
                bn.bias.copy_(reader.tensor(where, f"{prefix}/bias", (nf,)))
            if node["track"]:
                bn.running_mean.copy_(reader.tensor(where, f"{prefix}/running_mean", (nf,)))
                var = reader.tensor(where, f"{prefix}/running_var", (nf,))
                if bool((var < 0).any()):
                    raise reader.err(where, "negative running_var")
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(reader.tensor(where, f"{prefix}/num_batches_tracked", (1,), "int64")[0])
        return bn
    if kind in _SIMPLE:
        cls, attrs, checks = _SIMPLE[kind]
        _need(node, where, reader, {a: checks[a] for a in attrs})
        return cls(**{a: node[a] for a in attrs})
    raise reader.err(where, f"unknown layer type {kind[:64]!r}")


def _build_codebook_linear(in_f, out_f, k, zero_pinned, codebook, idx, bias):
    cls = _codebook_cls()
    layer = cls(in_f, out_f, num_clusters=k, bias=bias is not None, zero_pinned=zero_pinned, dtype=codebook.dtype)
    if k <= 16:
        from torchslim.ops._reference import pack_int4
        idx = pack_int4(idx)
    if tuple(layer.indices.shape) != tuple(idx.shape):
        layer.indices = idx.to(layer.indices.dtype)
    else:
        layer.indices.copy_(idx)
    layer.codebook = codebook  # the same Parameter object for every layer sharing it
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)
    return layer


def load(path, *, device=None, max_numel: int | None = None) -> nn.Module:
    """Rebuild the model written by ``save``; its outputs equal the saved model's.

    The model comes back in eval mode, on ``device`` (default CPU). Every field is
    validated before anything is allocated; a truncated, corrupted or hostile file raises
    ``ValueError``. ``max_numel`` caps the total number of weight elements the file may
    declare (default: 1024 per byte of file, at least 2**22 and at most 2**28; a 95%-sparse
    4-bit model holds about 15 per byte).
    """
    src = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{src}: cannot read ({exc})") from None
    return _load_bytes(data, src, device=device, max_numel=max_numel)


def load_bytes(data: bytes, *, device=None, max_numel: int | None = None) -> nn.Module:
    """``load`` from the bytes of a file."""
    return _load_bytes(bytes(data), "<bytes>", device=device, max_numel=max_numel)


def _load_bytes(data: bytes, src: str, device=None, max_numel=None) -> nn.Module:
    if max_numel is None:
        max_numel = min(1 << 28, max(1 << 22, 1024 * len(data)))
    st_meta, tensors = _parse_safetensors(data, src)
    text = st_meta.get(META_KEY)
    if text is None:
        raise ValueError(f"{src}: not a torchslim file (no {META_KEY!r} metadata)")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{src}: corrupt architecture header ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{src}: not a torchslim file (format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{src}: unsupported torchslim file version {header.get('version')!r} (this reader: {VERSION})")
    if set(header) != {"format", "version", "codebooks", "model"} or not isinstance(header["codebooks"], dict):
        raise ValueError(f"{src}: corrupt architecture header (fields {sorted(header)})")
    reader = _Reader(tensors, src, max_numel)
    with torch.no_grad():
        model = _decode(header["model"], "", reader, 0, header["codebooks"])
    reader.check_streams_cover()
    unused = set(tensors) - reader.used
    if unused:
        raise ValueError(f"{src}: file holds tensors no layer uses: {sorted(unused)[:5]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if device is not None:
        model.to(device)
    return model
