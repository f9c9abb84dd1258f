"""Deterministic 1-D k-means for weight sharing.

The values are sorted once; in one dimension every k-means cluster is then a contiguous run
of the sorted array, bounded by the midpoints between neighbouring centroids. A Lloyd step
therefore costs ``K`` binary searches (``numpy.searchsorted``) plus ``K`` differences of a
float64 prefix-sum array, independent of the number of values, and the whole fit is
dominated by the single sort and the final labelling pass (NumPy, on the CPU; tensors on
another device are copied over and the labels copied back).

Initialisations (Han et al., "Deep Compression", section 3.1, compare the first three):
- ``"linear"``: centroids evenly spaced between the minimum and the maximum (the paper's
  best: large weights keep their own centroids);
- ``"density"``: centroids at evenly spaced quantiles of the empirical CDF;
- ``"kmeans++"``: Arthur & Vassilvitskii's D^2 seeding (on an evenly spaced quantile sample
  of at most 65,536 values when there are more, then Lloyd on all values);
- ``"random"``: K values drawn uniformly from the data (Forgy).

Results depend only on the values, ``num_clusters``, ``init`` and ``seed`` (the random inits
draw from a ``torch.Generator`` seeded with ``seed``; "linear" and "density" use no
randomness). A cluster that becomes empty is re-seeded at the upper half of the cluster with
the largest squared error, so no centroid is wasted while the data has more distinct values
than ``num_clusters``; with ``num_clusters`` or fewer distinct values the distinct values
themselves are returned (the codebook is padded by repeating the largest), with zero error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INITS = ("linear", "density", "kmeans++", "random")
_KMEANSPP_SAMPLE = 65536


@dataclass(eq=False)
class KMeansResult:
    """``centroids``: float64 [K], ascending. ``labels``: int64, same shape as the input,
    index of each value's nearest centroid (None when not asked for). ``inertia``: sum of
    squared errors, computed on first access (until then the result holds the sorted
    values). ``iterations``: Lloyd steps run. ``converged``: the assignment stopped changing."""

    centroids: torch.Tensor
    labels: torch.Tensor | None
    _inertia: object  # float, or a callable computing it on first use
    iterations: int
    converged: bool

    @property
    def inertia(self) -> float:
        if callable(self._inertia):
            self._inertia = float(self._inertia())
        return self._inertia


def _check_args(values, num_clusters, init, max_iter):
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex() or not (values.is_floating_point() or values.dtype in
                                    (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"values must be a real floating-point or integer tensor, got dtype {values.dtype}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(repr(i) for i in INITS)}, got {init!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    if values.numel() == 0:
        raise ValueError("values is empty: k-means needs at least one value")


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    """Flattened values as float32 (float64 stays float64; bf16/fp16/ints convert exactly)."""
    t = values.detach().reshape(-1)
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    return t.cpu().numpy()


def _initial_centroids(x: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """x: sorted values. Returns k float64 centroids (not necessarily distinct)."""
    n = x.size
    if init == "linear":
        return np.linspace(float(x[0]), float(x[-1]), k)
    if init == "density":
        q = (np.arange(k) + 0.5) / k
        return x[np.minimum((q * n).astype(np.int64), n - 1)].astype(np.float64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if init == "random":
        # Forgy: k values drawn uniformly (with replacement; a repeated draw leaves a cluster
        # empty, which Lloyd re-seeds).
        pick = torch.randint(n, (k,), generator=gen).numpy()
        return x[pick].astype(np.float64)
    # kmeans++ on an evenly spaced quantile sample (the sorted array keeps the distribution).
    if n > _KMEANSPP_SAMPLE:
        sample = x[np.round(np.linspace(0, n - 1, _KMEANSPP_SAMPLE)).astype(np.int64)]
    else:
        sample = x
    sample = sample.astype(np.float64)
    u = torch.rand(k, generator=gen, dtype=torch.float64).numpy()
    chosen = [float(sample[min(int(u[0] * sample.size), sample.size - 1)])]
    d2 = (sample - chosen[0]) ** 2
    for i in range(1, k):
        cdf = np.cumsum(d2)
        if cdf[-1] <= 0.0:
            # Every sample value is already a centroid: duplicates are re-seeded by Lloyd.
            chosen.append(chosen[-1])
            continue
        j = min(int(np.searchsorted(cdf, u[i] * cdf[-1], side="right")), sample.size - 1)
        chosen.append(float(sample[j]))
        np.minimum(d2, (sample - chosen[-1]) ** 2, out=d2)
    return np.asarray(chosen, dtype=np.float64)


class _Sorted:
    """Sorted values with float64 prefix sums of x and x^2: any contiguous run's count, sum
    and squared error in O(1)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n = x.size
        self.p = np.empty(self.n + 1)
        self.p[0] = 0.0
        np.cumsum(x, dtype=np.float64, out=self.p[1:])
        self._q = None

    @property
    def q(self) -> np.ndarray:
        # Prefix sums of x^2, built on first use (only re-seeding needs them).
        if self._q is None:
            xd = self.x.astype(np.float64)
            np.multiply(xd, xd, out=xd)
            self._q = np.empty(self.n + 1)
            self._q[0] = 0.0
            np.cumsum(xd, out=self._q[1:])
        return self._q

    def bounds(self, c: np.ndarray) -> np.ndarray:
        # Midpoints rounded to the data's dtype, so that segments and labels agree exactly.
        return ((c[1:] + c[:-1]) * 0.5).astype(self.x.dtype)

    def segments(self, c: np.ndarray):
        """Ascending centroids -> (starts, ends) of each cluster's run; a value equal to a
        midpoint belongs to the upper cluster."""
        cuts = np.searchsorted(self.x, self.bounds(c), side="left")
        return np.concatenate(([0], cuts)), np.concatenate((cuts, [self.n]))

    def stats(self, s, e):
        return e - s, self.p[e] - self.p[s]

    def sse(self, s, e):
        cnt, sm = self.stats(s, e)
        return np.maximum(self.q[e] - self.q[s] - sm * sm / np.maximum(cnt, 1), 0.0)


def kmeans_1d(values: torch.Tensor, num_clusters: int, init: str = "linear", seed: int = 0,
              max_iter: int = 300, return_labels: bool = True) -> KMeansResult:
    """Cluster the entries of ``values`` (any shape, any device) into ``num_clusters``.

    Lloyd iterations run on the sorted values until the assignment stops changing or after
    ``max_iter`` steps (with many clusters on smooth data Lloyd converges slowly; "kmeans++"
    starts closest to the optimum). The work is done on the CPU; ``labels`` come back on the
    device of ``values``. Raises ValueError for NaN/inf, an empty tensor, ``num_clusters`` < 1
    or an unknown ``init``. ``return_labels=False`` skips the final labelling pass (use
    ``assign`` later, e.g. against the codebook once cast to the layer's dtype).
    """
    _check_args(values, num_clusters, init, max_iter)
    k = num_clusters
    flat = _to_numpy(values)
    if not np.isfinite(flat).all():
        raise ValueError("values contains NaN or inf; k-means needs finite values")
    x = np.sort(flat)

    def result(c, labels, inertia, it, conv):
        lab = None
        if return_labels:
            lab = torch.from_numpy(labels().astype(np.int64, copy=False)).view(values.shape).to(values.device)
        return KMeansResult(torch.from_numpy(np.ascontiguousarray(c, dtype=np.float64)), lab, inertia, it, conv)

    distinct = int(np.count_nonzero(x[1:] != x[:-1])) + 1
    if distinct <= k:
        c = np.unique(x).astype(np.float64)
        # searchsorted(side="left") maps a value equal to c[i] to i: exact, zero error.
        distinct_values = c.astype(x.dtype)
        if c.size < k:
            c = np.concatenate([c, np.full(k - c.size, c[-1])])
        return result(c, lambda: np.searchsorted(distinct_values, flat, side="left"), 0.0, 0, True)

    data = _Sorted(x)
    c = np.sort(_initial_centroids(x, k, init, seed))
    s, e = data.segments(c)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        cnt, sm = data.stats(s, e)
        empty = cnt == 0
        c = np.where(empty, c, sm / np.maximum(cnt, 1))
        if empty.any():
            c = _reseed_empty(data, c, s, e, empty)
        c = np.sort(c)
        s2, e2 = data.segments(c)
        if np.array_equal(s2, s):
            converged = True
            break
        s, e = s2, e2

    # Final centroids are the means of the final clusters (an empty one keeps its value).
    cnt, sm = data.stats(s, e)
    c = np.sort(np.where(cnt == 0, c, sm / np.maximum(cnt, 1)))
    s, e = data.segments(c)
    cnt, sm = data.stats(s, e)

    def inertia():
        return np.maximum(data.q[e] - data.q[s] - 2 * c * sm + cnt * c * c, 0.0).sum()

    bounds = data.bounds(c)
    return result(c, lambda: np.searchsorted(bounds, flat, side="right"), inertia, it, converged)


def _reseed_empty(data: _Sorted, c: np.ndarray, s, e, empty) -> np.ndarray:
    """Move each empty cluster's centroid to the mean of the upper half of the non-empty
    cluster with the largest squared error (which keeps the mean of its lower half)."""
    c = c.copy()
    cnt, sm = data.stats(s, e)
    sse = np.where(empty, 0.0, data.sse(s, e))
    for j_empty in np.flatnonzero(empty):
        j = int(np.argmax(sse))
        if sse[j] <= 0.0:
            break
        a, b = int(s[j]), int(e[j])
        mean = sm[j] / (b - a)
        p = a + int(np.searchsorted(data.x[a:b], mean, side="right"))
        sse[j] = 0.0  # split at most once per step; the next Lloyd step re-evaluates
        if p <= a or p >= b:
            continue
        c[j] = (data.p[p] - data.p[a]) / (p - a)
        c[j_empty] = (data.p[b] - data.p[p]) / (b - p)
    return c


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``centroids`` for every entry of ``values``
    (int64, same shape and device as ``values``); a value on a midpoint goes up."""
    flat = _to_numpy(values)
    c = centroids.detach().to(torch.float64).cpu().numpy()
    bounds = ((c[1:] + c[:-1]) * 0.5).astype(flat.dtype)
    labels = np.searchsorted(bounds, flat, side="right")
    return torch.from_numpy(labels.astype(np.int64, copy=False)).view(values.shape).to(values.device)
