"""Data sets for the pipeline and the benchmarks: scikit-learn's digits (bundled, no
download), MNIST IDX folders (gz or raw), .npz and .csv files — as float32 features in
[0, 1]-ish scale and int64 labels, split deterministically by seed."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max().item(), self.y_test.max().item())) + 1


def load_digits_arrays():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = int(np.prod(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"{path}: header declares {dims} = {expected} bytes of data, file holds {body.size}")
    return body.reshape(dims)


def load_mnist_idx_arrays(folder: str | Path):
    """Images and labels from a folder holding one *-images-idx3-ubyte[.gz] and one
    *-labels-idx1-ubyte[.gz] file (e.g. the MNIST t10k pair)."""
    folder = Path(folder)
    images = sorted(folder.glob("*images-idx3-ubyte*"))
    labels = sorted(folder.glob("*labels-idx1-ubyte*"))
    if len(images) != 1 or len(labels) != 1:
        raise ValueError(f"{folder}: expected exactly one *images-idx3-ubyte[.gz] and one *labels-idx1-ubyte[.gz] file, "
                         f"found {[p.name for p in images]} and {[p.name for p in labels]}")
    x = _read_idx(images[0])
    y = _read_idx(labels[0])
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{folder}: images {x.shape} and labels {y.shape} do not match")
    return x.reshape(x.shape[0], -1).astype(np.float32) / 255.0, y.astype(np.int64)


def _load_npz(path: Path):
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            return (z["x_train"], z["y_train"], z["x_test"], z["y_test"])
        if {"X", "y"} <= keys:
            return z["X"], z["y"]
        raise ValueError(f"{path}: .npz must hold X and y, or x_train, y_train, x_test and y_test; it holds {sorted(keys)}")


def _load_csv(path: Path):
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: a .csv needs at least one feature column and the label as last column")
    return table[:, :-1], table[:, -1]


def _to_split(x_train, y_train, x_test, y_test, name) -> Split:
    def feats(a):
        a = np.asarray(a, dtype=np.float32)
        return torch.from_numpy(a.reshape(a.shape[0], -1).copy())

    def labels(a):
        a = np.asarray(a)
        if not np.all(np.equal(np.mod(a, 1), 0)) or (a.size and a.min() < 0):
            raise ValueError(f"{name}: labels must be non-negative integers")
        return torch.from_numpy(a.astype(np.int64).reshape(-1).copy())

    split = Split(feats(x_train), labels(y_train), feats(x_test), labels(y_test), name)
    if split.x_train.shape[0] != split.y_train.shape[0] or split.x_test.shape[0] != split.y_test.shape[0]:
        raise ValueError(f"{name}: features and labels have different numbers of rows")
    if split.x_train.shape[1] != split.x_test.shape[1]:
        raise ValueError(f"{name}: train and test features differ in width")
    return split


def load_dataset(path: str | Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """Load a data set and split it deterministically.

    path None: scikit-learn's digits (8x8 images, 10 classes). A folder: MNIST IDX files.
    A .npz: X and y (split here) or x_train/y_train/x_test/y_test (used as given). A .csv:
    features then the label in the last column. ``test_fraction`` of the rows (shuffled
    with ``seed``) become the test set; MNIST's 10k test set gives the 8k/2k split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if path is None:
        x, y = load_digits_arrays()
        name = "digits"
    else:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"data path {p} does not exist")
        if p.is_dir():
            x, y = load_mnist_idx_arrays(p)
        elif p.suffix == ".npz":
            arrays = _load_npz(p)
            if len(arrays) == 4:
                return _to_split(*arrays, p.name)
            x, y = arrays
        elif p.suffix == ".csv":
            x, y = _load_csv(p)
        else:
            raise ValueError(f"data path {p}: expected a folder of MNIST IDX files, a .npz or a .csv")
        name = p.name
    n = len(x)
    if n < 2:
        raise ValueError(f"{name}: need at least 2 samples, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return _to_split(x[train], y[train], x[test], y[test], name)
