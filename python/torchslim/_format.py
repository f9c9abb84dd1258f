"""Per-layer encode / decode of the torchslim file format (used by ``torchslim.io``).

One registry, ``LAYER_CODECS``, maps each torchslim layer type to its encoder (module ->
JSON node + tensors + integer streams) and its decoder (validated node -> module, in the
training form or, with ``deploy=True``, straight into the deployed form without building
a dense weight). The manifest of a file (module path -> node) and the Sequential
architecture header both use it.

Node fields common to every layer: ``type``, ``in``, ``out``, ``bias`` (bool), ``dtype``
(the layer's dtype) and ``from`` (``"Linear"`` or ``"Conv1D"``: the layer type it replaces
in a model skeleton). Layer tensors are named ``"__ts__/<module path>/<field>"``, integer
streams are slices of the one uint8 tensor ``"__ts__/streams"`` named by
``{"o": offset, "z": stored bytes, "c": codec, "n": decoded bytes}``.

- MaskedSparseLinear / DeployedSparseLinear: ``values`` [nnz] (row-major kept weights) and
  streams ``rows`` (kept count per row) and ``cols`` (column gaps in a row,
  ``col - previous_col - 1``), LEB128 varints, each optionally zlib/LZMA coded.
- DeployedDenseLinear: ``weight`` [out, in].
- CodebookLinear / DeployedCodebookLinear: the codebook (``"__ts__/codebook/<key>"``, stored
  once per Parameter object, so a global codebook is stored once) and the indices, ``dense``
  (the 4-bit packed or one-byte layout of the ``indices`` buffer) or, for zero_pinned layers,
  ``sparse`` (rows / cols streams of the non-zero indices plus those indices only).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from torchslim import _codec
from torchslim._layers import is_conv1d
from torchslim.nn.deployed import (DeployedCodebookLinear, DeployedDenseLinear, DeployedSparseCodebookLinear,
                                   DeployedSparseLinear, deployed_sparse)
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear
import torchslim.nn as _tsnn

PREFIX = "__ts__/"
STREAMS = PREFIX + "streams"
MAX_FEATURES = (1 << 31) - 1
MAX_DEPTH = 64
MAX_NODES = 100_000
NAME_RE = re.compile(r"[A-Za-z0-9_]{1,128}")

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
# Every dtype a plain tensor may have in a file (safetensors' set, as torch names them).
TENSOR_DTYPES = {**FLOAT_DTYPES, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
                 **{n: getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
                    if hasattr(torch, n)}}
DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}


def codebook_cls():
    # Looked up at call time so the module attribute is whatever torchslim.nn provides.
    return _tsnn.CodebookLinear


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_dtype(extent: int) -> torch.dtype:
    return torch.int16 if extent <= 32767 else torch.int32


# --------------------------------------------------------------------------------------
# validators
# --------------------------------------------------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def v_int(lo, hi):
    return lambda v: is_int(v) and lo <= v <= hi


def v_float(lo=None, hi=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    return check


v_feat = v_int(0, MAX_FEATURES)
v_bool = lambda v: isinstance(v, bool)  # noqa: E731
v_any = lambda v: True  # noqa: E731  (checked where used)
v_float_dtype = lambda v: v in FLOAT_DTYPES  # noqa: E731
v_from = lambda v: v in ("Linear", "Conv1D")  # noqa: E731


# --------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------

class Writer:
    def __init__(self, codec: str):
        self.codec = codec
        self.tensors: dict[str, torch.Tensor] = {}
        self.codebooks: dict[int, str] = {}      # id(codebook tensor) -> key
        self.codebook_meta: dict[str, dict] = {}
        self.streams: list[tuple[dict, bytes]] = []

    def tensor(self, name: str, t: torch.Tensor) -> str:
        if name in self.tensors:
            raise ValueError(f"torchslim.save: two tensors would be stored as {name!r}")
        with torch.inference_mode(False):
            self.tensors[name] = t.detach().to("cpu").contiguous().clone()
        return name

    def encode(self, raw: bytes) -> tuple[dict, bytes]:
        """An integer stream, entropy-coded; not yet part of the file (see ``commit``)."""
        codec, data = _codec.compress(raw, self.codec)
        return {"o": 0, "z": len(data), "c": codec, "n": len(raw)}, data

    def commit(self, *streams: tuple[dict, bytes]) -> None:
        self.streams.extend(streams)

    def finish(self) -> None:
        """Lay every committed stream out in one uint8 tensor."""
        blob = bytearray()
        for spec, data in self.streams:
            spec["o"] = len(blob)
            blob += data
        if blob:
            self.tensors[STREAMS] = torch.frombuffer(blob, dtype=torch.uint8).clone()


def _csr_streams(w: Writer, row_ptr: np.ndarray, cols: np.ndarray):
    """rows / cols streams (uncommitted) of a CSR structure (int arrays)."""
    counts = np.diff(row_ptr.astype(np.int64))
    gaps = cols.astype(np.int64) + 1
    if cols.size:
        prev = np.empty_like(gaps)
        prev[0] = 0
        prev[1:] = gaps[:-1]
        first = np.zeros(cols.size, dtype=bool)
        starts = row_ptr[:-1][counts > 0]
        first[starts] = True
        prev[first] = 0
        gaps = gaps - prev - 1
    return w.encode(_codec.varint_encode(counts)), w.encode(_codec.varint_encode(gaps))


def _mask_csr(keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_ptr, cols, flat positions) of a boolean [out, in] tensor, row-major."""
    keep_np = keep.detach().to("cpu").numpy().astype(bool)
    rows, cols = np.nonzero(keep_np)
    row_ptr = np.zeros(keep_np.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep_np.sum(axis=1), out=row_ptr[1:])
    return row_ptr, cols, rows * keep_np.shape[1] + cols


def _float_check(t: torch.Tensor, what: str) -> str:
    if t.dtype not in DTYPE_NAMES or DTYPE_NAMES[t.dtype] not in FLOAT_DTYPES:
        raise TypeError(f"torchslim.save: {what}: unsupported dtype {t.dtype} (expected a floating point tensor)")
    return DTYPE_NAMES[t.dtype]


def _common(module, kind: str, dtype: str) -> dict:
    came_from = "Conv1D" if (getattr(module, "from_conv1d", False) or getattr(module, "was_conv1d", False)) else "Linear"
    return {"type": kind, "in": int(module.in_features), "out": int(module.out_features),
            "bias": module.bias is not None, "dtype": dtype, "from": came_from}


def _enc_masked(module: MaskedSparseLinear, path: str, w: Writer) -> dict:
    dtype = _float_check(module.weight, f"{path or 'root'}.weight")
    row_ptr, cols, flat = _mask_csr(module.mask.bool())
    rows_s, cols_s = _csr_streams(w, row_ptr, cols)
    w.commit(rows_s, cols_s)
    w.tensor(f"{PREFIX}{path}/values", module.weight.detach().to("cpu").reshape(-1)[torch.from_numpy(flat)])
    if module.bias is not None:
        w.tensor(f"{PREFIX}{path}/bias", module.bias)
    return {**_common(module, "MaskedSparseLinear", dtype), "nnz": int(flat.size), "rows": rows_s[0], "cols": cols_s[0]}


def _enc_deployed_sparse(module: DeployedSparseLinear, path: str, w: Writer) -> dict:
    dtype = DTYPE_NAMES[module.dtype]
    row_ptr = module.row_ptr.to("cpu").numpy()
    cols = module.col_idx.to("cpu").numpy()
    rows_s, cols_s = _csr_streams(w, row_ptr, cols)
    w.commit(rows_s, cols_s)
    w.tensor(f"{PREFIX}{path}/values", module.values)
    if module.bias is not None:
        w.tensor(f"{PREFIX}{path}/bias", module.bias)
    return {**_common(module, "DeployedSparseLinear", dtype), "nnz": module.nnz, "rows": rows_s[0], "cols": cols_s[0]}


def _enc_deployed_dense(module: DeployedDenseLinear, path: str, w: Writer) -> dict:
    dtype = _float_check(module.dense_weight, f"{path or 'root'}.dense_weight")
    w.tensor(f"{PREFIX}{path}/weight", module.dense_weight)
    if module.bias is not None:
        w.tensor(f"{PREFIX}{path}/bias", module.bias)
    return _common(module, "DeployedDenseLinear", dtype)


def _enc_codebook(module, path: str, w: Writer) -> dict:
    deployed = isinstance(module, DeployedCodebookLinear)
    codebook = module.codebook
    dtype = _float_check(codebook, f"{path or 'root'}.codebook")
    k = int(codebook.numel())
    in_f, out_f = int(module.in_features), int(module.out_features)
    key = w.codebooks.get(id(codebook))
    if key is None:
        key = f"cb{len(w.codebooks)}"
        w.codebooks[id(codebook)] = key
        w.codebook_meta[key] = {"k": k, "dtype": dtype}
        w.tensor(f"{PREFIX}codebook/{key}", codebook.reshape(-1))
    indices = module.indices.detach().to("cpu")
    labels = (unpack_labels(indices, in_f) if k <= 16 else indices).numpy()
    zero_pinned = bool(getattr(module, "zero_pinned", False))
    node = {**_common(module, "DeployedCodebookLinear" if deployed else "CodebookLinear", dtype),
            "k": k, "zero_pinned": zero_pinned, "codebook": key}
    dense_codes = w.encode(indices.contiguous().numpy().tobytes())
    choice = {"enc": "dense", "codes": dense_codes}
    if zero_pinned:
        # The sparse layout: positions of the non-zero indices (index 0 is the pruned
        # weight) and their indices, one byte each or 4-bit packed, whichever is smaller.
        row_ptr, cols, flat = _mask_csr(torch.from_numpy(labels != 0))
        rows_s, cols_s = _csr_streams(w, row_ptr, cols)
        kept = labels.reshape(-1)[flat].astype(np.uint8)
        codes, packed = w.encode(kept.tobytes()), False
        if k <= 16:
            nib = w.encode(_codec.nibble_pack(kept))
            if nib[0]["z"] < codes[0]["z"]:
                codes, packed = nib, True
        if rows_s[0]["z"] + cols_s[0]["z"] + codes[0]["z"] + 60 < dense_codes[0]["z"]:  # + its header entries
            choice = {"enc": "sparse", "nnz": int(flat.size), "rows": rows_s, "cols": cols_s, "codes": codes,
                      "packed": packed}
    for name, value in choice.items():
        if isinstance(value, tuple):
            w.commit(value)
            value = value[0]
        node[name] = value
    if module.bias is not None:
        w.tensor(f"{PREFIX}{path}/bias", module.bias)
    return node


def _enc_sparse_codebook(module, path: str, w: Writer) -> dict:
    """A DeployedSparseCodebookLinear as a deployed, zero_pinned codebook node in the sparse
    layout (rows / cols / codes streams, straight from its CSR + codes: no dense labels)."""
    codebook = module.codebook
    dtype = _float_check(codebook, f"{path or 'root'}.codebook")
    k = int(codebook.numel())
    key = w.codebooks.get(id(codebook))
    if key is None:
        key = f"cb{len(w.codebooks)}"
        w.codebooks[id(codebook)] = key
        w.codebook_meta[key] = {"k": k, "dtype": dtype}
        w.tensor(f"{PREFIX}codebook/{key}", codebook.reshape(-1))
    row_ptr = module.row_ptr.to("cpu").numpy().astype(np.int64)
    cols = module.col_idx.to("cpu").numpy().astype(np.int64)
    nnz = int(cols.size)
    raw = module.codes.to("cpu").numpy()
    kept = _codec.nibble_unpack(raw.tobytes(), nnz) if k <= 16 else raw
    rows = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
    order = np.lexsort((cols, rows))  # the file's column gaps need increasing columns within a row
    cols, kept = cols[order], np.ascontiguousarray(kept[order], dtype=np.uint8)
    if k and float(codebook[0]) != 0.0:
        raise ValueError(f"torchslim.save: {path or 'root'}: a DeployedSparseCodebookLinear is saved in the pruned + "
                         f"shared layout, whose codebook[0] is the pruned zero; got codebook[0] = {float(codebook[0])}")
    if nnz and int(kept.min()) == 0:  # kept entries of code 0 are zero weights: the file stores none
        keep = kept != 0
        rows, cols, kept = rows[order][keep], cols[keep], kept[keep]
        row_ptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.bincount(rows, minlength=row_ptr.size - 1))])
        nnz = int(cols.size)
    rows_s, cols_s = _csr_streams(w, row_ptr, cols)
    codes = w.encode(_codec.nibble_pack(kept) if k <= 16 else kept.tobytes())
    w.commit(rows_s, cols_s, codes)
    if module.bias is not None:
        w.tensor(f"{PREFIX}{path}/bias", module.bias)
    return {**_common(module, "DeployedSparseCodebookLinear", dtype), "k": k, "zero_pinned": True, "codebook": key,
            "enc": "sparse", "nnz": nnz, "rows": rows_s[0], "cols": cols_s[0], "codes": codes[0], "packed": k <= 16}


def unpack_labels(indices: torch.Tensor, in_features: int) -> torch.Tensor:
    from torchslim.ops._reference import unpack_int4
    return unpack_int4(indices, in_features)


def encode_layer(module: nn.Module, path: str, w: Writer) -> dict | None:
    """The manifest node of a torchslim layer (tensors and streams go to ``w``), or None
    when ``module`` is not a torchslim layer."""
    for cls, (enc, _) in LAYER_CODECS.items():
        if cls is not None and isinstance(module, cls):
            return enc(module, path, w)
    if isinstance(module, codebook_cls()):
        return _enc_codebook(module, path, w)
    return None


def is_torchslim_layer(module: nn.Module) -> bool:
    return isinstance(module, (MaskedSparseLinear, codebook_cls(), DeployedSparseLinear, DeployedDenseLinear,
                               DeployedCodebookLinear, DeployedSparseCodebookLinear))


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------

class Reader:
    """Tensors of a file, already checked against the checksummed tensor table."""

    def __init__(self, tensors: dict, src: str, max_numel: int, codebook_meta: dict):
        self.tensors = tensors
        self.src = src
        self.budget = 5 * max_numel  # bytes a file may make us allocate for its layers
        self.max_numel = max_numel
        self.spent = 0
        self.used: set[str] = set()
        self.codebook_meta = codebook_meta
        self.codebooks: dict[str, torch.Tensor] = {}
        self.spans: list[tuple[int, int]] = []

    def err(self, where: str, msg: str) -> ValueError:
        return ValueError(f"{self.src}: {where or 'root'}: {msg}")

    def charge(self, where: str, nbytes: int) -> None:
        """Account for memory the decoding of a layer will allocate, before allocating it."""
        self.spent += nbytes
        if self.spent > self.budget:
            raise self.err(where, f"declared shapes add up to more than max_numel={self.max_numel} weight elements "
                                  f"(the limit for a file of this size; pass max_numel= to load a larger model)")

    def tensor(self, where: str, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise self.err(where, f"tensor {name!r} missing")
        if t.dtype != dtype:
            raise self.err(where, f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != tuple(shape):
            raise self.err(where, f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return t

    def stream(self, where: str, spec, field: str, exact_len: int | None = None,
               min_len: int = 0, max_len: int | None = None) -> bytes:
        what = f"{self.src}: {where or 'root'}.{field}"
        if not isinstance(spec, dict) or set(spec) != {"o", "z", "c", "n"}:
            raise ValueError(f"{what}: expected a stream spec {{o, z, c, n}}, got {str(spec)[:100]!r}")
        off, size, codec, n = spec["o"], spec["z"], spec["c"], spec["n"]
        if not all(is_int(v) and v >= 0 for v in (off, size, n)) or codec not in _codec.CODECS:
            raise ValueError(f"{what}: invalid stream spec {str(spec)[:100]!r}")
        if exact_len is not None and n != exact_len:
            raise ValueError(f"{what}: stream declares {n} bytes, expected {exact_len}")
        if n < min_len or (max_len is not None and n > max_len):
            raise ValueError(f"{what}: stream declares {n} bytes, expected between {min_len} and {max_len}")
        blob = self.tensors.get(STREAMS)
        if blob is None and off == 0 and size == 0:  # an empty stream (a layer with no rows): no tensor needed
            blob = torch.empty(0, dtype=torch.uint8)
        if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"{what}: the file has no uint8 {STREAMS!r} tensor")
        if off + size > blob.numel():
            raise ValueError(f"{what}: stream [{off}, {off + size}) lies outside the {blob.numel()}-byte streams tensor")
        self.charge(where, n)
        self.used.add(STREAMS)
        self.spans.append((off, off + size))
        return _codec.decompress(blob[off:off + size].numpy().tobytes(), codec, n, what)

    def check_streams_cover(self) -> None:
        blob = self.tensors.get(STREAMS)
        pos = 0
        for a, b in sorted(self.spans):
            if a != pos:
                raise ValueError(f"{self.src}: streams overlap or leave gaps in the streams tensor")
            pos = b
        if blob is not None and pos != blob.numel():
            raise ValueError(f"{self.src}: {blob.numel() - pos} bytes of the streams tensor belong to no layer")


def need(reader: Reader, where: str, node: dict, keys: dict) -> None:
    """Check node holds exactly the keys given (name -> validator)."""
    if set(node) != set(keys) | {"type"}:
        raise reader.err(where, f"{node.get('type')} node has fields {sorted(node)}, expected {sorted(set(keys) | {'type'})}")
    for key, ok in keys.items():
        if not ok(node[key]):
            raise reader.err(where, f"invalid {key}={str(node[key])[:80]!r}")


_COMMON = {"in": v_feat, "out": v_feat, "bias": v_bool, "dtype": v_float_dtype, "from": v_from}


def decode_csr(reader: Reader, where: str, node: dict, in_f: int, out_f: int, nnz: int):
    """rows / cols streams -> (row_ptr int32 [out+1], cols int32 [nnz]), validated: every
    column in range and strictly increasing within its row. int32 arithmetic throughout
    (the per-row sums are checked first, so nothing wraps)."""
    if nnz > (1 << 31) - 1:
        raise reader.err(where, f"nnz={nnz} exceeds 2**31-1")
    rows_raw = reader.stream(where, node["rows"], "rows", min_len=out_f, max_len=5 * out_f)
    counts = _codec.varint_decode(rows_raw, out_f, f"{reader.src}: {where}.rows")
    if out_f and int(counts.max()) > in_f:
        raise reader.err(where, f"a row declares more than in_features={in_f} kept entries")
    if int(counts.sum(dtype=np.int64)) != nnz:
        raise reader.err(where, f"row counts add up to {int(counts.sum(dtype=np.int64))}, expected nnz={nnz}")
    cols_raw = reader.stream(where, node["cols"], "cols", min_len=nnz, max_len=5 * nnz)
    gaps = _codec.varint_decode(cols_raw, nnz, f"{reader.src}: {where}.cols")
    row_ptr = np.zeros(out_f + 1, dtype=np.int32)
    np.cumsum(counts, out=row_ptr[1:])
    if nnz == 0:
        return row_ptr, np.zeros(0, dtype=np.int32)
    if int(gaps.max()) >= in_f:
        raise reader.err(where, "column index out of range")
    steps = gaps + np.int32(1)
    nonempty = row_ptr[:-1][counts > 0]
    row_span = np.add.reduceat(steps, nonempty, dtype=np.int64)  # last column + 1 of each row
    if int(row_span.max()) > in_f:
        raise reader.err(where, f"column index out of range (a row reaches column {int(row_span.max()) - 1} >= "
                                f"in_features={in_f})")
    csum = np.cumsum(steps, dtype=np.int32)  # may wrap: differences inside a row are exact
    base = np.concatenate([np.zeros(1, dtype=np.int32), csum])[row_ptr[:-1]]
    cols = csum - np.repeat(base, counts) - np.int32(1)
    return row_ptr, cols


def _flat(row_ptr: np.ndarray, cols: np.ndarray, in_f: int) -> torch.Tensor:
    rows = np.repeat(np.arange(row_ptr.size - 1, dtype=np.int64), np.diff(row_ptr))
    return torch.from_numpy(rows * in_f + cols)


def _dtype(node) -> torch.dtype:
    return FLOAT_DTYPES[node["dtype"]]


def _bias(reader, where, path, node, dtype):
    if not node["bias"]:
        return None
    return reader.tensor(where, f"{PREFIX}{path}/bias", (node["out"],), dtype)


def _dec_sparse(reader: Reader, path: str, node: dict, deploy: bool) -> nn.Module:
    where = path
    need(reader, where, node, {**_COMMON, "nnz": v_int(0, 1 << 62), "rows": v_any, "cols": v_any})
    in_f, out_f, nnz, dtype = node["in"], node["out"], node["nnz"], _dtype(node)
    if nnz > in_f * out_f:
        raise reader.err(where, f"nnz={nnz} exceeds in_features*out_features={in_f * out_f}")
    deployed_in_file = node["type"] == "DeployedSparseLinear"
    vdtype = acc_dtype(dtype) if deployed_in_file else dtype
    values = reader.tensor(where, f"{PREFIX}{path}/values", (nnz,), vdtype)
    bias = _bias(reader, where, path, node, dtype)
    numel = in_f * out_f
    if deploy or deployed_in_file:
        reader.charge(where, 24 * nnz + 8 * out_f + (numel * dtype.itemsize if nnz > 0.4 * max(numel, 1) else 0))
        row_ptr, cols = decode_csr(reader, where, node, in_f, out_f, nnz)
        with torch.inference_mode(False):
            col_idx = torch.from_numpy(cols.astype(np.int16) if index_dtype(in_f) == torch.int16 else cols)
            return deployed_sparse(in_f, out_f, torch.from_numpy(row_ptr), col_idx, values.to(acc_dtype(dtype)),
                                   None if bias is None else bias.clone(), dtype)
    reader.charge(where, numel * (dtype.itemsize + 1) + 16 * nnz)
    row_ptr, cols = decode_csr(reader, where, node, in_f, out_f, nnz)
    flat = _flat(row_ptr, cols, in_f)
    with torch.inference_mode(False):
        layer = MaskedSparseLinear(in_f, out_f, bias=node["bias"], device="meta", dtype=dtype)
        weight = torch.zeros(numel, dtype=dtype)
        mask = torch.zeros(numel, dtype=torch.bool)
        weight[flat] = values
        mask[flat] = True
        layer.weight = nn.Parameter(weight.view(out_f, in_f))
        layer.mask = mask.view(out_f, in_f)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone())
        layer._clear_caches()
        if hasattr(layer, "refresh"):
            layer.refresh()  # the structure is built now, as compiled graphs expect
    return layer


def _dec_dense(reader: Reader, path: str, node: dict, deploy: bool) -> nn.Module:
    where = path
    need(reader, where, node, dict(_COMMON))
    dtype = _dtype(node)
    weight = reader.tensor(where, f"{PREFIX}{path}/weight", (node["out"], node["in"]), dtype)
    bias = _bias(reader, where, path, node, dtype)
    return DeployedDenseLinear(weight.clone(), None if bias is None else bias.clone())


def _dec_codebook(reader: Reader, path: str, node: dict, deploy: bool) -> nn.Module:
    where = path
    keys = {**_COMMON, "k": v_int(1, 256), "zero_pinned": v_bool, "codebook": lambda v: isinstance(v, str),
            "enc": lambda v: v in ("dense", "sparse"), "codes": v_any}
    if node.get("enc") == "sparse":
        keys.update({"nnz": v_int(0, 1 << 62), "rows": v_any, "cols": v_any, "packed": v_bool})
    need(reader, where, node, keys)
    in_f, out_f, k, key, dtype = node["in"], node["out"], node["k"], node["codebook"], _dtype(node)
    deployed_in_file = node["type"] in ("DeployedCodebookLinear", "DeployedSparseCodebookLinear")
    sck_in_file = node["type"] == "DeployedSparseCodebookLinear"  # (always the sparse layout)
    if sck_in_file and node.get("enc") != "sparse":
        raise reader.err(where, "a DeployedSparseCodebookLinear is stored in the sparse layout (enc='sparse')")
    meta = reader.codebook_meta.get(key)
    if not isinstance(meta, dict) or meta != {"k": k, "dtype": node["dtype"]}:
        raise reader.err(where, f"codebook {key[:40]!r} is not declared with k={k}, dtype={node['dtype']}")
    numel = in_f * out_f
    if key not in reader.codebooks:
        cb = reader.tensor(where, f"{PREFIX}codebook/{key}", (k,), dtype)
        reader.codebooks[key] = nn.Parameter(cb.clone()) if not (deploy or deployed_in_file) else cb.clone()
    codebook = reader.codebooks[key]
    if isinstance(codebook, nn.Parameter) == (deploy or deployed_in_file):
        raise reader.err(where, f"codebook {key[:40]!r} is shared by a deployed and a trainable layer")
    packed = k <= 16
    row_bytes = (in_f + 1) // 2 if packed else in_f
    sparse = None
    if node["enc"] == "dense":
        reader.charge(where, 3 * numel)
        raw = reader.stream(where, node["codes"], "codes", exact_len=row_bytes * out_f)
        stored = np.frombuffer(raw, dtype=np.uint8).reshape(out_f, row_bytes)
        if packed and in_f % 2 and out_f and int(stored[:, -1].max()) >> 4:
            raise reader.err(where, "the padding nibble of an odd-width packed row is not zero")
        indices = torch.from_numpy(stored.copy())
        labels = unpack_labels(indices, in_f) if packed else indices
    else:
        if not node["zero_pinned"]:
            raise reader.err(where, "sparse index layout requires zero_pinned")
        nnz = node["nnz"]
        if nnz > numel:
            raise reader.err(where, f"nnz={nnz} exceeds in_features*out_features={numel}")
        if node["packed"] and not packed:
            raise reader.err(where, "4-bit packed codes need k <= 16")
        reader.charge(where, 24 * nnz)
        row_ptr, cols = decode_csr(reader, where, node, in_f, out_f, nnz)
        raw = reader.stream(where, node["codes"], "codes", exact_len=(nnz + 1) // 2 if node["packed"] else nnz)
        kept = _codec.nibble_unpack(raw, nnz) if node["packed"] else np.frombuffer(raw, dtype=np.uint8)
        if node["packed"] and nnz % 2 and raw[-1] >> 4:
            raise reader.err(where, "the padding nibble of the packed codes is not zero")
        if nnz and int(kept.min()) == 0:
            raise reader.err(where, "sparse layout stores index 0 (the pruned code) at a kept position")
        if nnz and int(kept.max()) >= k:
            raise reader.err(where, f"cluster index {int(kept.max())} out of range for k={k}")
        if (deploy and not deployed_in_file) or sck_in_file:  # straight to the deployed form: no dense array
            if sck_in_file and k and float(codebook[0]) != 0.0:
                raise reader.err(where, "a zero_pinned deployed codebook must hold 0.0 at index 0")
            eff = codebook.detach().clone()
            eff[0] = 0.0
            bias = _bias(reader, where, path, node, dtype)
            with torch.inference_mode(False):
                return deploy_pinned_codebook(in_f, out_f, None, eff, None if bias is None else bias.clone(), dtype,
                                              (row_ptr, cols, kept), keep_form=sck_in_file)
        reader.charge(where, 3 * numel)
        labels = torch.zeros(numel, dtype=torch.uint8)
        labels[_flat(row_ptr, cols, in_f)] = torch.from_numpy(kept.copy())
        labels = labels.view(out_f, in_f)
        indices = None
        sparse = (row_ptr, cols, kept)
    if labels.numel() and int(labels.max()) >= k:
        raise reader.err(where, f"cluster index {int(labels.max())} out of range for k={k}")
    if deployed_in_file and node["zero_pinned"] and k and float(codebook[0]) != 0.0:
        raise reader.err(where, "a zero_pinned deployed codebook must hold 0.0 at index 0")
    if indices is None:
        indices = encode_labels(labels, k)
    bias = _bias(reader, where, path, node, dtype)
    bias = None if bias is None else bias.clone()
    with torch.inference_mode(False):
        if deployed_in_file:
            return DeployedCodebookLinear(in_f, out_f, indices, codebook, bias, node["zero_pinned"])
        if deploy:
            eff = codebook.detach().clone()
            if node["zero_pinned"]:
                eff[0] = 0.0
                return deploy_pinned_codebook(in_f, out_f, labels, eff, bias, dtype, sparse)
            return DeployedCodebookLinear(in_f, out_f, indices, eff, bias, False)
        layer = codebook_cls()._uninitialized(in_f, out_f, k, bias is not None, node["zero_pinned"], "meta", dtype)
        layer.indices = indices
        layer.codebook = codebook  # the same Parameter object for every layer sharing it
        if bias is not None:
            layer.bias = nn.Parameter(bias)
        return layer


def encode_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    from torchslim.ops._reference import pack_int4
    return pack_int4(labels).contiguous() if k <= 16 else labels.to(torch.uint8).contiguous()


def deploy_pinned_codebook(in_f, out_f, labels, codebook, bias, dtype, sparse=None, keep_form=False) -> nn.Module:
    """The deployed form of a pruned + shared (zero_pinned) codebook layer, from its labels
    (uint8 [out, in], 0 = pruned) or straight from a file's sparse streams ``sparse`` =
    (row_ptr int32 [out + 1], cols [nnz], kept codes uint8 [nnz]) without a dense array.

    Where ``_path_rules.deploy_as_sparse_codebook`` says so (density <= 0.15, where the
    sparse-codebook kernel is at least as fast at batch 1, or a layer small enough to join a
    fused run at density <= 0.4): a ``DeployedSparseCodebookLinear`` holding the CSR
    positions, the codes (4-bit packed when k <= 16) and the codebook, no decoded values.
    Otherwise the deployed sparse (or dense) linear holding the decoded values.
    ``keep_form``: a DeployedSparseCodebookLinear whatever the density (a saved one)."""
    from torchslim._path_rules import deploy_as_sparse_codebook
    from torchslim.nn.deployed import DeployedSparseCodebookLinear

    if sparse is None:
        keep = labels != 0
        row_ptr = np.zeros(out_f + 1, dtype=np.int32)
        np.cumsum(keep.sum(dim=1).numpy(), out=row_ptr[1:])
        cols = torch.nonzero(keep)[:, 1].to(torch.int32).numpy() if keep.any() else np.zeros(0, dtype=np.int32)
        kept = labels[keep].numpy()
    else:
        row_ptr, cols, kept = sparse
    kept = np.asarray(kept)
    col_idx = torch.from_numpy(np.asarray(cols, dtype=np.int16 if index_dtype(in_f) == torch.int16 else np.int32))
    row_ptr = torch.from_numpy(np.asarray(row_ptr, dtype=np.int32))
    numel = in_f * out_f
    k = int(codebook.numel())
    if keep_form or (numel and deploy_as_sparse_codebook(kept.size / numel, numel)):
        if k <= 16:
            codes = torch.from_numpy(np.frombuffer(_codec.nibble_pack(kept), dtype=np.uint8).copy())
        else:
            codes = torch.from_numpy(kept.astype(np.uint8, copy=True))
        return DeployedSparseCodebookLinear(in_f, out_f, row_ptr, col_idx, codes,
                                            codebook.detach().to(dtype).clone(), bias)
    table = codebook.detach().to("cpu", acc_dtype(dtype)).numpy()
    values = np.empty(kept.size, dtype=table.dtype)
    step = 1 << 20  # lookups in chunks: numpy's fancy indexing makes an int64 copy of the indices
    for s in range(0, kept.size, step):
        values[s:s + step] = table[kept[s:s + step]]
    return deployed_sparse(in_f, out_f, row_ptr, col_idx, torch.from_numpy(values), bias, dtype)


# type -> (encoder, decoder). CodebookLinear is looked up at call time (see codebook_cls).
LAYER_CODECS = {
    MaskedSparseLinear: (_enc_masked, _dec_sparse),
    DeployedSparseLinear: (_enc_deployed_sparse, _dec_sparse),
    DeployedDenseLinear: (_enc_deployed_dense, _dec_dense),
    DeployedCodebookLinear: (_enc_codebook, _dec_codebook),
    DeployedSparseCodebookLinear: (_enc_sparse_codebook, _dec_codebook),
}
DECODERS = {"MaskedSparseLinear": _dec_sparse, "DeployedSparseLinear": _dec_sparse,
            "DeployedDenseLinear": _dec_dense, "CodebookLinear": _dec_codebook,
            "DeployedCodebookLinear": _dec_codebook, "DeployedSparseCodebookLinear": _dec_codebook}


def decode_layer(reader: Reader, path: str, node, deploy: bool) -> nn.Module:
    if not isinstance(node, dict) or not isinstance(node.get("type"), str) or node["type"] not in DECODERS:
        kind = node.get("type") if isinstance(node, dict) else type(node).__name__
        raise reader.err(path, f"unknown layer type {str(kind)[:64]!r}")
    with torch.no_grad():
        return DECODERS[node["type"]](reader, path, node, deploy)


def skeleton_matches(module: nn.Module, node: dict) -> str | None:
    """None when ``module`` (a skeleton's module) can take the layer ``node`` describes,
    else the reason it cannot."""
    conv = is_conv1d(module)
    if conv:
        w = module.weight
        if w.dim() != 2:
            return f"a Conv1D with a {w.dim()}-D weight"
        in_f, out_f = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.Linear) or is_torchslim_layer(module):
        in_f, out_f = int(module.in_features), int(module.out_features)
    else:
        return f"the model's module there is a {type(module).__name__}, not a linear layer"
    if node.get("from") == "Conv1D" and not conv and not is_torchslim_layer(module):
        return f"the file's layer replaced a transformers Conv1D, the model has a {type(module).__name__}"
    has_bias = getattr(module, "bias", None) is not None
    if (in_f, out_f, has_bias) != (node.get("in"), node.get("out"), node.get("bias")):
        return (f"shape mismatch: the file has in={node.get('in')}, out={node.get('out')}, bias={node.get('bias')}, "
                f"the model has in={in_f}, out={out_f}, bias={has_bias}")
    return None


# --------------------------------------------------------------------------------------
# Sequential architecture header
# --------------------------------------------------------------------------------------

# name -> (class, attributes stored, validators per attribute)
SIMPLE = {
    "ReLU": (nn.ReLU, (), {}),
    "ReLU6": (nn.ReLU6, (), {}),
    "Tanh": (nn.Tanh, (), {}),
    "Sigmoid": (nn.Sigmoid, (), {}),
    "SiLU": (nn.SiLU, (), {}),
    "GELU": (nn.GELU, ("approximate",), {"approximate": lambda v: v in ("none", "tanh")}),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",), {"negative_slope": v_float(-1e6, 1e6)}),
    "ELU": (nn.ELU, ("alpha",), {"alpha": v_float(-1e6, 1e6)}),
    "Softmax": (nn.Softmax, ("dim",), {"dim": lambda v: v is None or v_int(-8, 8)(v)}),
    "LogSoftmax": (nn.LogSoftmax, ("dim",), {"dim": lambda v: v is None or v_int(-8, 8)(v)}),
    "Dropout": (nn.Dropout, ("p",), {"p": v_float(0.0, 1.0)}),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim"), {"start_dim": v_int(-8, 8), "end_dim": v_int(-8, 8)}),
    "Identity": (nn.Identity, (), {}),
}


def encode_arch(module: nn.Module, depth: int = 0):
    """The self-describing architecture of a (nested) Sequential MLP, or None when the model
    holds a module outside the whitelist (it is then loaded with ``load(path, model=)``)."""
    from torchslim.nn.sparse_sequential import SparseSequential
    from torchslim.nn.deployed import DeployedSequential

    if depth > MAX_DEPTH:
        return None
    if type(module) in (nn.Sequential, SparseSequential, DeployedSequential):
        children = []
        for name, child in module.named_children():
            node = encode_arch(child, depth + 1)
            if node is None:
                return None
            children.append([name, node])
        return {"type": "Sequential", "children": children}
    if is_torchslim_layer(module):
        return {"type": "Layer"}  # described by the manifest entry of its path
    if type(module) is nn.Linear:
        return {"type": "Linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if type(module) is nn.BatchNorm1d:
        return {"type": "BatchNorm1d", "num_features": module.num_features, "eps": float(module.eps),
                "momentum": None if module.momentum is None else float(module.momentum),
                "affine": bool(module.affine), "track": bool(module.track_running_stats)}
    for name, (cls, attrs, _) in SIMPLE.items():
        if type(module) is cls:
            return {"type": name, **{a: (float(getattr(module, a)) if isinstance(getattr(module, a), float)
                                         else getattr(module, a)) for a in attrs}}
    return None


class ArchBuilder:
    def __init__(self, src: str, layers: dict):
        self.src, self.layers, self.nodes = src, layers, 0

    def err(self, where, msg):
        return ValueError(f"{self.src}: architecture: {where or 'root'}: {msg}")

    def need(self, where, node, keys):
        if set(node) != set(keys) | {"type"}:
            raise self.err(where, f"{node.get('type')} node has fields {sorted(node)}, "
                                  f"expected {sorted(set(keys) | {'type'})}")
        for key, ok in keys.items():
            if not ok(node[key]):
                raise self.err(where, f"invalid {key}={str(node[key])[:80]!r}")

    def build(self, node, where: str = "", depth: int = 0) -> nn.Module:
        """A meta-device skeleton of the architecture (torchslim layers as nn.Linear
        placeholders of the manifest's dimensions)."""
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            raise self.err(where, "model nesting too deep or too many modules")
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise self.err(where, f"expected a module node with a 'type', got {type(node).__name__}")
        kind = node["type"]
        if kind == "Sequential":
            self.need(where, node, {"children": lambda v: isinstance(v, list)})
            seq = nn.Sequential()
            for item in node["children"]:
                if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                        or not NAME_RE.fullmatch(item[0]) or item[0] in seq._modules):
                    raise self.err(where, f"invalid or duplicate child entry {str(item)[:80]!r}")
                name = item[0]
                seq.add_module(name, self.build(item[1], f"{where}.{name}" if where else name, depth + 1))
            return seq
        if kind == "Layer":
            self.need(where, node, {})
            entry = self.layers.get(where)
            if not isinstance(entry, dict):
                raise self.err(where, "a torchslim layer with no manifest entry")
            if not (v_feat(entry.get("in")) and v_feat(entry.get("out")) and v_bool(entry.get("bias"))):
                raise self.err(where, "manifest entry without valid in / out / bias")
            return nn.Linear(entry["in"], entry["out"], bias=entry["bias"], device="meta")
        if kind == "Linear":
            self.need(where, node, {"in": v_feat, "out": v_feat, "bias": v_bool})
            return nn.Linear(node["in"], node["out"], bias=node["bias"], device="meta")
        if kind == "BatchNorm1d":
            self.need(where, node, {"num_features": v_feat, "eps": v_float(0.0, 1.0),
                                    "momentum": lambda v: v is None or v_float(0.0, 1.0)(v),
                                    "affine": v_bool, "track": v_bool})
            return nn.BatchNorm1d(node["num_features"], eps=node["eps"], momentum=node["momentum"],
                                  affine=node["affine"], track_running_stats=node["track"], device="meta")
        if kind in SIMPLE:
            cls, attrs, checks = SIMPLE[kind]
            self.need(where, node, {a: checks[a] for a in attrs})
            return cls(**{a: node[a] for a in attrs})
        raise self.err(where, f"unknown layer type {kind[:64]!r}")
