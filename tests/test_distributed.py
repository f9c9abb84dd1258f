"""DistributedDataParallel with torchslim layers: 2 CPU processes, gloo on 127.0.0.1.

Every scenario builds the same model (same seed, same init, float64) and trains it for a few
steps on one fixed global batch twice: under DDP in two worker processes, each rank on its
half of the batch, and in this process on the whole batch. DDP averages the ranks' gradients,
so both runs must end with the same parameters, masks and codebooks: identical on the two
ranks, and equal to the single-process run up to float64 rounding.

The workers are this file run as a script (``python test_distributed.py --worker ...``), so
they do not depend on how pytest imports test modules; a worker that hangs is killed after
WORKER_TIMEOUT_S and the test fails.

Clean exit: a two-process gloo run can abort at interpreter exit ("terminate called without
an active exception", 10-30% of runs, with or without torchslim) when gloo's worker thread
releases tensors while the main thread finalises Python. The workers end the way
docs/distributed.md tells users to: a barrier, a short sleep (the GIL is released, gloo's
threads finish their work), ``destroy_process_group``, flush, then ``os._exit`` so that no
interpreter finalisation races gloo. test_ddp_workers_exit_cleanly spawns the pair several
times and checks every exit code.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, KDLoss, MaskedSparseLinear

WORLD = 2
STEPS = 6
GLOBAL_BATCH = 16
IN, HIDDEN, OUT = 10, 24, 5
WORKER_TIMEOUT_S = 90
PG_TIMEOUT_S = 30
DTYPE = torch.float64

pytestmark = pytest.mark.slow  # every test here spawns two worker processes


# --------------------------------------------------------------------------- scenarios


def _data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, OUT, (GLOBAL_BATCH,), generator=g)
    teacher = 3 * torch.randn(GLOBAL_BATCH, OUT, generator=g, dtype=DTYPE)
    return x, y, teacher


def _linear(i, o):
    return nn.Linear(i, o, dtype=DTYPE)


def _random_mask(o, i, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(o, i, generator=g) < density


def build_masked():
    """Two MaskedSparseLinear layers with random masks; masks change mid-training."""
    torch.manual_seed(0)
    first = MaskedSparseLinear.from_dense(_linear(IN, HIDDEN), mask=_random_mask(HIDDEN, IN, 0.5, 1))
    last = MaskedSparseLinear.from_dense(_linear(HIDDEN, OUT), mask=_random_mask(OUT, HIDDEN, 0.7, 2))
    return nn.Sequential(first, nn.ReLU(), last), None


def build_mixed():
    """MaskedSparseLinear -> two layers sharing one global codebook (packed 4-bit, one of
    them pruned) -> a CodebookLinear with its own 32-entry codebook (unpacked uint8)."""
    from torchslim import share

    torch.manual_seed(0)
    first = MaskedSparseLinear.from_dense(_linear(IN, HIDDEN), mask=_random_mask(HIDDEN, IN, 0.5, 1))
    middle = nn.Sequential(
        MaskedSparseLinear.from_dense(_linear(HIDDEN, HIDDEN), mask=_random_mask(HIDDEN, HIDDEN, 0.6, 3)),
        nn.ReLU(),
        _linear(HIDDEN, HIDDEN),
    )
    middle = share.cluster_weights(middle, num_clusters=8, scope="global")
    last = CodebookLinear.from_dense(_linear(HIDDEN, OUT), num_clusters=32)
    return nn.Sequential(first, nn.ReLU(), middle[0], nn.ReLU(), middle[2], nn.ReLU(), last), None


def build_pruner():
    """A dense MLP under GradualPruner (global scope, 0 -> 80% sparsity over steps 1..5)."""
    from torchslim.prune import GradualPruner

    torch.manual_seed(0)
    model = nn.Sequential(_linear(IN, 32), nn.ReLU(), _linear(32, 32), nn.ReLU(), _linear(32, OUT))
    pruner = GradualPruner(model, final_sparsity=0.8, start_step=1, end_step=5, frequency=1)
    return model, pruner


BUILDERS = {"masked": build_masked, "mixed": build_mixed, "pruner": build_pruner}


def _masks(model):
    return {name: m.mask.clone() for name, m in model.named_modules() if isinstance(m, MaskedSparseLinear)}


def train(name, model, pruner, x, y, teacher, ddp=False):
    """STEPS of SGD with momentum on KDLoss; returns the masks after every pruner step."""
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # With broadcast_buffers (the default) rank 0's masks would overwrite the others'
        # at every forward and hide a rank that pruned differently; the pruner scenario
        # turns it off so each rank's masks are its own.
        net = DistributedDataParallel(model, broadcast_buffers=(name != "pruner"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = KDLoss(temperature=2.0, alpha=0.5)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(net(x), teacher, y)
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
            history.append(_masks(model))
        if name == "masked" and step == 2:
            # Same rule on every rank (weights are identical there): keep the larger half.
            for m in model.modules():
                if isinstance(m, MaskedSparseLinear):
                    w = (m.weight * m.mask).detach().abs()
                    m.set_mask(w > w.flatten().median())
    return history


def shared_groups(model):
    """Names of modules whose codebook is the same Parameter object, grouped."""
    groups = {}
    for name, m in model.named_modules():
        if isinstance(m, CodebookLinear):
            groups.setdefault(id(m.codebook), []).append(name)
    return sorted(sorted(g) for g in groups.values())


# --------------------------------------------------------------------------- worker


def _shutdown(exit_code):
    """End a worker without racing gloo's threads at interpreter exit (see the module doc)."""
    import torch.distributed as dist

    if exit_code == 0:
        dist.barrier()  # every rank is done with collectives
        time.sleep(0.1)  # releases the GIL: gloo's threads drop what they still hold
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # skip finalisation: nothing left to run, nothing left to race


def _worker_main(argv):
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--rank", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--out")
    p.add_argument("--scenarios")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=WORLD,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    exit_code = 0
    try:
        x, y, teacher = _data()
        half = GLOBAL_BATCH // WORLD
        rows = slice(a.rank * half, (a.rank + 1) * half)
        for name in filter(None, a.scenarios.split(",")):
            if name == "allreduce":  # the exit test: one collective on a torchslim layer's gradient
                layer = MaskedSparseLinear.from_dense(_linear(IN, OUT), mask=_random_mask(OUT, IN, 0.5, 1))
                layer(x[rows]).sum().backward()
                dist.all_reduce(layer.weight.grad)
                continue
            model, pruner = BUILDERS[name]()
            groups_before = shared_groups(model)
            history = train(name, model, pruner, x[rows], y[rows], teacher[rows], ddp=True)
            torch.save({"state": model.state_dict(), "history": history, "groups_before": groups_before,
                        "groups_after": shared_groups(model)},
                       os.path.join(a.out, f"{name}_rank{a.rank}.pt"))
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    _shutdown(exit_code)


# --------------------------------------------------------------------------- tests


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_workers(scenarios, out):
    """Run the two workers; returns their (exit code, output) pairs. A hang fails the test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(torchslim.__file__)), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    start = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(r), "--port", str(port),
                          "--out", out, "--scenarios", ",".join(scenarios)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            left = max(1.0, WORKER_TIMEOUT_S - (time.monotonic() - start))
            try:
                logs.append(proc.communicate(timeout=left)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"DDP worker did not finish within {WORKER_TIMEOUT_S} s (hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, log) for proc, log in zip(procs, logs)]


def _assert_clean_exit(runs, what):
    for r, (code, log) in enumerate(runs):
        # -6 (SIGABRT) with "terminate called" is the gloo-at-exit race the workers avoid.
        assert code == 0 and "terminate called" not in log, f"{what}: rank {r} exited with {code}:\n{log}"


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    scenarios = list(BUILDERS)
    out = os.fspath(tmp_path_factory.mktemp("ddp"))
    _assert_clean_exit(_spawn_workers(scenarios, out), "training run")
    results = {}
    for name in scenarios:
        results[name] = [torch.load(os.path.join(out, f"{name}_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return results


def _single_process(name):
    model, pruner = BUILDERS[name]()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, teacher = _data()
    history = train(name, model, pruner, x, y, teacher)
    return model, init, history


def _assert_states(a, b, exact, what):
    assert a.keys() == b.keys(), what
    for key in a:
        if exact or not a[key].is_floating_point():
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {key}: {m}")


def _check_scenario(results, name):
    rank0, rank1 = results[name]
    _assert_states(rank0["state"], rank1["state"], exact=True, what="rank 0 vs rank 1")
    model, init, history = _single_process(name)
    _assert_states(model.state_dict(), rank0["state"], exact=False, what="single process vs DDP")
    # Training moved every float parameter, so the comparison above is not vacuous.
    for key, value in init.items():
        if value.is_floating_point() and key in dict(model.named_parameters()):
            assert not torch.allclose(value, model.state_dict()[key]), f"{key} did not change in training"
    return model, rank0, rank1, history


def test_ddp_masked_sparse_linear(ddp_results):
    model, rank0, _, _ = _check_scenario(ddp_results, "masked")
    # The mid-training set_mask took effect, and masked weights stayed out of the product.
    for m in model.modules():
        if isinstance(m, MaskedSparseLinear):
            assert 0.4 < m.density < 0.6


def test_ddp_codebooks_global_shared(ddp_results):
    model, rank0, rank1, _ = _check_scenario(ddp_results, "mixed")
    # One codebook Parameter shared by the two middle layers, before and after DDP training,
    # on both ranks; the last layer has its own.
    assert rank0["groups_before"] == rank0["groups_after"] == rank1["groups_after"] == shared_groups(model)
    assert ["2", "4"] in shared_groups(model)
    assert model[2].codebook is model[4].codebook
    state = rank0["state"]
    torch.testing.assert_close(state["2.codebook"], state["4.codebook"], rtol=0, atol=0)
    assert state["2.indices"].shape == (HIDDEN, (HIDDEN + 1) // 2)  # packed 4-bit
    assert state["6.indices"].shape == (OUT, HIDDEN)  # 32 clusters: one uint8 per weight
    # The pruned positions of the shared layer still decode to exactly zero.
    mask = _random_mask(HIDDEN, HIDDEN, 0.6, 3)
    assert torch.all(model[2].weight[~mask] == 0)


def test_ddp_gradual_pruner_same_masks(ddp_results):
    model, rank0, rank1, history = _check_scenario(ddp_results, "pruner")
    assert len(rank0["history"]) == len(rank1["history"]) == len(history) == STEPS
    for step, (m0, m1, ref) in enumerate(zip(rank0["history"], rank1["history"], history)):
        assert m0.keys() == m1.keys() == ref.keys() and len(m0) == 3
        for key in m0:
            assert torch.equal(m0[key], m1[key]), f"step {step}: ranks pruned {key} differently"
            assert torch.equal(m0[key], ref[key]), f"step {step}: DDP and single process pruned {key} differently"
    final = history[-1]
    kept = sum(int(m.sum()) for m in final.values())
    total = sum(m.numel() for m in final.values())
    assert abs(1 - kept / total - 0.8) < 0.01


EXIT_RUNS = 5


def test_ddp_workers_exit_cleanly(tmp_path):
    """The exit race hit 10-30% of plain runs: five spawns of the pair (a collective on a
    torchslim layer, then the documented shutdown) must all exit 0 without an abort."""
    for i in range(EXIT_RUNS):
        _assert_clean_exit(_spawn_workers(["allreduce"], os.fspath(tmp_path)), f"spawn {i + 1} of {EXIT_RUNS}")


def test_worker_failure_is_reported(tmp_path):
    """A worker that raises exits non-zero with its traceback (the shutdown hides nothing)."""
    runs = _spawn_workers(["no-such-scenario"], os.fspath(tmp_path))
    for code, log in runs:
        assert code == 1 and "KeyError" in log and "no-such-scenario" in log


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main(sys.argv[1:])
