"""torchslim.distill: fit and distill on small tasks; cached teacher logits give the same
training as uncached and run the teacher once per sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.distill import IndexedDataset, accuracy, distill, fit
from torchslim.nn import KDLoss


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest and immune to oversubscribed CI machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _toy(n=512, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def _mlp(d, h, c, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def test_fit_learns_and_reports_history():
    x, y = _toy()
    model = _mlp(10, 32, 4, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    before = accuracy(model, x, y)
    steps = []
    hist = fit(model, loader, epochs=5, lr=1e-2, progress=False, on_step=steps.append)
    assert len(hist) == 5 and hist[-1] < hist[0]
    assert steps == list(range(1, 5 * 8 + 1))
    assert accuracy(model, x, y) > max(before, 0.8)
    hist = fit(model, loader, epochs=1, lr=1e-2, optimizer="sgd", progress=False)
    assert len(hist) == 1


def test_fit_errors():
    model = _mlp(10, 8, 4, 0)
    loader = [(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="optimizer"):
        fit(model, loader, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, loader, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="batch"):
        fit(model, [torch.randn(4, 10)], progress=False)


def _teacher(x, y):
    teacher = _mlp(10, 64, 4, 1)
    fit(teacher, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1)),
        epochs=15, lr=1e-2, progress=False)
    return teacher


def test_distill_lowers_kd_loss_and_keeps_teacher_frozen():
    x, y = _toy()
    teacher = _teacher(x, y)
    teacher.zero_grad(set_to_none=True)
    teacher.train()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _mlp(10, 8, 4, 2)
    kd = KDLoss(temperature=4.0, alpha=1.0)
    with torch.no_grad():
        before = float(kd(student(x), teacher.eval()(x)))
    teacher.train()
    modes = []
    teacher.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(2))
    hist = distill(student, teacher, loader, epochs=25, lr=2e-2, temperature=4.0, alpha=0.9, progress=False)
    assert hist[-1] < hist[0]
    with torch.no_grad():
        after = float(kd(student(x), teacher.eval()(x)))
    assert after < 0.5 * before
    assert modes and not any(modes)  # teacher always ran in eval mode
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k])
    assert all(p.grad is None for p in teacher.parameters())
    assert accuracy(student, x, y) > 0.8


def _run(cache, loader_kind, seed=3):
    x, y = _toy(n=300)
    torch.manual_seed(0)
    teacher = _mlp(10, 16, 4, 1)
    student = _mlp(10, 8, 4, seed)
    calls = {"samples": 0}

    def count(_, inp):
        calls["samples"] += inp[0].shape[0]
    teacher.register_forward_pre_hook(count)
    if loader_kind == "dataloader":
        loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    else:  # a plain list of (x, y, idx) batches, fixed order
        ds = IndexedDataset(TensorDataset(x, y))
        loader = list(DataLoader(ds, batch_size=50))
    stats = {}
    hist = distill(student, teacher, loader, epochs=3, lr=1e-2, cache_teacher_logits=cache, progress=False, stats=stats)
    return student, hist, calls["samples"], stats["teacher_samples"]


@pytest.mark.parametrize("loader_kind", ["dataloader", "indexed-list"])
def test_cached_teacher_matches_uncached_and_runs_once_per_sample(loader_kind):
    s_uncached, h_uncached, calls_uncached, _ = _run(False, loader_kind)
    s_cached, h_cached, calls_cached, stat_cached = _run(True, loader_kind)
    assert calls_uncached == 3 * 300
    assert calls_cached == 300 and stat_cached == 300
    torch.testing.assert_close(torch.tensor(h_cached), torch.tensor(h_uncached), rtol=1e-4, atol=1e-5)
    for a, b in zip(s_cached.parameters(), s_uncached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cache_needs_indices():
    x, y = _toy(n=64)
    teacher, student = _mlp(10, 8, 4, 0), _mlp(10, 8, 4, 1)
    with pytest.raises(ValueError, match="indices"):
        distill(student, teacher, [(x, y)], cache_teacher_logits=True, progress=False)
    with pytest.raises(ValueError, match="different"):
        distill(student, student, [(x, y)], progress=False)


def test_distill_beats_no_teacher_on_small_data():
    # Few labelled samples, a strong teacher trained on many: the student learns more from
    # the teacher's soft targets than from the 64 hard labels alone. Everything is seeded,
    # and the claim is checked on three draws (labelled subset, initial weights, batch
    # order), each shared by both runs, so it does not rest on one lucky shuffle: without
    # the teacher's term (alpha=0) distill trains exactly the plain network and ties.
    x_big, y_big = _toy(n=2000, seed=7)
    teacher = _mlp(10, 64, 4, 1)
    fit(teacher, DataLoader(TensorDataset(x_big, y_big), batch_size=100, shuffle=True,
                            generator=torch.Generator().manual_seed(1)), epochs=20, lr=1e-2, progress=False)
    x_test, y_test = x_big[1000:], y_big[1000:]
    gains = []
    for seed in range(3):
        pick = torch.randperm(1000, generator=torch.Generator().manual_seed(100 + seed))[:64]
        small = TensorDataset(x_big[pick], y_big[pick])

        def loader():  # the same batch order for both runs
            return DataLoader(small, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        plain = _mlp(10, 16, 4, 10 + seed)
        fit(plain, loader(), epochs=40, lr=1e-2, progress=False)
        student = _mlp(10, 16, 4, 10 + seed)
        distill(student, teacher, loader(), epochs=40, lr=1e-2, temperature=4.0, alpha=0.9, progress=False)
        gains.append(accuracy(student, x_test, y_test) - accuracy(plain, x_test, y_test))
    # measured: +0.10 to +0.17 on each draw
    assert all(g > 0 for g in gains) and sum(gains) / len(gains) > 0.05, gains


def test_mixup_transfer_set_runs_and_counts_teacher_calls():
    x, y = _toy(n=200)
    teacher = _mlp(10, 16, 4, 1)
    loader = IndexedDataset(TensorDataset(x, y))
    batches = list(DataLoader(loader, batch_size=50))
    stats = {}
    s1 = _mlp(10, 8, 4, 2)
    hist = distill(s1, teacher, batches, epochs=2, lr=1e-2, mixup=True, cache_teacher_logits=True, progress=False,
                   stats=stats, seed=3)
    # originals once (cached) + one mixed batch per step
    assert stats["teacher_samples"] == 200 + 2 * 200
    assert len(hist) == 2 and all(np.isfinite(hist))
    s2 = _mlp(10, 8, 4, 2)
    distill(s2, teacher, batches, epochs=2, lr=1e-2, mixup=True, cache_teacher_logits=True, progress=False, seed=3)
    for a, b in zip(s1.parameters(), s2.parameters()):  # seeded: reproducible
        torch.testing.assert_close(a, b)


def test_cached_logits_belong_to_the_batch_samples_under_shuffling(monkeypatch):
    # The cache is keyed by dataset index: with a shuffling DataLoader every batch must get
    # the teacher's logits of exactly its own samples, in its order, in every epoch.
    import torchslim.distill as distill_mod

    x, y = _toy(n=200)
    teacher = _mlp(10, 16, 4, 1)
    original = distill_mod._TeacherCache.get
    checked = []

    def checking_get(self, teacher_, xb, idx, dev):
        out = original(self, teacher_, xb, idx, dev)
        with torch.no_grad():
            torch.testing.assert_close(out, teacher_(xb))
        checked.append(xb.shape[0])
        return out

    monkeypatch.setattr(distill_mod._TeacherCache, "get", checking_get)
    loader = DataLoader(TensorDataset(x, y), batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(2))
    distill(_mlp(10, 8, 4, 2), teacher, loader, epochs=3, cache_teacher_logits=True, progress=False, mixup=True)
    assert sum(checked) == 3 * 200


def test_pipeline_plain_student_has_the_distilled_students_budget():
    # Pipeline.distill_stage(None, ...) is the baseline distillation must beat: with alpha=0
    # (labels only) distilling must train exactly the same network, i.e. same initial
    # weights, batch order, optimizer, learning rate and epochs.
    from torchslim.data import load_dataset
    from torchslim.pipeline import Pipeline, PipelineConfig, make_mlp

    cfg = PipelineConfig(student_hidden=(8,), epochs=2, alpha=0.0, verbose=False, progress=False)
    pipe = Pipeline(cfg)
    assert pipe.distill_epochs == 4  # default: twice the dense network's epochs
    split = load_dataset(None, seed=0)
    split.x_train, split.y_train = split.x_train[:256], split.y_train[:256]
    pipe.split, pipe.num_classes = split, split.num_classes
    pipe.x_test, pipe.y_test = split.x_test, split.y_test
    teacher = make_mlp(split.num_features, (16,), split.num_classes)
    plain = pipe.distill_stage(None, "plain", 10)
    labels_only = pipe.distill_stage(teacher, "student", 10)
    for a, b in zip(plain.state_dict().values(), labels_only.state_dict().values()):
        torch.testing.assert_close(a, b)
    pipe.cfg.alpha = 0.9  # with the teacher's soft targets the training differs
    distilled = pipe.distill_stage(teacher, "student", 10)
    assert not torch.equal(distilled[0].weight, plain[0].weight)
    pipe._seed(10)
    untrained = make_mlp(split.num_features, (8,), split.num_classes)  # the students' common start
    assert not torch.equal(untrained[0].weight, plain[0].weight)
