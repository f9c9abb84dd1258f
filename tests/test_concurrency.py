"""Thread safety, cache invalidation and determinism of the torchslim layers and ops.

Whatever a layer caches between calls (sparse structure, packed or decoded values) must
never be observable: every output equals the plain-PyTorch reference of the layer's current
state, whether the state changed through the API, by an in-place edit (with or without the
version counter moving), an optimizer step, a dtype change or load_state_dict, and whether
one thread or eight call the layer at once.
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from torchslim import ops
from torchslim.nn import CodebookLinear, KDLoss, MaskedSparseLinear
from torchslim.ops._reference import pack_int4, ref_codebook_linear, ref_kd_kl_div, ref_masked_linear

ops_torch = torch.ops.torchslim

IN, OUT = 67, 45
THREADS = 8
THREAD_TIMEOUT_S = 60


def _make(kind, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(IN, OUT)
    if kind.startswith("masked"):
        # Two densities, so that both a sparse and a dense execution path are covered.
        mask = torch.rand(OUT, IN) < (0.15 if kind == "masked_sparse" else 0.6)
        mask[0, 0] = True  # the in-place edit tests change weight[0, 0]; it must count
        return MaskedSparseLinear.from_dense(dense, mask=mask)
    num_clusters = {"codebook_packed": 16, "codebook_unpacked": 40}[kind]
    return CodebookLinear.from_dense(dense, num_clusters=num_clusters)


def _reference(layer, x, absolute=False):
    """float64 output of the plain-PyTorch definition applied to the layer's current state
    (with absolute=True: the same sum over |terms|, the scale of the rounding error)."""
    f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
    bias = None if layer.bias is None else f(layer.bias)
    if isinstance(layer, MaskedSparseLinear):
        return ref_masked_linear(f(x), f(layer.weight), layer.mask, bias)
    return ref_codebook_linear(f(x), layer.indices, f(layer.codebook), bias)


def _tolerance(layer, x):
    """Rounding-error bound: a few ulps of the sum of |terms| (a stale cache is off by O(1))."""
    scale = float(_reference(layer, x, absolute=True).max()) if x.numel() else 1.0
    eps = torch.finfo(x.dtype).eps
    return {"rtol": 0.0, "atol": 64 * eps * max(scale, 1.0)}


def _assert_matches_reference(layer, x, what=""):
    for mode in ("grad", "no_grad", "inference_mode"):
        # Twice per mode: the first call may (re)build a cache, the second reuses it.
        for _ in range(2):
            if mode == "grad":
                out = layer(x)
            elif mode == "no_grad":
                with torch.no_grad():
                    out = layer(x)
            else:
                with torch.inference_mode():
                    out = layer(x)
            assert out.dtype == x.dtype
            # float64 is checked at float64 precision: values cached in float32 would not pass.
            torch.testing.assert_close(out.detach().double(), _reference(layer, x), **_tolerance(layer, x),
                                       msg=lambda m: f"{what} ({mode}): {m}")
    return out.detach()


# --------------------------------------------------------------------------- invalidation


def _opt_step(layer):
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(8, IN, dtype=next(layer.parameters()).dtype)
    layer(x).square().sum().backward()
    opt.step()


def _no_grad(fn):
    def wrapped(layer):
        with torch.no_grad():
            fn(layer)
    return wrapped


def _load_other(kind):
    def load(layer):
        layer.load_state_dict(_make(kind, seed=1).state_dict())
    return load


MASKED_EDITS = {
    "set_mask": lambda l: l.set_mask(torch.rand(OUT, IN, generator=torch.Generator().manual_seed(5)) < 0.7),
    "mask_inplace": _no_grad(lambda l: l.mask[:, : IN // 2].logical_not_()),
    "weight_data_mul": lambda l: l.weight.data.mul_(2),
    "weight_setitem": _no_grad(lambda l: l.weight.__setitem__((0, 0), 5.0)),
    "weight_copy": _no_grad(lambda l: l.weight.copy_(torch.randn(OUT, IN))),
    "bias_data_add": lambda l: l.bias.data.add_(1),
    "optimizer_step": _opt_step,
    "to_float64": lambda l: l.to(torch.float64),
    "load_state_dict": None,  # _load_other(kind)
}

CODEBOOK_EDITS = {
    "codebook_data_mul": lambda l: l.codebook.data.mul_(2),
    "codebook_setitem": _no_grad(lambda l: l.codebook.__setitem__(3, 5.0)),
    "indices_inplace": _no_grad(lambda l: l.indices[: OUT // 2].copy_(l.indices[OUT // 2: 2 * (OUT // 2)])),
    "bias_data_add": lambda l: l.bias.data.add_(1),
    "optimizer_step": _opt_step,
    "to_float64": lambda l: l.to(torch.float64),
}

# Known gap: MaskedSparseLinear keys its value caches on the weight's version counter and
# data_ptr, and an edit through `weight.data` moves neither. strict: the mark must go once fixed.
_DATA_EDIT_GAP = pytest.mark.xfail(strict=True, reason="MaskedSparseLinear value cache misses edits made via .data")


def _case(kind, edit):
    if kind.startswith("masked") and edit == "weight_data_mul":
        return pytest.param(kind, edit, marks=_DATA_EDIT_GAP)
    return (kind, edit)


CASES = [_case(k, e) for k in ("masked", "masked_sparse") for e in MASKED_EDITS] + [
    (k, e) for k in ("codebook_packed", "codebook_unpacked") for e in [*CODEBOOK_EDITS, "load_state_dict"]
]


@pytest.mark.parametrize("kind,edit", CASES)
def test_cache_invalidated(kind, edit):
    layer = _make(kind)
    x = torch.randn(5, 3, IN)
    before = _assert_matches_reference(layer, x, "fresh layer")
    fn = _load_other(kind) if edit == "load_state_dict" else (MASKED_EDITS if kind.startswith("masked") else CODEBOOK_EDITS)[edit]
    fn(layer)
    x = x.to(next(layer.parameters()).dtype)
    after = _assert_matches_reference(layer, x, f"after {edit}")
    if edit != "to_float64":  # (that one only changes the precision; checked tightly above)
        # The edit changed the result, so a stale cache could not pass the check above.
        assert not torch.allclose(after.double(), before.double(), rtol=1e-3, atol=1e-3)


def test_shared_codebook_edit_seen_by_every_layer():
    """Two layers hold the same codebook Parameter; an edit through one reaches the other."""
    a, b = _make("codebook_packed", seed=0), _make("codebook_packed", seed=1)
    b.codebook = a.codebook
    x = torch.randn(4, IN)
    before = _assert_matches_reference(b, x, "shared, fresh")
    _assert_matches_reference(a, x, "shared, fresh")
    a.codebook.data.mul_(-1.5)
    after = _assert_matches_reference(b, x, "after editing the codebook through the other layer")
    assert not torch.allclose(after, before)
    _opt_step(a)
    _assert_matches_reference(b, x, "after an optimizer step on the other layer")


@pytest.mark.parametrize("kind", ["masked", "masked_sparse", "codebook_packed", "codebook_unpacked"])
def test_copies_do_not_share_caches(kind):
    """deepcopy / pickle copies made after the cache was warmed are independent of it."""
    layer = _make(kind)
    x = torch.randn(6, IN)
    ref = _assert_matches_reference(layer, x, "original")
    dup = copy.deepcopy(layer)
    pickled = pickle.loads(pickle.dumps(layer))
    for p in dup.parameters():
        p.data.mul_(3)
    _assert_matches_reference(dup, x, "edited deepcopy")
    torch.testing.assert_close(_assert_matches_reference(layer, x, "original after editing its copy"), ref)
    torch.testing.assert_close(_assert_matches_reference(pickled, x, "unpickled copy"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["masked", "masked_sparse", "codebook_packed", "codebook_unpacked"])
def test_cache_follows_device_moves(kind):
    layer = _make(kind)
    x = torch.randn(6, IN)
    _assert_matches_reference(layer, x, "cpu")
    layer.to("cuda")
    layer.weight.data.mul_(2) if kind.startswith("masked") else layer.codebook.data.mul_(2)
    out = _assert_matches_reference(layer, x.cuda(), "cuda")
    assert out.is_cuda
    layer.to("cpu")
    _assert_matches_reference(layer, x, "back on cpu")


# --------------------------------------------------------------------------- threads


def _flip_state(layer, round_):
    """A new state each round, so every round starts with the caches invalid."""
    g = torch.Generator().manual_seed(100 + round_)
    with torch.no_grad():
        if isinstance(layer, MaskedSparseLinear):
            density = 0.15 if layer.density < 0.3 else 0.6  # stay on the layer's execution path
            layer.set_mask(torch.rand(OUT, IN, generator=g) < density)
            layer.weight.mul_(1.25)
        else:
            layer.codebook.copy_(torch.randn(layer.codebook.shape, generator=g))


@pytest.mark.parametrize("kind", ["masked", "masked_sparse", "codebook_packed", "codebook_unpacked"])
def test_concurrent_forward_from_threads(kind):
    """An inference server: 8 threads call one layer at once, released together by a barrier
    right after the layer's state changed; each thread checks every one of its results."""
    layer = _make(kind)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(3 + i, IN, generator=g) for i in range(THREADS)]
    for round_ in range(4):
        _flip_state(layer, round_)
        refs = [_reference(layer, x) for x in xs]
        tols = [_tolerance(layer, x) for x in xs]
        barrier = threading.Barrier(THREADS)

        def work(i):
            barrier.wait(timeout=THREAD_TIMEOUT_S)
            outs = []
            # Half the threads serve under no_grad, half under inference_mode.
            with (torch.no_grad() if i % 2 else torch.inference_mode()):
                for _ in range(6):
                    outs.append(layer(xs[i]))
            return outs

        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(work, i) for i in range(THREADS)]
            results = [f.result(timeout=THREAD_TIMEOUT_S) for f in futures]
        for i, outs in enumerate(results):
            for out in outs:
                torch.testing.assert_close(out.double(), refs[i], **tols[i],
                                           msg=lambda m: f"round {round_}, thread {i}: {m}")


def test_concurrent_functional_ops_from_threads():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(OUT, IN, generator=g)
    mask = torch.rand(OUT, IN, generator=g) < 0.5
    idx = torch.randint(0, 16, (OUT, IN), generator=g, dtype=torch.uint8)
    codebook = torch.randn(16, generator=g)
    teacher = torch.randn(9, 11, generator=g)
    xs = [torch.randn(2 + i, IN, generator=g) for i in range(THREADS)]
    ss = [torch.randn(9, 11, generator=g) for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def work(i):
        barrier.wait(timeout=THREAD_TIMEOUT_S)
        res = []
        for _ in range(5):
            res.append((ops.masked_linear(xs[i], w, mask), ops.codebook_linear(xs[i], pack_int4(idx), codebook),
                        ops.kd_kl_div(ss[i], teacher, 2.0, "none")))
        return res

    with ThreadPoolExecutor(THREADS) as pool:
        results = [f.result(timeout=THREAD_TIMEOUT_S) for f in [pool.submit(work, i) for i in range(THREADS)]]
    for i, res in enumerate(results):
        for ml, cl, kd in res:
            torch.testing.assert_close(ml.double(), ref_masked_linear(xs[i].double(), w.double(), mask), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cl.double(), ref_codebook_linear(xs[i].double(), idx, codebook.double()),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(kd.double(), ref_kd_kl_div(ss[i].double(), teacher.double(), 2.0, "none"),
                                       rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def _deterministic_algorithms():
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


@pytest.fixture
def deterministic():
    with _deterministic_algorithms():
        yield


def _det_cases():
    """(name, fn(*tensors) -> loss-like output, leaf tensors) large enough that the CPU
    kernels split the work across threads (and the codebook gradient sums many weights)."""
    g = torch.Generator().manual_seed(11)
    batch, in_f, out_f = 96, 301, 130

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    mask = torch.rand(out_f, in_f, generator=g) < 0.6
    idx16 = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    idx64 = torch.randint(0, 64, (out_f, in_f), generator=g, dtype=torch.uint8)
    teacher = 4 * torch.randn(batch, 1000, generator=g)
    target = torch.randint(0, 1000, (batch,), generator=g)
    cases = [
        ("masked_linear", lambda x, w, b: ops.masked_linear(x, w, mask, b), [t(batch, in_f), t(out_f, in_f), t(out_f)]),
        ("codebook_linear_packed", lambda x, c, b: ops.codebook_linear(x, pack_int4(idx16), c, b),
         [t(batch, in_f), t(16), t(out_f)]),
        ("codebook_linear_unpacked", lambda x, c, b: ops.codebook_linear(x, idx64, c, b), [t(batch, in_f), t(64), t(out_f)]),
        ("kd_kl_div", lambda s: ops.kd_kl_div(s, teacher, 3.0, "batchmean"), [t(batch, 1000, scale=4.0)]),
        ("KDLoss", lambda s: KDLoss(3.0, 0.6)(s, teacher, target), [t(batch, 1000, scale=4.0)]),
    ]
    torch.manual_seed(12)
    modules = [("MaskedSparseLinear", MaskedSparseLinear.from_dense(nn.Linear(in_f, out_f), mask=mask)),
               ("MaskedSparseLinear_sparse", MaskedSparseLinear.from_dense(
                   nn.Linear(in_f, out_f), mask=torch.rand(out_f, in_f, generator=g) < 0.1))]
    modules.append(("CodebookLinear", CodebookLinear.from_dense(nn.Linear(in_f, out_f), num_clusters=16)))
    for name, layer in modules:
        cases.append((name, lambda x, *params, layer=layer: layer(x), [t(batch, in_f), *layer.parameters()]))
    return cases


DET_NAMES = ["masked_linear", "codebook_linear_packed", "codebook_linear_unpacked", "kd_kl_div", "KDLoss",
             "MaskedSparseLinear", "MaskedSparseLinear_sparse", "CodebookLinear"]


@pytest.mark.parametrize("name", DET_NAMES)
def test_deterministic_algorithms_bitwise_repeatable(name, deterministic):
    assert torch.are_deterministic_algorithms_enabled()
    _, fn, leaves = next(c for c in _det_cases() if c[0] == name)
    runs = []
    threads = torch.get_num_threads()
    try:
        # Repeats on 1..4 threads: a reduction whose order follows the thread split would
        # give other bits on another thread count.
        for n in (1, 2, 3, 4, 2):
            torch.set_num_threads(n)
            out = fn(*leaves)
            weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
            grads = torch.autograd.grad((out * weight).sum(), leaves)
            runs.append((n, out.detach(), grads))
    finally:
        torch.set_num_threads(threads)
    for n, out, grads in runs[1:]:
        assert torch.equal(out, runs[0][1]), f"{name}: forward on {n} threads differs from 1 thread"
        for i, (g, g0) in enumerate(zip(grads, runs[0][2])):
            assert torch.equal(g, g0), f"{name}: gradient {i} on {n} threads differs from 1 thread"


def test_deterministic_flag_restored():
    """The fixture puts the global flag back as it was, even when the test fails."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with pytest.raises(KeyError):
        with _deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            raise KeyError("a failing test")
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [True, False])
def test_cuda_codebook_backward_deterministic_or_clear_error(packed, deterministic):
    """The codebook gradient is a scatter-sum: on CUDA it must be repeatable under
    use_deterministic_algorithms(True), or refuse with an error that says why."""
    g = torch.Generator().manual_seed(0)
    n = 16 if packed else 64
    idx = torch.randint(0, n, (512, 1024), generator=g, dtype=torch.uint8)
    idx = (pack_int4(idx) if packed else idx).cuda()
    x = torch.randn(256, 1024, generator=g).cuda()
    codebook = torch.randn(n, generator=g).cuda().requires_grad_()
    grads = []
    for _ in range(3):
        try:
            out = ops.codebook_linear(x, idx, codebook)
            (grad,) = torch.autograd.grad(out.sum(), codebook)
        except RuntimeError as e:
            assert "determinis" in str(e).lower()
            return
        grads.append(grad)
    assert all(torch.equal(gr, grads[0]) for gr in grads)


# --------------------------------------------------------------------------- concurrent mask edits
#
# What a forward may observe while another thread edits the layer (README, "Guarantees"):
# a forward that overlaps an edit computes with the state before it, after it, or (as
# nn.Linear under a concurrent in-place update) a mix of the two; it never crashes or
# touches memory outside its tensors, and every forward that starts after the edit
# returned sees the new state. scripts/sanitize.sh runs these under ASan + UBSan.

EDIT_ROUNDS = 120


def _structure_consistent(mask_shape, row_ptr, col_idx, t_row_ptr, t_col_idx):
    """Both forms describe one and the same mask (whichever the snapshot caught)."""
    n, k = mask_shape
    nnz = col_idx.numel()
    assert int(row_ptr[0]) == 0 and int(row_ptr[-1]) == nnz
    assert int(t_row_ptr[0]) == 0 and int(t_row_ptr[-1]) == nnz == t_col_idx.numel()
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff().long())
    cols = torch.repeat_interleave(torch.arange(k), t_row_ptr.diff().long())
    a = torch.zeros(n, k, dtype=torch.bool)
    a[rows, col_idx.long()] = True
    b = torch.zeros(n, k, dtype=torch.bool)
    b[t_col_idx.long(), cols] = True
    assert torch.equal(a, b) and int(a.sum()) == nnz


def _run_with_editor(readers, edit, rounds=EDIT_ROUNDS, reader_rounds=EDIT_ROUNDS // 4):
    """Runs the reader functions in threads while a fourth thread calls `edit(i)`, until the
    editor made `rounds` edits and every reader finished `reader_rounds` calls (so edits and
    reads interleave whatever the scheduler does); re-raises the first exception."""
    stop = threading.Event()
    errors = []
    counts = [0] * len(readers)

    def reader(j, fn):
        try:
            while not stop.is_set():
                fn()
                counts[j] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            stop.set()

    def editor():
        try:
            i = 0
            deadline = time.monotonic() + THREAD_TIMEOUT_S
            while not stop.is_set() and (i < rounds or min(counts) < reader_rounds) and time.monotonic() < deadline:
                edit(i)
                i += 1
                time.sleep(0)  # let a reader take the GIL between two edits
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(j, fn)) for j, fn in enumerate(readers)]
    threads.append(threading.Thread(target=editor))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=THREAD_TIMEOUT_S * 2)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    assert min(counts) >= reader_rounds, f"readers ran {counts} times (editor hit the time limit)"


def test_structure_build_while_the_mask_changes():
    """_masked_structure counts and then fills: built from a snapshot, both passes and both
    forms see the same mask even when another thread rewrites it meanwhile."""
    g = torch.Generator().manual_seed(21)
    n, k = 160, 130
    masks = [torch.rand(n, k, generator=g) < 0.05, torch.rand(n, k, generator=g) < 0.6]
    mask = masks[0].clone()
    def build():
        st = ops_torch._masked_structure(mask)
        _structure_consistent((n, k), *st)
        perm = ops_torch._masked_structure_perm(st[0], st[1], st[2])
        assert perm.numel() == st[1].numel()

    _run_with_editor([build, build, build], lambda i: mask.copy_(masks[(i + 1) % 2]), rounds=4 * EDIT_ROUNDS,
                     reader_rounds=EDIT_ROUNDS)


@pytest.mark.parametrize("edit_kind", ["set_mask", "load_state_dict"])
def test_forward_backward_while_another_thread_edits(edit_kind):
    """Three threads run forward (no_grad), forward+backward and forward+backward with an
    input gradient on one layer while a fourth calls set_mask / load_state_dict."""
    torch.manual_seed(5)
    n, k = 96, 140
    layer = MaskedSparseLinear.from_dense(nn.Linear(k, n), mask=torch.rand(n, k) < 0.1)
    g = torch.Generator().manual_seed(6)
    masks = [torch.rand(n, k, generator=g) < d for d in (0.08, 0.15)]
    states = []
    for m in masks:
        other = MaskedSparseLinear.from_dense(nn.Linear(k, n), mask=m)
        states.append({name: t.clone() for name, t in other.state_dict().items()})
    xs = [torch.randn(b, k, generator=g) for b in (1, 3, 8)]
    paths = set()

    def infer():
        with torch.no_grad():
            for x in xs:
                y = layer(x)
                assert y.shape == (x.shape[0], n) and torch.isfinite(y).all()
                paths.add(layer.last_path)

    def train():
        y = layer(xs[2])
        y.square().sum().backward()
        assert torch.isfinite(layer.weight.grad).all()

    def train_input():
        x = xs[1].clone().requires_grad_()
        (layer(x) * 0.5).sum().backward()
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()

    if edit_kind == "set_mask":
        def edit(i):
            layer.set_mask(masks[i % 2])
    else:
        def edit(i):
            layer.load_state_dict(states[i % 2])

    _run_with_editor([infer, train, train_input], edit)
    assert "sparse" in paths  # the structure ops, not only the dense fallback, ran under the edits
    # After the editor finished, every forward sees its last state.
    layer.zero_grad()
    for x in xs:
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), _reference(layer, x), **_tolerance(layer, x))
