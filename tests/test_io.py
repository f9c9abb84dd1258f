"""torchslim.save / load / to_dense: round trips give equal outputs, files are compact, and
truncated, corrupted or hostile files raise ValueError quickly without huge allocations."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
import torchslim.io as tio
from torchslim.nn import MaskedSparseLinear
from torchslim.ops._reference import pack_int4, ref_codebook_linear, unpack_int4


# --------------------------------------------------------------------------------------
# CodebookLinear: the real one, or a contract stand-in while the module is a placeholder
# --------------------------------------------------------------------------------------

class _StandInCodebookLinear(nn.Module):
    """Minimal CodebookLinear following the published contract (tests only)."""

    def __init__(self, in_features, out_features, num_clusters=16, bias=True, zero_pinned=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_clusters, self.zero_pinned = num_clusters, zero_pinned
        self.codebook = nn.Parameter(torch.zeros(num_clusters, device=device, dtype=dtype or torch.float32))
        cols = (in_features + 1) // 2 if num_clusters <= 16 else in_features
        self.register_buffer("indices", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32)) if bias else None

    @property
    def weight(self):
        idx = self.indices
        if idx.shape[1] != self.in_features:
            idx = unpack_int4(idx, self.in_features)
        return self.codebook.detach()[idx.long()]

    def to_dense(self):
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.codebook.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x):
        return ref_codebook_linear(x, self.indices, self.codebook, self.bias)


def _real_codebook_available() -> bool:
    try:
        torchslim.nn.CodebookLinear(4, 3, num_clusters=4)
        return True
    except NotImplementedError:
        return False


@pytest.fixture
def cb_cls(monkeypatch):
    if _real_codebook_available():
        return torchslim.nn.CodebookLinear
    monkeypatch.setattr(torchslim.nn, "CodebookLinear", _StandInCodebookLinear)
    return _StandInCodebookLinear


def make_codebook_layer(cls, in_f, out_f, k, zero_pinned=False, codebook=None, density=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = cls(in_f, out_f, num_clusters=k, bias=True, zero_pinned=zero_pinned)
    with torch.no_grad():
        if codebook is not None:
            layer.codebook = codebook
        else:
            cb = torch.randn(k, generator=g)
            if zero_pinned:
                cb[0] = 0.0
            layer.codebook.copy_(cb)
        lo = 1 if zero_pinned else 0
        idx = torch.randint(lo, k, (out_f, in_f), generator=g)
        if zero_pinned:
            idx[torch.rand(out_f, in_f, generator=g) >= density] = 0
        idx = idx.to(torch.uint8)
        layer.indices.copy_(pack_int4(idx) if k <= 16 else idx)
        layer.bias.copy_(torch.randn(out_f, generator=g))
    return layer


def masked_layer(in_f, out_f, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    mask = torch.rand(out_f, in_f, generator=g) < density
    layer = MaskedSparseLinear.from_dense(lin, mask=mask)
    return layer


def roundtrip(model, tmp_path, **kw):
    path = tmp_path / "m.tslim"
    size = torchslim.save(model, path, **kw)
    assert size == path.stat().st_size
    return torchslim.load(path), path


def assert_same_outputs(a, b, x):
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------

def test_dense_mlp_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))
    loaded, _ = roundtrip(model, tmp_path)
    assert isinstance(loaded, nn.Sequential) and [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[4].bias is None
    assert_same_outputs(model, loaded, torch.randn(5, 13))
    assert not loaded.training


@pytest.mark.parametrize("codec", ["auto", "none", "zlib", "lzma"])
def test_masked_roundtrip_and_compact(tmp_path, codec):
    torch.manual_seed(1)
    model = nn.Sequential(masked_layer(300, 200, 0.08, seed=1), nn.ReLU(), masked_layer(200, 10, 0.3, seed=2))
    # Masked-out weights keep arbitrary values in `weight`; they must not matter.
    loaded, path = roundtrip(model, tmp_path, codec=codec)
    assert isinstance(loaded[0], MaskedSparseLinear)
    assert torch.equal(loaded[0].mask, model[0].mask) and torch.equal(loaded[2].mask, model[2].mask)
    assert_same_outputs(model, loaded, torch.randn(4, 300))
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    nnz = int(model[0].mask.sum() + model[2].mask.sum())
    # values (4 B) + about one byte of position per kept weight + biases + header
    assert path.stat().st_size < 4 * nnz + 1.6 * nnz + 4 * 210 + 2048
    assert path.stat().st_size < dense_bytes / 8


def test_masked_edge_cases(tmp_path):
    # empty rows, a full row, an all-pruned layer, wide gaps (multi-byte varints), 1x1
    lin = nn.Linear(1000, 4)
    mask = torch.zeros(4, 1000, dtype=torch.bool)
    mask[0, [0, 999]] = True
    mask[2, :] = True
    layer = MaskedSparseLinear.from_dense(lin, mask=mask)
    model = nn.Sequential(layer, nn.ReLU(), MaskedSparseLinear.from_dense(nn.Linear(4, 1), mask=torch.zeros(1, 4, dtype=torch.bool)),
                          MaskedSparseLinear.from_dense(nn.Linear(1, 1)))
    loaded, _ = roundtrip(model, tmp_path)
    assert torch.equal(loaded[0].mask, mask)
    assert_same_outputs(model, loaded, torch.randn(3, 1000))


@pytest.mark.parametrize("k,zero_pinned,density", [(16, False, 1.0), (8, True, 0.1), (16, True, 0.9), (64, False, 1.0),
                                                   (256, True, 0.05), (2, False, 1.0)])
def test_codebook_roundtrip(tmp_path, cb_cls, k, zero_pinned, density):
    model = nn.Sequential(make_codebook_layer(cb_cls, 37, 21, k, zero_pinned, density=density, seed=k),
                          nn.LeakyReLU(0.05), make_codebook_layer(cb_cls, 21, 5, k, zero_pinned, density=density, seed=k + 1))
    loaded, path = roundtrip(model, tmp_path)
    for a, b in ((model[0], loaded[0]), (model[2], loaded[2])):
        assert isinstance(b, cb_cls)
        assert b.indices.dtype == torch.uint8 and b.indices.shape == a.indices.shape
        assert torch.equal(b.indices, a.indices) and torch.equal(b.codebook, a.codebook)
        assert b.zero_pinned == zero_pinned
    assert loaded[1].negative_slope == 0.05
    assert_same_outputs(model, loaded, torch.randn(6, 37))


def test_pruned_and_shared_layer_stored_sparse(tmp_path, cb_cls):
    layer = make_codebook_layer(cb_cls, 784, 300, 16, zero_pinned=True, density=0.08)
    size = torchslim.save(nn.Sequential(layer), tmp_path / "m")
    dense_fp32 = 4 * 784 * 300
    header = _file_header(tmp_path / "m")
    assert header["layers"]["0"]["enc"] == "sparse"
    # 8% kept: position (~5 bits entropy) + 4-bit code each, vs 32 bits per dense weight
    assert dense_fp32 / size > 35
    loaded = torchslim.load(tmp_path / "m")
    assert_same_outputs(nn.Sequential(layer), loaded, torch.randn(2, 784))


def test_global_codebook_stored_once_and_shared(tmp_path, cb_cls):
    shared = nn.Parameter(torch.linspace(-1, 1, 16))
    l1 = make_codebook_layer(cb_cls, 20, 10, 16, codebook=shared, seed=3)
    l2 = make_codebook_layer(cb_cls, 10, 4, 16, codebook=shared, seed=4)
    assert l1.codebook is l2.codebook
    model = nn.Sequential(l1, nn.ReLU(), nn.Sequential(l2, nn.Sigmoid()))
    loaded, path = roundtrip(model, tmp_path)
    assert loaded[0].codebook is loaded[2][0].codebook
    assert isinstance(loaded[0].codebook, nn.Parameter)
    assert len(list(loaded.parameters())) == 3  # one codebook + two biases
    header = _file_header(path)
    assert list(header["codebooks"]) == ["cb0"]
    assert [k for k in header["tensors"] if "codebook" in k] == ["__ts__/codebook/cb0"]
    assert_same_outputs(model, loaded, torch.randn(3, 20))


def test_batchnorm_nested_and_misc_layers(tmp_path):
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(8)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(12, 8), bn, nn.GELU(approximate="tanh"), nn.Dropout(0.25)),
        nn.Sequential(nn.Sequential(masked_layer(8, 6, 0.5), nn.ELU(0.7)), nn.Identity()),
        nn.BatchNorm1d(6, affine=False),
        nn.Linear(6, 3), nn.LogSoftmax(dim=1),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 4))  # move the running statistics
    loaded, _ = roundtrip(model, tmp_path)
    assert loaded[1][1].num_batches_tracked.item() == 3
    assert loaded[1][3].p == 0.25 and loaded[1][2].approximate == "tanh"
    assert_same_outputs(model, loaded, torch.randn(5, 3, 4))


def test_named_sequential_children(tmp_path):
    from collections import OrderedDict
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 3), act=nn.ReLU(), fc2=nn.Linear(3, 2)))
    loaded, _ = roundtrip(model, tmp_path)
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_float64_model(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4).double(), nn.ReLU(), MaskedSparseLinear.from_dense(nn.Linear(4, 2).double()))
    loaded, _ = roundtrip(model, tmp_path)
    assert loaded[0].weight.dtype == torch.float64 and loaded[2].weight.dtype == torch.float64
    assert_same_outputs(model, loaded, torch.randn(3, 5, dtype=torch.float64))


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_any_module_saves_but_needs_a_skeleton(tmp_path):
    # A module outside the Sequential whitelist: saved (manifest + state_dict), but the file
    # carries no architecture, so load() alone refuses and load(model=) works.
    model = nn.Sequential(masked_layer(6, 4, 0.5), _Custom())
    torchslim.save(model, tmp_path / "m")
    assert _file_header(tmp_path / "m")["arch"] is None
    with pytest.raises(ValueError, match="model="):
        torchslim.load(tmp_path / "m")
    loaded = torchslim.load(tmp_path / "m", model=nn.Sequential(nn.Linear(6, 4), _Custom()))
    assert isinstance(loaded[0], MaskedSparseLinear)
    assert_same_outputs(model, loaded, torch.randn(3, 6))
    with pytest.raises(ValueError, match="codec"):
        torchslim.save(nn.Linear(2, 2), tmp_path / "m", codec="brotli")


def test_no_pickle_in_file(tmp_path):
    path = tmp_path / "m"
    torchslim.save(nn.Sequential(masked_layer(20, 10, 0.5)), path)
    data = path.read_bytes()
    assert b"\x80\x04" not in data[:16] and not data.startswith(b"PK")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:  # a standard safetensors file
        assert "torchslim" in f.metadata()


# --------------------------------------------------------------------------------------
# to_dense
# --------------------------------------------------------------------------------------

def test_to_dense_equivalence(cb_cls):
    torch.manual_seed(3)
    cb = make_codebook_layer(cb_cls, 16, 8, 16, zero_pinned=True, density=0.5)
    model = nn.Sequential(masked_layer(10, 16, 0.3), nn.ReLU(), nn.Sequential(cb, nn.Tanh()), nn.Linear(8, 2))
    dense = torchslim.to_dense(model)
    assert isinstance(model[0], MaskedSparseLinear)  # input untouched
    kinds = [type(m) for m in dense.modules()]
    assert MaskedSparseLinear not in kinds and cb_cls not in kinds
    assert type(dense[0]) is nn.Linear and type(dense[2][0]) is nn.Linear
    assert int((dense[0].weight != 0).sum()) == int((model[0].weight * model[0].mask != 0).sum())
    x = torch.randn(7, 10)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
    single = torchslim.to_dense(masked_layer(5, 3, 0.5))
    assert type(single) is nn.Linear


# --------------------------------------------------------------------------------------
# hostile files
# --------------------------------------------------------------------------------------

def _model_bytes(cb_cls=None):
    layers = [masked_layer(40, 30, 0.2), nn.ReLU(), nn.Linear(30, 12), nn.BatchNorm1d(12)]
    if cb_cls is not None:
        layers += [make_codebook_layer(cb_cls, 12, 6, 16, zero_pinned=True, density=0.1), nn.ReLU(),
                   make_codebook_layer(cb_cls, 6, 3, 64)]
    return tio.save_to_bytes(nn.Sequential(*layers), codec="none")


def _file_header(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["torchslim"])


def _split(data: bytes):
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    return header, data[8 + hlen:]


def _sign(header: dict) -> dict:
    """Recompute the header checksum (a mutation that keeps the checksums consistent, so
    that the field checks behind them are what is tested)."""
    import zlib
    text = header["__metadata__"].get("torchslim")
    if text is not None:
        header["__metadata__"]["torchslim_crc32"] = str(zlib.crc32(text.encode()) & 0xFFFFFFFF)
    return header


def _resave(data: bytes, mutate_meta=None, mutate_tensors=None) -> bytes:
    """Re-serialise a file after editing its header and/or tensors, with every checksum and
    the tensor table recomputed (a self-consistent hostile file)."""
    from safetensors.torch import load as st_load, save as st_save
    header, _ = _split(data)
    meta = json.loads(header["__metadata__"]["torchslim"])
    tensors = st_load(data)
    if mutate_tensors is not None:
        mutate_tensors(tensors)
    if mutate_meta is not None:
        mutate_meta(meta)
    meta["tensors"] = {n: [str(t.dtype).removeprefix("torch."), list(t.shape), tio._tensor_crc(t)] for n, t in tensors.items()}
    text = json.dumps(meta)
    import zlib
    return st_save(tensors, metadata={"torchslim": text, "torchslim_crc32": str(zlib.crc32(text.encode()) & 0xFFFFFFFF)})


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _with_meta(data: bytes, mutate) -> bytes:
    header, body = _split(data)
    meta = json.loads(header["__metadata__"]["torchslim"])
    mutate(meta)
    header["__metadata__"]["torchslim"] = json.dumps(meta)
    return _join(_sign(header), body)


def _load_raises(data: bytes, match: str | None = None):
    with pytest.raises(ValueError, match=match):
        tio.load_bytes(data)


def test_truncated_files_raise(tmp_path, cb_cls):
    data = _model_bytes(cb_cls)
    tio.load_bytes(data)  # the intact file loads
    for cut in [0, 4, 8, 12, 100, len(data) // 2, len(data) - 1]:
        _load_raises(data[:cut])
    path = tmp_path / "t"
    path.write_bytes(data[:len(data) - 3])
    with pytest.raises(ValueError):
        torchslim.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        torchslim.load(tmp_path / "missing")


def test_flipped_bytes_raise_valueerror_or_load_consistently(cb_cls):
    data = _model_bytes(cb_cls)
    (hlen,) = struct.unpack("<Q", data[:8])
    rng = np.random.default_rng(0)
    # Header bytes: every flip must give a ValueError (or, rarely, a still-valid file).
    for pos in rng.integers(0, 8 + hlen, size=150):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            tio.load_bytes(bytes(bad))
        except ValueError:
            pass
    # Stream bytes (indices, row counts) must also never escape as anything but ValueError.
    for pos in rng.integers(8 + hlen, len(data), size=150):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        try:
            tio.load_bytes(bytes(bad))
        except ValueError:
            pass


def test_bad_json_and_unknown_types():
    data = _model_bytes()
    header, body = _split(data)
    header["__metadata__"]["torchslim"] = "{not json"
    _load_raises(_join(header, body), "checksum")  # unsigned edit: the checksum catches it
    _load_raises(_join(_sign(header), body), "corrupt header")
    header["__metadata__"]["torchslim"] = json.dumps({"format": "other"})
    _load_raises(_join(_sign(header), body), "not a torchslim file")
    _load_raises(_with_meta(data, lambda m: m.update(version=99)), "version")

    def unknown(m):
        m["arch"]["children"][1][1]["type"] = "os.system"
    _load_raises(_with_meta(data, unknown), "unknown layer type")

    def unknown_layer(m):
        m["layers"]["0"]["type"] = "os.system"
    _load_raises(_with_meta(data, unknown_layer), "unknown layer type")

    def extra_field(m):
        m["arch"]["children"][2][1]["evil"] = 1
    _load_raises(_with_meta(data, extra_field), "fields")

    def extra_layer_field(m):
        m["layers"]["0"]["evil"] = 1
    _load_raises(_with_meta(data, extra_layer_field), "fields")
    header["__metadata__"]["torchslim"] = "[" * 100_000 + "]" * 100_000  # nesting bomb
    _load_raises(_join(_sign(header), body), "corrupt header")
    del header["__metadata__"]
    _load_raises(_join(header, body), "not a torchslim file")
    _load_raises(b"\x00" * 64)
    bomb = b"[" * 100_000
    _load_raises(struct.pack("<Q", len(bomb)) + bomb, "corrupt safetensors container")
    _load_raises(struct.pack("<Q", 1 << 62) + b"{}")


def test_oversize_shapes_raise_without_allocating():
    data = _model_bytes()

    def huge_linear(m):
        m["arch"]["children"][2][1].update({"in": 1 << 30, "out": 1 << 30})
    _load_raises(_with_meta(data, huge_linear), "limit|shape")

    def huge_sparse(m):  # masked layers may legitimately hold few values: the cap must bite
        m["layers"]["0"].update({"in": (1 << 31) - 1})
    _load_raises(_with_meta(data, huge_sparse), "elements|limit")

    def wrong_width(m):
        m["arch"]["children"][2][1]["in"] = 31
    _load_raises(_with_meta(data, wrong_width), "shape")

    def huge_bn(m):
        m["arch"]["children"][3][1]["num_features"] = 1 << 31
    _load_raises(_with_meta(data, huge_bn))

    def bad_nnz(m):
        m["layers"]["0"]["nnz"] += 1
    _load_raises(_with_meta(data, bad_nnz), "shape|nnz")

    # the safetensors container itself declaring a huge tensor
    header, body = _split(data)
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    header[name]["shape"] = [1 << 20, 1 << 20]
    _load_raises(_join(header, body), "corrupt safetensors container")


def test_out_of_range_indices_raise(cb_cls):
    # codebook index >= k in a dense 64-cluster layer (a self-consistent file: checksums redone)
    layer = make_codebook_layer(cb_cls, 6, 3, 64)
    data = tio.save_to_bytes(nn.Sequential(layer), codec="none")

    def shrink_k(m):
        m["layers"]["0"]["k"] = 20
        m["codebooks"]["cb0"]["k"] = 20

    def shrink_cb(t):
        t["__ts__/codebook/cb0"] = torch.randn(20)
    _load_raises(_resave(data, shrink_k, shrink_cb), "out of range")

    # column index past in_features in a sparse layer: a row whose gaps overflow
    lin = nn.Linear(10, 2)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 9] = True
    data = tio.save_to_bytes(nn.Sequential(MaskedSparseLinear.from_dense(lin, mask=mask)), codec="none")

    def narrow(m):
        m["layers"]["0"]["in"] = 9
    _load_raises(_with_meta(data, narrow), "shape|out of range")


def test_decompression_bomb_rejected():
    import zlib
    bomb = zlib.compress(b"\x00" * (50 << 20), 9)  # 50 MiB of zeros in ~50 KiB
    assert len(bomb) < 100_000
    with pytest.raises(ValueError):
        tio._decompress(bomb, "zlib", 1000, "codes")
    with pytest.raises(ValueError):
        tio._decompress(b"garbage", "lzma", 10, "codes")
    with pytest.raises(ValueError):
        tio._decompress(b"garbage", "brotli", 10, "codes")


def test_varint_roundtrip_and_errors():
    v = np.array([0, 1, 127, 128, 300, 16383, 16384, (1 << 31) - 1], dtype=np.int64)
    enc = tio._varint_encode(v)
    np.testing.assert_array_equal(tio._varint_decode(enc, len(v), "x"), v)
    with pytest.raises(ValueError):
        tio._varint_decode(enc, len(v) + 1, "x")
    with pytest.raises(ValueError):
        tio._varint_decode(enc[:-1], len(v), "x")  # ends mid-value
    with pytest.raises(ValueError):
        tio._varint_decode(b"\x80" * 9 + b"\x01", 1, "x")  # too long


def test_to_sparse_equivalence(cb_cls):
    torch.manual_seed(4)
    pinned = make_codebook_layer(cb_cls, 30, 20, 16, zero_pinned=True, density=0.2, seed=5)
    plain = make_codebook_layer(cb_cls, 20, 6, 8, seed=6)
    model = nn.Sequential(pinned, nn.ReLU(), plain)
    sparse = tio.to_sparse(model)
    assert isinstance(model[0], cb_cls)  # input untouched
    assert isinstance(sparse[0], MaskedSparseLinear) and isinstance(sparse[2], MaskedSparseLinear)
    assert int(sparse[0].mask.sum()) == int((unpack_int4(pinned.indices, 30) != 0).sum())
    assert bool(sparse[2].mask.all())
    x = torch.randn(9, 30)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        tio.to_sparse("model")


# --------------------------------------------------------------------------------------
# format integrity (checksums, dtypes, RNG, names)
# --------------------------------------------------------------------------------------

def test_checksum_catches_a_flipped_float_byte():
    data = _model_bytes()
    header, body = _split(data)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start, _ = header[name]["data_offsets"]
    bad = bytearray(data)
    bad[len(data) - len(body) + start] ^= 0x01  # lowest mantissa bit: a valid, different float
    _load_raises(bytes(bad), "checksum")


def test_tensor_table_must_match_the_container():
    data = _model_bytes()

    def drop(m):
        m["tensors"]["0.bias"] = ["float32", [30], 0]  # claimed, not present

    def fake_table(t):
        pass
    bad = _resave(data, mutate_tensors=fake_table)
    tio.load_bytes(bad)  # a faithful re-save loads
    header, body = _split(bad)
    meta = json.loads(header["__metadata__"]["torchslim"])
    drop(meta)
    header["__metadata__"]["torchslim"] = json.dumps(meta)
    _load_raises(_join(_sign(header), body), "differ")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_batchnorm_and_every_plain_tensor_keep_their_dtype(tmp_path, dtype):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), MaskedSparseLinear.from_dense(nn.Linear(5, 3)))
    model.train()
    model(torch.randn(8, 6))
    model = model.to(dtype).eval()
    loaded, _ = roundtrip(model, tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.randn(4, 6, dtype=dtype)
    if dtype == torch.float64:
        assert_same_outputs(model, loaded, x)


def test_load_consumes_no_random_numbers(tmp_path, cb_cls):
    model = nn.Sequential(masked_layer(20, 10, 0.3), nn.ReLU(), make_codebook_layer(cb_cls, 10, 4, 16),
                          make_codebook_layer(cb_cls, 4, 3, 8, zero_pinned=True, density=0.5))
    torchslim.save(model, tmp_path / "m")
    skeleton = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4), nn.Linear(4, 3))
    state = torch.random.get_rng_state()
    torchslim.load(tmp_path / "m")
    torchslim.load(tmp_path / "m", deploy=True)
    torchslim.load(tmp_path / "m", model=skeleton)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_child_names_must_match_fully():
    data = _model_bytes()

    def newline(m):
        m["arch"]["children"][1][0] = "1\n"
    _load_raises(_with_meta(data, newline), "invalid or duplicate child")


# --------------------------------------------------------------------------------------
# any nn.Module: manifest, ties, skeletons, strictness
# --------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    """Embedding + a body + a head tied to the embedding + a non-persistent buffer."""

    def __init__(self, vocab=20, hidden=12, ffn=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.body = nn.ModuleDict({"up": nn.Linear(hidden, ffn), "down": nn.Linear(ffn, hidden)})
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((hidden,), 0.5), persistent=False)

    def forward(self, ids):
        h = self.emb(ids) * self.scale
        h = h + self.body["down"](torch.relu(self.body["up"](h)))
        return self.head(self.norm(h))


def _tiny_pruned(seed=0, **kw):
    torch.manual_seed(seed)
    m = _Tiny(**kw)
    m.body["up"] = masked_layer(m.body["up"].in_features, m.body["up"].out_features, 0.3, seed=seed)
    m.body["down"] = masked_layer(m.body["down"].in_features, m.body["down"].out_features, 0.2, seed=seed + 1)
    return m.eval()


def test_any_module_roundtrip_ties_and_meta_skeleton(tmp_path):
    model = _tiny_pruned()
    torchslim.save(model, tmp_path / "m")
    header = _file_header(tmp_path / "m")
    assert header["ties"] == {"head.weight": "emb.weight"} and "scale" in header["extra"]
    assert sorted(header["layers"]) == ["body.down", "body.up"] and header["arch"] is None
    ids = torch.randint(0, 20, (3, 5))
    for skeleton in (_Tiny(), None):
        if skeleton is None:
            with torch.device("meta"):
                skeleton = _Tiny()
        loaded = torchslim.load(tmp_path / "m", model=skeleton)
        assert loaded is skeleton and not loaded.training
        assert isinstance(loaded.body["up"], MaskedSparseLinear)
        assert loaded.head.weight is loaded.emb.weight  # re-tied
        assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_skeleton_mismatches_give_one_error_listing_them(tmp_path):
    torchslim.save(_tiny_pruned(), tmp_path / "m")
    with pytest.raises(ValueError, match=r"problem\(s\).*shape mismatch") as exc:
        torchslim.load(tmp_path / "m", model=_Tiny(hidden=16))
    assert "emb.weight" in str(exc.value) and "norm.weight" in str(exc.value)  # several listed in one error
    missing = _Tiny()
    del missing.body["down"]
    with pytest.raises(ValueError, match="body.down.*names no module"):
        torchslim.load(tmp_path / "m", model=missing)
    extra = _Tiny()
    extra.more = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unexpected|missing key 'more.weight'"):
        torchslim.load(tmp_path / "m", model=extra)
    with pytest.raises(ValueError, match="dtype"):
        torchslim.load(tmp_path / "m", model=_Tiny().double())
    with pytest.raises(TypeError, match="model"):
        torchslim.load(tmp_path / "m", model="not a module")


def test_many_problems_are_counted(tmp_path):
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(15)])
    torchslim.save(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"30 problem\(s\).*and 20 more"):
        torchslim.load(tmp_path / "m", model=nn.Sequential(*[nn.Linear(4, 4) for _ in range(15)]))


def _tiny_bytes():
    return tio.save_to_bytes(_tiny_pruned(), codec="none")


def test_hostile_manifest_entries():
    data = _tiny_bytes()
    load = lambda bad, match: _raises_into(bad, match)  # noqa: E731

    def unknown_path(m):
        m["layers"]["body.sideways"] = m["layers"].pop("body.up")
    load(_with_meta(data, unknown_path), "names no module")

    def non_linear(m):
        m["layers"]["norm"] = m["layers"].pop("body.up")
    load(_with_meta(data, non_linear), "LayerNorm, not a linear layer")

    def bad_path(m):
        m["layers"]["body.up\n"] = m["layers"].pop("body.up")
    load(_with_meta(data, bad_path), "names no module")

    def wrong_types(m):
        m["layers"]["body.up"]["in"] = "12"
    load(_with_meta(data, wrong_types), "shape mismatch|invalid")

    def wrong_kind(m):
        m["layers"]["body.up"]["type"] = ["MaskedSparseLinear"]
    load(_with_meta(data, wrong_kind), "unknown layer type")

    def not_a_node(m):
        m["layers"]["body.up"] = 7
    load(_with_meta(data, not_a_node), "not a layer node")

    def from_conv1d(m):
        m["layers"]["body.up"]["from"] = "Conv1D"
    load(_with_meta(data, from_conv1d), "Conv1D")

    def layers_not_dict(m):
        m["layers"] = []
    load(_with_meta(data, layers_not_dict), "wrong field types")

    # a duplicated manifest path (JSON objects keep the last duplicate silently: refused)
    header, body = _split(data)
    text = header["__metadata__"]["torchslim"]
    entry = json.dumps(json.loads(text)["layers"]["body.up"])
    dup = text.replace('"layers":{', '"layers":{"body.up":' + entry + ",", 1)
    assert dup != text
    header["__metadata__"]["torchslim"] = dup
    load(_join(_sign(header), body), "duplicate key")


def _raises_into(bad: bytes, match: str):
    with pytest.raises(ValueError, match=match):
        tio.load_bytes(bad, model=_Tiny())


def test_max_numel_is_caller_raisable():
    lin = nn.Linear(6000, 3000, bias=False)
    mask = torch.zeros(3000, 6000, dtype=torch.bool)
    mask[::500, ::700] = True
    data = tio.save_to_bytes(nn.Sequential(MaskedSparseLinear.from_dense(lin, mask=mask)))
    assert len(data) < 10_000
    _load_raises(data, "max_numel")
    loaded = tio.load_bytes(data, max_numel=1 << 25)
    assert torch.equal(loaded[0].mask, mask)
    deployed = tio.load_bytes(data, deploy=True)  # no dense weight: within the default budget
    assert deployed[0].nnz == int(mask.sum())


# --------------------------------------------------------------------------------------
# deploy
# --------------------------------------------------------------------------------------

def _mlp(cb_cls):
    torch.manual_seed(7)
    return nn.Sequential(masked_layer(64, 48, 0.1, seed=1), nn.ReLU(), masked_layer(48, 40, 0.2, seed=2), nn.ReLU(),
                         nn.Dropout(0.1), masked_layer(40, 30, 0.7, seed=3), nn.Tanh(),
                         make_codebook_layer(cb_cls, 30, 20, 16, seed=4),
                         make_codebook_layer(cb_cls, 20, 10, 16, zero_pinned=True, density=0.3, seed=5)).eval()


def test_deploy_matches_and_holds_only_compressed_data(tmp_path, cb_cls):
    from torchslim.nn import (DeployedCodebookLinear, DeployedDenseLinear, DeployedSequential,
                              DeployedSparseCodebookLinear, DeployedSparseLinear)
    model = _mlp(cb_cls)
    x = torch.randn(5, 64)
    for dep in (torchslim.deploy(model), torchslim.load(*roundtrip(model, tmp_path)[1:], deploy=True)):
        assert isinstance(dep, DeployedSequential) and not dep.training
        assert [type(m) for m in dep] == [DeployedSparseLinear, nn.ReLU, DeployedSparseLinear, nn.ReLU, nn.Dropout,
                                          DeployedDenseLinear, nn.Tanh, DeployedCodebookLinear,
                                          DeployedSparseCodebookLinear]  # (small: sparse-codebook up to 0.4)
        assert len(list(dep.parameters())) == 0
        assert dep._runs[0][:2] == (0, 5)  # layers 0 and 2 (with their ReLUs, the Dropout) fused
        with torch.inference_mode():
            torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(dep[:4](x), model[:4](x), rtol=1e-5, atol=1e-6)
    assert isinstance(model[0], MaskedSparseLinear)  # the input is untouched
    # the sparse layers hold nnz values, not a dense [out, in] weight
    assert dep[0].values.numel() == int(model[0].mask.sum())


def test_deployed_layers_refuse_gradients(cb_cls):
    dep = torchslim.deploy(_mlp(cb_cls))
    layer = dep[0]
    with pytest.raises(RuntimeError, match="inference-only.*to_sparse"):
        layer.weight
    with pytest.raises(RuntimeError, match="inference-only"):
        layer.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        dep[7].requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        dep(torch.randn(2, 64, requires_grad=True))
    layer.values.requires_grad_(True)
    with pytest.raises(RuntimeError, match="'values' requires grad"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match="in_features"):
        dep[7](torch.randn(2, 31))


def test_deploy_under_inference_mode_and_compile(cb_cls):
    model = _mlp(cb_cls)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        dep = torchslim.deploy(model)
        ref = model(x)
        torch.testing.assert_close(dep(x), ref, rtol=1e-5, atol=1e-6)
        again = tio.load_bytes(tio.save_to_bytes(dep))
        torch.testing.assert_close(again(x), dep(x), rtol=0, atol=0)
    compiled = torch.compile(dep, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-6)


def test_deployed_forms_convert_back(cb_cls):
    model = _mlp(cb_cls)
    dep = torchslim.deploy(model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        dense = torchslim.to_dense(dep)
        assert type(dense) is nn.Sequential
        assert not any(isinstance(m, tuple(torchslim.nn.deployed.DEPLOYED_TYPES)) for m in dense.modules())
        torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-6)
        sparse = torchslim.to_sparse(dep)
        assert type(sparse) is torchslim.nn.SparseSequential
        assert isinstance(sparse[0], MaskedSparseLinear) and int(sparse[0].mask.sum()) == int(model[0].mask.sum())
        torch.testing.assert_close(sparse(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_deploy_keeps_the_layer_dtype(tmp_path, dtype):
    torch.manual_seed(9)
    model = nn.Sequential(masked_layer(300, 200, 0.1, seed=3), nn.ReLU(), masked_layer(200, 10, 0.2, seed=4)).to(dtype)
    x = torch.randn(2, 300, dtype=dtype)
    for dep in (torchslim.deploy(model), torchslim.load(roundtrip(model, tmp_path)[1], deploy=True)):
        with torch.inference_mode():
            y = dep(x)
            assert y.dtype == dtype
            torch.testing.assert_close(y, model(x), **({} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}))


def test_loaded_masked_layers_run_compiled(tmp_path):
    torch.manual_seed(10)
    model = nn.Sequential(masked_layer(300, 200, 0.1, seed=6), nn.ReLU(), masked_layer(200, 10, 0.2, seed=7)).eval()
    loaded, _ = roundtrip(model, tmp_path)
    x = torch.randn(1, 300)
    compiled = torch.compile(loaded, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert loaded[0].last_path == "sparse"


@pytest.mark.parametrize("make", [
    lambda: nn.ReLU(), lambda: nn.Sequential(), lambda: MaskedSparseLinear.from_dense(nn.Linear(5, 3)),
    lambda: MaskedSparseLinear.from_dense(nn.Linear(0, 3)), lambda: MaskedSparseLinear.from_dense(nn.Linear(3, 0)),
    lambda: torchslim.nn.CodebookLinear.from_dense(nn.Linear(7, 3), num_clusters=4),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Flatten(0, -1))])
def test_edge_models_roundtrip(make):
    torch.manual_seed(0)
    model = make()
    loaded = tio.load_bytes(tio.save_to_bytes(model))
    assert type(loaded) is type(model)
    width = model.in_features if hasattr(model, "in_features") else 3
    x = torch.randn(2, width)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_root_layer_into_a_skeleton_and_deployed():
    model = MaskedSparseLinear.from_dense(nn.Linear(5, 3))
    data = tio.save_to_bytes(model)
    loaded = tio.load_bytes(data, model=nn.Linear(5, 3, device="meta"))
    assert isinstance(loaded, MaskedSparseLinear)  # the root replaced: load returns the new module
    deployed = tio.load_bytes(data, model=nn.Linear(5, 3, device="meta"), deploy=True)
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        torch.testing.assert_close(deployed(x), model(x))


def test_save_and_load_under_inference_mode_give_trainable_models(tmp_path):
    model = nn.Sequential(masked_layer(40, 30, 0.2), nn.ReLU(), nn.Linear(30, 5))
    with torch.inference_mode():
        torchslim.save(model, tmp_path / "m")
        loaded = torchslim.load(tmp_path / "m")
        into = torchslim.load(tmp_path / "m", model=nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)))
    assert not any(t.is_inference() for m in (loaded, into) for t in list(m.parameters()) + list(m.buffers()))
    x = torch.randn(3, 40)
    for m in (loaded, into):
        m.train()
        m(x).sum().backward()  # outside inference_mode: a training step works
        assert m[0].weight.grad is not None and bool((m[0].weight.grad[~m[0].mask] == 0).all())
        with torch.inference_mode():
            assert torch.equal(m(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_deployed_layers_follow_dtype_changes(dtype):
    model = nn.Sequential(masked_layer(300, 200, 0.1, seed=8)).eval()
    dep = torchslim.deploy(model).to(dtype)
    assert dep[0].dtype == dtype and dep[0].values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(2, 300, dtype=dtype)
    with torch.inference_mode():
        y = dep(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, model.to(dtype)(x), **({} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}))
