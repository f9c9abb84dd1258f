"""Byte-level codecs of the torchslim file format: LEB128 varints, 4-bit nibble packing,
optional entropy coding (zlib / raw LZMA2) and crc32 checksums.

Every decoder here is bounded by the caller's declared sizes: it never produces more than
it was told to expect (no decompression bombs), and decodes into 32-bit arrays (the format
bounds every count and gap below 2**31), so a hostile stream cannot make it allocate int64
temporaries of its own choosing.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

__all__ = ["CODECS", "compress", "decompress", "varint_encode", "varint_decode", "nibble_pack", "nibble_unpack",
           "crc32"]

CODECS = ("none", "zlib", "lzma")

# Raw LZMA2: the decoder's dictionary size is ours, never the file's.
_LZMA_DICT = 1 << 20
_LZMA_DECODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": _LZMA_DICT}]
_LZMA_ENCODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": _LZMA_DICT}]

# Values a varint may carry: counts and gaps are < 2**31 (5 bytes of 7 bits at most).
VARINT_MAX = (1 << 31) - 1


def crc32(data) -> int:
    """zlib's crc32 of a bytes-like object (a memoryview of a tensor's bytes works)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, high bit set on every byte but a value's last."""
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


def varint_decode(data: bytes, count: int, what: str, max_bytes: int = 5) -> np.ndarray:
    """Decode exactly ``count`` varints from ``data`` into an int32 array; every value must
    be at most ``VARINT_MAX`` (so at most 5 bytes long)."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (count == 0 and b.size):
        raise ValueError(f"{what}: varint stream holds {ends.size} values in {b.size} bytes, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > max_bytes:
        raise ValueError(f"{what}: varint longer than {max_bytes} bytes")
    starts = ends - lengths + 1
    values = np.zeros(count, dtype=np.uint32)
    for k in range(int(lengths.max())):
        sel = lengths > k
        chunk = (b[starts[sel] + k] & 0x7F).astype(np.uint32)
        if k == 4 and int(chunk.max()) > 0x07:  # bits 28..34: only 3 of them fit below 2**31
            raise ValueError(f"{what}: varint value exceeds {VARINT_MAX}")
        values[sel] |= chunk << np.uint32(7 * k)
    return values.view(np.int32)


def nibble_pack(codes: np.ndarray) -> bytes:
    """Values < 16, two per byte: element 2i in the low nibble of byte i, 2i+1 in the high."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, dtype=np.uint8)])
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8).tobytes()


def nibble_unpack(raw: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    both = np.empty(2 * b.size, dtype=np.uint8)
    both[0::2] = b & 0x0F
    both[1::2] = b >> 4
    return both[:count]


def compress(raw: bytes, codec: str) -> tuple[str, bytes]:
    """(codec used, data); ``"auto"`` keeps the smallest of none / zlib / lzma."""
    if codec == "none":
        return "none", raw
    if codec == "zlib":
        return "zlib", zlib.compress(raw, 9)
    if codec == "lzma":
        return "lzma", lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_ENCODE_FILTERS)
    if codec == "auto":
        best = ("none", raw)
        for c in ("zlib", "lzma"):
            cand = compress(raw, c)
            if len(cand[1]) < len(best[1]):
                best = cand
        return best
    raise ValueError(f"codec must be one of 'auto', 'none', 'zlib', 'lzma', got {codec!r}")


def decompress(data: bytes, codec: str, n: int, what: str) -> bytes:
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
