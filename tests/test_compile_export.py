"""torch.compile(fullgraph=True), torch.library.opcheck, torch.export, to_dense and ONNX.

- Every functional op and every module runs under torch.compile(fullgraph=True), forward
  and backward, with the same results as eager. A counting backend proves the compiled
  graph was used (no silent fallback to eager).
- opcheck runs on every torchslim op the public ops call (forward and backward ops alike),
  recorded with a dispatch mode, and every op registered under torch.ops.torchslim must be
  among them, so a new op cannot go unchecked.
- torchslim.to_dense turns a pruned + shared model into plain nn.Linear layers with the same
  outputs; that dense model exports to ONNX and onnx's reference evaluator reproduces it.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import torchslim
from torchslim import ops
from torchslim.nn import CodebookLinear, KDLoss, MaskedSparseLinear, SparseSequential
from torchslim.ops._reference import pack_int4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- samples


def _sample_ops(requires_grad=True, batch=(3, 5)):
    """(name, fn, args) for every functional op and layout; random, odd sizes, 3-D input."""
    g = torch.Generator().manual_seed(0)
    in_f, out_f = 7, 6

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_(requires_grad)

    mask = torch.rand(out_f, in_f, generator=g) < 0.6
    idx20 = torch.randint(0, 20, (out_f, in_f), generator=g, dtype=torch.uint8)
    idx16 = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    samples = [
        ("masked_linear", ops.masked_linear, (t(*batch, in_f), t(out_f, in_f), mask, t(out_f))),
        ("masked_linear_nobias", ops.masked_linear, (t(*batch, in_f), t(out_f, in_f), mask, None)),
        ("codebook_linear_unpacked", ops.codebook_linear, (t(*batch, in_f), idx20, t(20), t(out_f))),
        ("codebook_linear_packed", ops.codebook_linear, (t(*batch, in_f), pack_int4(idx16), t(16), None)),
    ]
    for reduction in ("batchmean", "sum", "mean", "none"):
        samples.append((f"kd_kl_div_{reduction}", ops.kd_kl_div,
                        (t(batch[0], 9, scale=3.0), (3.0 * torch.randn(batch[0], 9, generator=g)), 2.0, reduction)))
    return samples


SAMPLE_NAMES = [s[0] for s in _sample_ops()]


def _clone(args, keep_requires_grad=True):
    return tree_map(lambda a: a.detach().clone().requires_grad_(keep_requires_grad and a.requires_grad)
                    if isinstance(a, torch.Tensor) else a, args)


def _run(fn, args):
    """Forward, then backward of a fixed random weighting; returns (out, grads of inputs)."""
    out = fn(*args)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return out.detach(), grads


def _assert_compiled(counter):
    assert counter.frame_count >= 1, "torch.compile fell back to eager"


# --------------------------------------------------------------------------- ops


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_op_compile_fullgraph_matches_eager(name):
    _, fn, args = next(s for s in _sample_ops() if s[0] == name)
    expected, expected_grads = _run(fn, _clone(args))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    out, grads = _run(compiled, _clone(args))
    _assert_compiled(counter)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["masked_linear", "codebook_linear_packed", "kd_kl_div_batchmean"])
def test_op_compile_dynamic_batch(name):
    """The fake kernels handle symbolic sizes: one graph serves several batch sizes."""
    counter = CompileCounterWithBackend("aot_eager")
    fn = next(s for s in _sample_ops() if s[0] == name)[1]
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for batch in ((2, 3), (4, 5), (5, 2)):  # (never 6: the weights have 6 rows)
        _, _, args = next(s for s in _sample_ops(batch=batch) if s[0] == name)
        args = _clone(args)
        for a in args:  # the batch dimensions of the activations are symbolic
            if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[0] == batch[0]:
                for d in range(a.dim() - 1):
                    torch._dynamo.mark_dynamic(a, d)
        expected, expected_grads = _run(fn, _clone(args))
        out, grads = _run(compiled, args)
        torch.testing.assert_close(out, expected)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)
    assert counter.frame_count == 1, f"recompiled for a new batch size ({counter.frame_count} graphs)"


@pytest.mark.parametrize("case", ["op_temperature_schedule", "kdloss_dynamic_true"])
def test_kd_symbolic_temperature(case):
    """A temperature that changes between calls (annealing; dynamo then makes it a symbolic
    input) and KDLoss under torch.compile(dynamic=True) both compile with fullgraph=True."""
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    if case == "op_temperature_schedule":
        compiled = torch.compile(ops.kd_kl_div, fullgraph=True, backend=counter)
        for temperature in (4.0, 3.0, 2.0, 1.5):
            torch.testing.assert_close(compiled(s, t, temperature), ops.kd_kl_div(s, t, temperature))
        _assert_compiled(counter)  # (recompiling per temperature is allowed; failing is not)
    else:
        loss_fn = KDLoss(3.0, 0.5)
        y = torch.tensor([1, 2, 3, 4])
        compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend=counter)
        torch.testing.assert_close(compiled(s, t, y), loss_fn(s, t, y))
        _assert_compiled(counter)


class _RecordTorchslimOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torchslim":
            # Inputs keep requires_grad only where autograd could record the call: backward
            # ops run with grad mode off (opcheck then tests them as non-differentiable).
            keep = torch.is_grad_enabled()
            with torch.inference_mode(False):  # normal tensors even when recorded in inference mode
                args, kwargs = _clone(args, keep), _clone(kwargs, keep)
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _registered_torchslim_ops():
    return sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchslim::")})


def _recorded_calls():
    """Every torchslim op call made by the functional ops (forward and backward) and by the
    modules (training, no_grad and inference_mode paths)."""
    rec = _RecordTorchslimOps()
    for _, fn, args in _sample_ops(batch=(2, 3)):
        with rec:
            _run(fn, _clone(args))
    torch.manual_seed(0)
    for _, make in _module_cases():
        x = torch.randn(2, 3, 7)
        with rec:
            layer = make()  # (the layers build their cached structure here)
            _run(layer, (x.clone().requires_grad_(),))
            with torch.no_grad():
                layer(x)
            with torch.inference_mode():
                layer(x)
    with rec:  # the fused inference op
        fused = SparseSequential(MaskedSparseLinear.from_dense(nn.Linear(7, 9), mask=torch.rand(9, 7) < 0.3), nn.ReLU(),
                                 MaskedSparseLinear.from_dense(nn.Linear(9, 4), mask=torch.rand(4, 9) < 0.3)).eval()
        with torch.no_grad():
            fused(torch.randn(2, 3, 7))
        with torch.inference_mode():
            fused(torch.randn(1, 7))
    with rec:
        _run(lambda s: KDLoss(2.0, 0.5)(s, torch.randn(4, 9), torch.tensor([0, 3, 8, 1])), (torch.randn(4, 9).requires_grad_(),))
    return rec.calls


def _internal_op_calls():
    """Registered ops that neither the functional ops nor the modules call (kept for the
    benchmarks and as building blocks): explicit samples."""
    t = torch.ops.torchslim
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 12, generator=g)
    mask = torch.rand(10, 12, generator=g) < 0.2
    row_ptr, col_idx, _, _ = t._masked_structure(mask)
    calls = [(t._masked_sddmm.default, (torch.randn(5, 10, generator=g), x, row_ptr, col_idx), {})]
    # sparse_codebook_linear (no module calls it yet)
    from torchslim.ops import sparse_codebook_pack
    rp, ci, cd = sparse_codebook_pack(torch.randint(0, 16, (10, 12), generator=g), mask, 16)
    cb = torch.randn(16, generator=g)
    go = torch.randn(5, 10, generator=g)
    calls += [(t.sparse_codebook_linear.default, (x.clone().requires_grad_(), rp, ci, cd, cb.clone().requires_grad_(),
                                                  torch.randn(10, generator=g)), {}),
              (t.sparse_codebook_linear_grad_input.default, (go, rp, ci, cd, cb, 12), {}),
              (t.sparse_codebook_linear_grad_codebook.default, (go, x, rp, ci, cd, cb), {}),
              (t._sparse_codebook_transpose.default, (rp, ci, cd, 12), {}),
              (t._sparse_codebook_linear_path.default, (16, True, 1, False), {})]
    # the fused sparse-codebook chain (DeployedSequential calls it outside grad mode): one layer, ReLU
    plan = torch.tensor([[12, 10, 0, 0, 0, 0, 16, 0, 1]])
    calls += [(t._sparse_codebook_mlp.default, (x, plan, cb, rp, ci, cd, torch.randn(10, generator=g), 10), {})]
    return calls


def test_every_registered_op_is_exercised():
    registered = _registered_torchslim_ops()
    assert registered, "no torchslim ops are registered"
    seen = {call[0]._schema.name for call in _recorded_calls() + _internal_op_calls()}
    unchecked = [n for n in registered if n not in seen]
    assert not unchecked, f"registered ops with no opcheck sample (add one to _internal_op_calls): {unchecked}"


def test_opcheck_every_op():
    calls = _recorded_calls() + _internal_op_calls()
    checked = set()
    for func, args, kwargs in calls:
        key = (str(func), tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args))
        if key in checked:
            continue
        checked.add(key)
        torch.library.opcheck(func, args, kwargs)
    assert checked


# --------------------------------------------------------------------------- modules


def _module_cases():
    # Two densities: layers may take a sparse path for very sparse masks and a dense one otherwise.
    cases = [("masked", lambda: MaskedSparseLinear.from_dense(nn.Linear(7, 6), mask=torch.rand(6, 7) < 0.6)),
             ("masked_sparse", lambda: MaskedSparseLinear.from_dense(nn.Linear(7, 6), mask=torch.rand(6, 7) < 0.15))]
    cases.append(("codebook_packed", lambda: CodebookLinear.from_dense(nn.Linear(7, 6), num_clusters=16)))
    cases.append(("codebook_unpacked", lambda: CodebookLinear.from_dense(nn.Linear(7, 6), num_clusters=40)))
    return cases


@pytest.mark.parametrize("kind", ["masked", "masked_sparse", "codebook_packed", "codebook_unpacked"])
def test_module_compile_fullgraph_matches_eager(kind):
    torch.manual_seed(0)
    layer = dict(_module_cases())[kind]()
    x = torch.randn(3, 5, 7)
    w = torch.randn(3, 5, 6)

    def step(module):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * w).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    expected = step(layer)
    counter = CompileCounterWithBackend("inductor")
    got = step(torch.compile(layer, fullgraph=True, backend=counter))
    _assert_compiled(counter)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[2].keys() == expected[2].keys()
    for n in expected[2]:
        torch.testing.assert_close(got[2][n], expected[2][n], msg=lambda m: f"grad of {n}: {m}")


class _GraphRecorder:
    """A dynamo backend that records the call targets of every graph it is given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward


def _pruned_layer(in_f=300, out_f=200, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    return MaskedSparseLinear.from_dense(lin, mask=torch.rand(out_f, in_f, generator=g) < density)


def _ref_masked(layer, x):
    return torch.nn.functional.linear(x.double(), torch.where(layer.mask, layer.weight.detach().double(), 0.0),
                                      layer.bias.detach().double())


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_masked_layer_reads_the_cached_structure(fullgraph):
    """Compiled graphs call the structure ops on the layer's cached structure (graph inputs),
    never the functional op that rebuilds the structure per call."""
    layer = _pruned_layer()
    rec = _GraphRecorder()
    compiled = torch.compile(layer, fullgraph=fullgraph, backend=rec)
    x = torch.randn(1, 300)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), _ref_masked(layer, x), rtol=1e-5, atol=1e-5)
    assert rec.graphs[-1] == ["torchslim._masked_spmm.default"], rec.graphs
    assert layer.last_path == "sparse"
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    targets = rec.graphs[-1]
    assert "torchslim._masked_gather.default" in targets and not any("masked_linear" in t or "structure" in t
                                                                       for t in targets), targets
    assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_compiled_masked_layer_follows_mask_and_weight_changes():
    """What refreshes the cache outside the graph: set_mask, load_state_dict, an optimizer
    step, refresh(); a replaced mask buffer retraces (its identity is guarded)."""
    layer = _pruned_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(3, 300)

    def check(what):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x).double(), _ref_masked(layer, x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"after {what}: {m}")
        return compiled(x).detach()

    before = check("nothing")
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    compiled(x).square().sum().backward()  # a compiled training step
    opt.step()
    after = check("an optimizer step")
    assert not torch.allclose(after, before)
    layer.set_mask(torch.rand(200, 300) < 0.05)
    check("set_mask")
    layer.load_state_dict(_pruned_layer(seed=3).state_dict())
    check("load_state_dict")
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer.refresh()
    check("an in-place edit and refresh()")
    layer.mask = torch.rand(200, 300) < 0.08  # a new buffer object
    check("replacing the mask buffer")


def test_compiled_masked_layer_forced_paths_and_fresh_layer():
    from torchslim.nn import force_path

    layer = _pruned_layer(density=0.6)  # dense by the rule
    rec = _GraphRecorder()
    compiled = torch.compile(layer, fullgraph=True, backend=rec)
    x = torch.randn(4, 300)
    for path, op in (("sparse", "torchslim._masked_spmm.default"), ("dense", "torchslim._masked_dense")):
        with force_path(path), torch.no_grad():
            torch.testing.assert_close(compiled(x).double(), _ref_masked(layer, x), rtol=1e-5, atol=1e-5)
        assert op in rec.graphs[-1], (path, rec.graphs[-1])
        assert layer.last_path == path
    fresh = MaskedSparseLinear(30, 20)  # never built a structure: the functional op
    rec2 = _GraphRecorder()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fresh, fullgraph=True, backend=rec2)(x[:, :30]).double(),
                                   _ref_masked(fresh, x[:, :30]), rtol=1e-5, atol=1e-5)
    assert rec2.graphs[-1] == ["torchslim.masked_linear"], rec2.graphs


@pytest.mark.parametrize("with_target", [False, True])
def test_kdloss_compile_fullgraph_matches_eager(with_target):
    torch.manual_seed(0)
    loss_fn = KDLoss(temperature=3.0, alpha=0.7)
    s = 2 * torch.randn(6, 10)
    t = 2 * torch.randn(6, 10)
    y = torch.randint(0, 10, (6,)) if with_target else None

    def step(fn):
        si = s.clone().requires_grad_()
        loss = fn(si, t, y)
        loss.backward()
        return loss.detach(), si.grad

    expected = step(loss_fn)
    counter = CompileCounterWithBackend("aot_eager")
    got = step(torch.compile(loss_fn, fullgraph=True, backend=counter))
    _assert_compiled(counter)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_export_compressed_model_keeps_torchslim_ops():
    """torch.export of a model with torchslim layers: the ops stay as single graph nodes."""
    torch.manual_seed(0)
    layers = [MaskedSparseLinear.from_dense(nn.Linear(8, 12), mask=torch.rand(12, 8) < 0.5), nn.ReLU()]
    layers.append(CodebookLinear.from_dense(nn.Linear(12, 4), num_clusters=16))
    model = nn.Sequential(*layers).eval()
    x = torch.randn(5, 8)
    ep = torch.export.export(model, (x,))
    x2 = torch.randn(5, 8)
    torch.testing.assert_close(ep.module()(x2), model(x2))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "torchslim.masked_linear.default" in targets and "torchslim.codebook_linear.default" in targets, targets


# --------------------------------------------------------------------------- to_dense / ONNX


def _pruned_shared_mlp():
    """Linear layers pruned to 70% (global), then clustered into one global 16-entry
    codebook, plus a MaskedSparseLinear and a layer-scope CodebookLinear nested deeper."""
    from torchslim import prune, share

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    body = prune.magnitude_prune(body, 0.7, scope="global")
    body = share.cluster_weights(body, num_clusters=16, scope="global")
    head = nn.Sequential(
        MaskedSparseLinear.from_dense(nn.Linear(32, 16), mask=torch.rand(16, 32) < 0.4),
        nn.Tanh(),
        CodebookLinear.from_dense(nn.Linear(16, 4), num_clusters=24),
    )
    return nn.Sequential(body, head).eval()


def _compressed_and_dense():
    model = _pruned_shared_mlp()
    assert isinstance(model[0][0], CodebookLinear) and model[0][0].codebook is model[0][2].codebook
    return model, torchslim.to_dense(model)


def test_to_dense_gives_plain_linear_with_equal_outputs():
    model, dense = _compressed_and_dense()
    kinds = [type(m) for m in dense.modules()]
    assert not any(issubclass(k, (MaskedSparseLinear, CodebookLinear)) for k in kinds), kinds
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and all(type(m) is nn.Linear for m in linears)
    x = torch.randn(9, 12)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
    # The pruned positions (70% of the first two layers) are exact zeros in the dense weights.
    zeros = sum(int((m.weight == 0).sum()) for m in linears[:2])
    assert zeros >= 0.7 * (12 * 32 + 32 * 32) - 1


def _export_onnx(model, x, path):
    """Default exporter first; the TorchScript one if that is not usable here."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: batch},), verbose=False)
            return "dynamo"
        except Exception:  # noqa: BLE001 - fall back to the legacy exporter below
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}}, dynamo=False)
            return "torchscript"


def test_onnx_export_of_dense_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model, dense = _compressed_and_dense()
    path = os.fspath(tmp_path / "model.onnx")
    _export_onnx(dense, torch.randn(3, 12), path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    session = ReferenceEvaluator(proto)
    for batch in (1, 7):
        x = torch.randn(batch, 12)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
