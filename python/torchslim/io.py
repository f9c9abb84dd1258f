"""Compact model files for ANY ``nn.Module``: ``save`` / ``load`` (safetensors + a JSON
header, no pickle). ``to_dense`` / ``to_sparse`` / ``deploy`` live in ``torchslim.convert``
and are re-exported here.

File layout
-----------
A standard safetensors file (read back with the ``safetensors`` library, which validates
the container: offsets, sizes, overlaps). Its ``__metadata__`` holds ``"torchslim"``, a JSON
document, and ``"torchslim_crc32"``, the crc32 of that document's UTF-8 bytes::

    {"format": "torchslim", "version": 2,
     "tensors": {name: [dtype, shape, crc32 of the tensor's bytes], ...},   # every tensor
     "codebooks": {"cb0": {"k": 16, "dtype": "float32"}, ...},
     "layers": {module path: layer node, ...},       # the manifest of torchslim layers
     "plain": [state_dict key, ...],                 # other parameters / persistent buffers
     "extra": [key, ...],                            # non-persistent buffers (e.g. rotary inv_freq)
     "ties": {key: key it is tied to, ...},          # tensors shared by two keys, stored once
     "arch": <node> or null}                         # Sequential MLPs: the architecture

Plain tensors are stored under their ``state_dict`` key; a torchslim layer's data under
``"__ts__/<module path>/<field>"`` and the integer streams in ``"__ts__/streams"`` (see
``torchslim._format`` for the per-layer encodings: packed kept values, varint row / column
streams, 4- or 8-bit codes, codebooks stored once per Parameter).

Integrity: the header checksum and every tensor's checksum are verified on every load; the
tensor table must match the container exactly; every declared dimension is checked against
the tensors that carry it; out-of-range indices, streams of the wrong length and shapes too
large for the file raise ``ValueError`` naming the layer and the field. A file either loads
exactly as saved or is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from torchslim import _codec
from torchslim import _format as fmt
from torchslim._codec import CODECS
from torchslim._layers import is_conv1d
from torchslim._codec import compress as _compress  # noqa: F401  (kept for callers of the old names)
from torchslim._codec import decompress as _decompress  # noqa: F401
from torchslim._codec import varint_decode as _varint_decode  # noqa: F401
from torchslim._codec import varint_encode as _varint_encode  # noqa: F401
from torchslim.convert import deploy, to_dense, to_sparse  # noqa: F401  (public names of this module)
from torchslim.nn.deployed import DeployedSequential

__all__ = ["save", "load", "save_to_bytes", "load_bytes", "saved_size", "to_dense", "to_sparse", "deploy"]

FORMAT = "torchslim"
VERSION = 2
META_KEY = "torchslim"
CRC_KEY = "torchslim_crc32"
_HEADER_KEYS = {"format", "version", "tensors", "codebooks", "layers", "plain", "extra", "ties", "arch"}
_MAX_HEADER_BYTES = 64 << 20
_MAX_ERRORS_SHOWN = 10


# --------------------------------------------------------------------------------------
# the tensors of a model: (key, owning module, local name, tensor, kind)
# --------------------------------------------------------------------------------------

def _tensor_entries(model: nn.Module, skip: set[str]):
    """Every parameter and buffer of ``model`` outside the modules at the paths ``skip``, by
    state_dict key; kind is "param", "buffer" (persistent) or "extra" (non-persistent)."""
    out = []
    for mpath, mod in model.named_modules(remove_duplicate=False):
        if mpath in skip or any(mpath.startswith(p + ".") for p in skip if p):
            continue
        if "" in skip:
            continue
        pre = f"{mpath}." if mpath else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out.append((pre + name, mod, name, p, "param"))
        derived = isinstance(mod, DeployedSequential)  # its non-persistent buffers are rebuilt from the layers
        for name, b in mod._buffers.items():
            if b is not None and not (derived and name in mod._non_persistent_buffers_set):
                out.append((pre + name, mod, name, b, "extra" if name in mod._non_persistent_buffers_set else "buffer"))
    return out


def _check_key(key: str) -> None:
    if key.startswith(fmt.PREFIX):
        raise ValueError(f"torchslim.save: state_dict key {key!r} uses the prefix {fmt.PREFIX!r} reserved for "
                         f"torchslim's own tensors")


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------

def _build(model: nn.Module, codec: str) -> tuple[dict, dict]:
    """(tensors, metadata) of the file for ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if codec not in ("auto", *CODECS):
        raise ValueError(f"codec must be one of 'auto', 'none', 'zlib', 'lzma', got {codec!r}")
    w = fmt.Writer(codec)
    layers, seen = {}, {}
    with torch.no_grad():
        for path, mod in model.named_modules(remove_duplicate=False):
            if not fmt.is_torchslim_layer(mod):
                continue
            if id(mod) in seen:
                raise ValueError(f"torchslim.save: the torchslim layer at {path!r} is also registered at "
                                 f"{seen[id(mod)]!r}; a layer shared between two paths cannot be stored")
            seen[id(mod)] = path
            layers[path] = fmt.encode_layer(mod, path, w)
        plain, extra, ties, owner = [], [], {}, {}
        for key, _, _, t, kind in _tensor_entries(model, set(layers)):
            _check_key(key)
            if id(t) in owner:
                first, first_kind = owner[id(t)]
                if (first_kind == "param") != (kind == "param"):
                    raise ValueError(f"torchslim.save: {key!r} and {first!r} share one tensor, once as a parameter "
                                     f"and once as a buffer")
                ties[key] = first
                continue
            owner[id(t)] = (key, kind)
            (extra if kind == "extra" else plain).append(key)
            w.tensor(key, t)
    w.finish()
    table = {}
    for name, t in w.tensors.items():
        if t.dtype not in fmt.DTYPE_NAMES:
            raise TypeError(f"torchslim.save: tensor {name!r} has dtype {t.dtype}, which the file format cannot store")
        table[name] = [fmt.DTYPE_NAMES[t.dtype], list(t.shape), _tensor_crc(t)]
    header = {"format": FORMAT, "version": VERSION, "tensors": table, "codebooks": w.codebook_meta,
              "layers": layers, "plain": plain, "extra": extra, "ties": ties, "arch": fmt.encode_arch(model)}
    text = json.dumps(header, separators=(",", ":"))
    return w.tensors, {META_KEY: text, CRC_KEY: str(_codec.crc32(text.encode()))}


def _tensor_crc(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return _codec.crc32(t.reshape(-1).view(torch.uint8).numpy().data)


def save(model: nn.Module, path, *, codec: str = "auto") -> int:
    """Write ``model`` (any ``nn.Module``) to ``path`` in the compact torchslim format; returns
    the file size in bytes.

    Every torchslim layer (MaskedSparseLinear, CodebookLinear, the deployed forms) is stored
    compressed; every other parameter and persistent buffer as a plain tensor under its
    ``state_dict`` key (a tensor shared by two keys, e.g. GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``, is stored once and re-tied on load), plus non-persistent
    buffers, so a meta-device skeleton can be completed. A model built only from
    (nested) ``nn.Sequential``, ``nn.Linear``, the torchslim layers, ``BatchNorm1d``,
    ``Dropout``, ``Flatten``, ``Identity`` and the activations ReLU, ReLU6, Tanh, Sigmoid,
    SiLU, GELU, LeakyReLU, ELU, Softmax, LogSoftmax also carries its architecture, so
    ``load(path)`` alone rebuilds it; any other model loads with ``load(path, model=skeleton)``.
    ``codec``: entropy coding of the integer streams, ``"auto"`` (smallest of none / zlib /
    lzma, per stream), ``"none"``, ``"zlib"`` or ``"lzma"``.
    """
    from safetensors.torch import save_file

    tensors, metadata = _build(model, codec)
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path.stat().st_size


def save_to_bytes(model: nn.Module, *, codec: str = "auto") -> bytes:
    """The bytes ``save`` would write."""
    from safetensors.torch import save

    tensors, metadata = _build(model, codec)
    return save(tensors, metadata=metadata)


def saved_size(model: nn.Module, *, codec: str = "auto") -> int:
    """Size in bytes of the file ``save(model, ...)`` writes."""
    return len(save_to_bytes(model, codec=codec))


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------

def _pairs_no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _open(path: str, src: str) -> tuple[dict, dict, int]:
    """(header, tensors, file size): container read by safetensors, header checksummed and
    parsed, every tensor checked against the header's table."""
    from safetensors import safe_open

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ValueError(f"{src}: cannot read ({exc})") from None
    if size < 8:
        raise ValueError(f"{src}: not a torchslim file (only {size} bytes)")
    with open(path, "rb") as f:
        hlen = int.from_bytes(f.read(8), "little")
    if hlen > _MAX_HEADER_BYTES or hlen > size - 8:
        raise ValueError(f"{src}: truncated or corrupt file (header declares {hlen} bytes, file holds {size - 8})")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            text, crc = meta.get(META_KEY), meta.get(CRC_KEY)
            if text is None or crc is None or set(meta) != {META_KEY, CRC_KEY}:
                raise ValueError(f"{src}: not a torchslim file (no {META_KEY!r} metadata)")
            if str(_codec.crc32(text.encode())) != crc:
                raise ValueError(f"{src}: header checksum mismatch: the file is corrupt")
            header = _parse_header(text, src)
            table = header["tensors"]
            if set(names) != set(table):
                raise ValueError(f"{src}: the container's tensors differ from the header's table")
            tensors = {}
            for name in names:
                t = f.get_tensor(name)
                dtype, shape, tcrc = table[name]
                if fmt.DTYPE_NAMES.get(t.dtype) != dtype or list(t.shape) != shape:
                    raise ValueError(f"{src}: tensor {name[:80]!r} is {t.dtype} {list(t.shape)} in the container, "
                                     f"{dtype} {shape} in the header")
                if _tensor_crc(t) != tcrc:
                    raise ValueError(f"{src}: tensor {name[:80]!r}: checksum mismatch: the file is corrupt")
                tensors[name] = t
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors (SafetensorError, OSError, ...): a corrupt container
        raise ValueError(f"{src}: corrupt safetensors container ({type(exc).__name__}: {str(exc)[:120]})") from None
    return header, tensors, size


def _parse_header(text: str, src: str) -> dict:
    try:
        header = json.loads(text, object_pairs_hook=_pairs_no_duplicates)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"{src}: corrupt header ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{src}: not a torchslim file (format "
                         f"{str(header.get('format'))[:40] if isinstance(header, dict) else None!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{src}: unsupported torchslim file version {str(header.get('version'))[:20]!r} (this reader: "
                         f"{VERSION}; files of version 1 were written by an older torchslim: re-save them with it "
                         f"from the loaded model)")
    if set(header) != _HEADER_KEYS:
        raise ValueError(f"{src}: corrupt header (fields {sorted(header)[:12]})")
    ok = (isinstance(header["tensors"], dict) and isinstance(header["codebooks"], dict)
          and isinstance(header["layers"], dict) and isinstance(header["ties"], dict)
          and all(isinstance(header[k], list) and all(isinstance(x, str) for x in header[k]) for k in ("plain", "extra"))
          and all(isinstance(k, str) and isinstance(v, str) for k, v in header["ties"].items()))
    if not ok:
        raise ValueError(f"{src}: corrupt header (wrong field types)")
    for name, entry in header["tensors"].items():
        if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in fmt.TENSOR_DTYPES
                and isinstance(entry[1], list) and all(fmt.is_int(s) and s >= 0 for s in entry[1])
                and fmt.is_int(entry[2])):
            raise ValueError(f"{src}: corrupt header (tensor table entry {name[:80]!r})")
    return header


def _default_max_numel(file_bytes: int) -> int:
    # Dense weight elements the compressed layers may declare: 32 per stored byte (a
    # 90%-pruned 4-bit model holds ~10), at least 2**24. About 5 bytes are allocated per
    # element (weight + mask), so a file under 1 MB makes load allocate < 256 MB.
    return max(1 << 24, 32 * file_bytes)


def load(path, model: nn.Module | None = None, *, device=None, deploy: bool = False,
         max_numel: int | None = None) -> nn.Module:
    """Load a file written by ``save``; the result computes exactly what the saved model did.

    - ``model=None``: rebuild a Sequential MLP from the file's architecture (files of other
      models have none: pass ``model=``).
    - ``model=skeleton``: the user's freshly built, uncompressed model of the same
      architecture (as for ``from_pretrained``; it may be built under
      ``with torch.device("meta")``, then no dense weight of a compressed layer is ever
      allocated). The layers named in the file's manifest are replaced by the saved torchslim
      layers (nn.Linear and transformers Conv1D skeleton layers alike), every other tensor is
      filled from the file (keeping the file's dtype; ties are restored), in place; the model
      is returned (a new object only when the root itself is a compressed layer). Strict:
      missing or unexpected keys, shape or dtype mismatches and manifest paths that name no
      linear layer raise one ``ValueError`` listing them (the first ten and the count).
    - ``deploy=True``: the compressed layers come back in their deployed, inference-only
      form (``torchslim.deploy``), straight from the file, without any dense weight.
    - ``device``: where the model goes (default: the CPU).
    - ``max_numel``: the number of dense weight elements the compressed layers may declare
      (default: 32 per byte of the file, at least 2**24); raise it for extremely sparse models.

    The model comes back in eval mode. Loading consumes no random numbers. A truncated,
    corrupted or hostile file raises ``ValueError``.
    """
    src = str(path)
    if not os.path.isfile(src):
        raise ValueError(f"{src}: cannot read (no such file)")
    with torch.inference_mode(False):  # normal tensors even when called under inference_mode
        header, tensors, size = _open(src, src)
        return _load(header, tensors, size, src, model, device, deploy, max_numel)


def load_bytes(data: bytes, model: nn.Module | None = None, *, device=None, deploy: bool = False,
               max_numel: int | None = None) -> nn.Module:
    """``load`` from the bytes of a file."""
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    with torch.inference_mode(False):  # normal tensors even when called under inference_mode
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(data))
            header, tensors, size = _open(tmp, "<bytes>")
        finally:
            os.unlink(tmp)
        return _load(header, tensors, size, "<bytes>", model, device, deploy, max_numel)


def _resolve(model: nn.Module, path: str):
    """(parent, name, module) of ``path`` in ``model`` (parent None for the root), or None."""
    if path == "":
        return None, "", model
    parts = path.split(".")
    if not all(fmt.NAME_RE.fullmatch(p) for p in parts):
        return None
    parent = model
    for p in parts[:-1]:
        parent = parent._modules.get(p)
        if parent is None:
            return None
    child = parent._modules.get(parts[-1])
    return None if child is None else (parent, parts[-1], child)


def _problems(src: str, problems: list[str]) -> ValueError:
    shown = "; ".join(problems[:_MAX_ERRORS_SHOWN])
    more = f" (and {len(problems) - _MAX_ERRORS_SHOWN} more)" if len(problems) > _MAX_ERRORS_SHOWN else ""
    return ValueError(f"{src}: the file does not match the model: {len(problems)} problem(s): {shown}{more}")


def _load(header, tensors, size, src, model, device, deploy, max_numel):
    if max_numel is None:
        max_numel = _default_max_numel(size)
    elif not fmt.is_int(max_numel) or max_numel < 0:
        raise ValueError(f"max_numel must be a non-negative integer, got {max_numel!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be an nn.Module (a skeleton of the saved architecture), got "
                        f"{type(model).__name__}")
    layers = header["layers"]
    adopt_dtype = model is None
    if model is None:
        if header["arch"] is None:
            raise ValueError(f"{src}: this file holds a model that is not a Sequential MLP, so it does not describe "
                             f"its architecture: pass model= (a freshly built skeleton of the same architecture, e.g. "
                             f"built under `with torch.device('meta')`)")
        model = fmt.ArchBuilder(src, layers).build(header["arch"])
    plain, extra, ties = header["plain"], header["extra"], header["ties"]

    # ---- match the file against the skeleton; collect every problem
    problems = []
    targets = {}
    for path, node in layers.items():
        where = path or "<root>"
        found = _resolve(model, path)
        if found is None:
            problems.append(f"manifest path {where[:80]!r} names no module of the model")
            continue
        if not isinstance(node, dict):
            problems.append(f"manifest entry {where[:80]!r} is not a layer node")
            continue
        why = fmt.skeleton_matches(found[2], node)
        if why is not None:
            problems.append(f"{where[:80]}: {why}")
            continue
        targets[path] = found
    entries = {e[0]: e for e in _tensor_entries(model, set(layers))}
    expected = {k for k, e in entries.items() if e[4] != "extra"}
    in_file = set(plain) | set(ties)
    if len(in_file) != len(plain) + len(ties) or len(set(plain)) != len(plain) or set(extra) & in_file:
        problems.append("the file lists a key twice")
    for key in sorted(expected - in_file):
        problems.append(f"missing key {key[:80]!r}")
    for key in sorted(in_file - expected):
        problems.append(f"unexpected key {key[:80]!r}")
    for key in sorted(set(extra) - {k for k, e in entries.items() if e[4] == "extra"}):
        problems.append(f"unexpected buffer {key[:80]!r}")
    for key in list(plain) + list(extra):
        if key.startswith(fmt.PREFIX) or key not in tensors:
            problems.append(f"key {key[:80]!r} has no tensor in the file")
    for key, first in ties.items():
        if first not in plain:
            problems.append(f"{key[:80]!r} is tied to {first[:80]!r}, which the file does not store")
    for key in sorted(in_file & expected):
        stored = ties.get(key, key)
        if stored not in tensors or key not in entries:
            continue
        have, want = tensors[stored], entries[key][3]
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{key[:80]}: shape {tuple(have.shape)} in the file, {tuple(want.shape)} in the model")
        elif have.dtype != want.dtype and not adopt_dtype:
            problems.append(f"{key[:80]}: dtype {have.dtype} in the file, {want.dtype} in the model")
        if key in ties and entries[key][4] != entries.get(ties[key], entries[key])[4]:
            problems.append(f"{key[:80]!r} is tied to {ties[key][:80]!r}, but one is a parameter and one a buffer")
    for key in extra:
        if key in entries and key in tensors and tuple(tensors[key].shape) != tuple(entries[key][3].shape):
            problems.append(f"{key[:80]}: shape {tuple(tensors[key].shape)} in the file, "
                            f"{tuple(entries[key][3].shape)} in the model")
    for key, e in entries.items():
        if e[4] == "extra" and key not in extra and e[3].is_meta:
            problems.append(f"non-persistent buffer {key[:80]!r} is on the meta device and the file does not hold it")
    if problems:
        raise _problems(src, problems)

    # ---- decode the compressed layers (validating every stream) before touching the model
    reader = fmt.Reader(tensors, src, max_numel, header["codebooks"])
    reader.used.update(plain)
    reader.used.update(extra)
    built = {}
    for path in layers:
        built[path] = fmt.decode_layer(reader, path, layers[path], deploy)
    reader.check_streams_cover()
    unused = set(tensors) - reader.used
    if unused:
        raise ValueError(f"{src}: file holds tensors no layer uses: {sorted(unused)[:5]}")
    if set(header["codebooks"]) != set(reader.codebooks):
        raise ValueError(f"{src}: file declares codebooks no layer uses")

    # ---- fill the model
    with torch.no_grad():
        for key in plain:
            _, mod, local, old, kind = entries[key]
            t = tensors[key]
            if kind == "param":
                mod._parameters[local] = nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                mod._buffers[local] = t
        for key, first in ties.items():
            _, mod, local, _, kind = entries[key]
            _, fmod, flocal, _, _ = entries[first]
            (mod._parameters if kind == "param" else mod._buffers)[local] = (
                fmod._parameters[flocal] if kind == "param" else fmod._buffers[flocal])
        for key in extra:
            _, mod, local, _, _ = entries[key]
            mod._buffers[local] = tensors[key]
        for path, (parent, name, old) in targets.items():
            new = built[path]
            new.train(old.training)
            if is_conv1d(old):
                new.from_conv1d = True  # recorded as "from": "Conv1D" when saved again
            if parent is None:
                model = new
            else:
                setattr(parent, name, new)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{src}: after loading, {len(leftover)} tensor(s) of the model are still on the meta device "
                         f"(not in the file): {leftover[:_MAX_ERRORS_SHOWN]}")
    from torchslim.convert import _finish_deploy, _fuse_deployed

    if deploy:
        model = _finish_deploy(model)
    elif any(isinstance(m, fmt.DeployedSparseLinear) for m in model.modules()):
        model = _fuse_deployed(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model
