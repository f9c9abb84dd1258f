import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.nn import MaskedSparseLinear
from torchslim.prune import (GradualPruner, iterative_prune, l1_penalty, magnitude_prune, prune_neurons,
                             sparsity_report)


def mlp(seed=0, sizes=(12, 20, 16, 5), act=nn.ReLU):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, MaskedSparseLinear))]


def pruned_count(model):
    return sum(int((~m.mask).sum()) for _, m in linears(model) if isinstance(m, MaskedSparseLinear))


# --------------------------------------------------------------------------- magnitude_prune


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_layer_scope_reaches_exact_sparsity_per_layer(sparsity):
    model = mlp()
    original = {n: m.weight.detach().clone() for n, m in linears(model)}
    assert magnitude_prune(model, sparsity, scope="layer") is model
    for name, m in linears(model):
        assert isinstance(m, MaskedSparseLinear)
        n = m.weight.numel()
        assert int((~m.mask).sum()) == round(sparsity * n), name
        w = original[name].abs()
        if 0 < (~m.mask).sum() < n:
            assert w[~m.mask].max() <= w[m.mask].min()  # the smallest |w| went


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.8, 0.95])
def test_global_scope_reaches_exact_total_sparsity_with_smallest_weights(sparsity):
    model = mlp(sizes=(30, 40, 25, 7))
    original = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in linears(model)])
    magnitude_prune(model, sparsity)  # global is the default
    mask = torch.cat([m.mask.reshape(-1) for _, m in linears(model)])
    assert int((~mask).sum()) == round(sparsity * original.numel())
    if sparsity > 0:
        assert original[~mask].max() <= original[mask].min()
    # global: layers end at different sparsities
    per_layer = {n: 1 - m.density for n, m in linears(model)}
    if sparsity in (0.25, 0.8):
        assert len({round(v, 6) for v in per_layer.values()}) > 1


def test_pruned_model_computes_masked_linear_and_weights_are_zeroed():
    model = mlp()
    x = torch.randn(7, 12)
    dense_weights = [m.weight.detach().clone() for _, m in linears(model)]
    magnitude_prune(model, 0.6)
    h = x
    layers = linears(model)
    for i, (_, m) in enumerate(layers):
        h = F.linear(h, dense_weights[i] * m.mask, m.bias)
        if i < len(layers) - 1:
            h = torch.relu(h)
    torch.testing.assert_close(model(x), h)
    for _, m in layers:
        assert torch.all(m.weight[~m.mask] == 0)


def test_conversion_keeps_parameter_objects_and_optimizer_works():
    model = mlp()
    params_before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    magnitude_prune(model, 0.7)
    assert [id(p) for p in model.parameters()] == params_before
    before = [m.weight.detach().clone() for _, m in linears(model)]
    loss = model(torch.randn(16, 12)).pow(2).sum()
    loss.backward()
    opt.step()
    for (_, m), w0 in zip(linears(model), before):
        assert torch.all(m.weight[~m.mask] == 0)  # zero gradient at pruned positions
        assert not torch.equal(m.weight[m.mask], w0[m.mask])  # kept weights train


def test_conversion_does_not_consume_the_rng():
    model = mlp()
    state = torch.get_rng_state()
    magnitude_prune(model, 0.5)
    assert torch.equal(state, torch.get_rng_state())


def test_ties_broken_deterministically_by_layer_then_position():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for _, m in linears(model):
            m.weight.fill_(0.5)
    magnitude_prune(model, 0.5)  # 18 weights, 9 pruned: all 12 of layer 0 tie -> its first 9
    first, second = model[0].mask, model[2].mask
    assert first.reshape(-1).tolist() == [False] * 9 + [True] * 3
    assert second.all()
    model2 = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for _, m in linears(model2):
            m.weight.fill_(0.5)
    magnitude_prune(model2, 0.5, scope="layer")
    assert model2[2].mask.reshape(-1).tolist() == [False] * 3 + [True] * 3


def test_identical_models_get_identical_masks():
    # DDP ranks hold identical weights: masks must match bit for bit, every time.
    a, b = mlp(seed=3), mlp(seed=3)
    with torch.no_grad():  # plenty of ties
        for (_, ma), (_, mb) in zip(linears(a), linears(b)):
            ma.weight.copy_(torch.round(ma.weight * 8) / 8)
            mb.weight.copy_(ma.weight)
    pa = GradualPruner(a, 0.9, 0, 10, frequency=2)
    pb = GradualPruner(b, 0.9, 0, 10, frequency=2)
    for _ in range(12):
        pa.step()
        pb.step()
        for (_, ma), (_, mb) in zip(linears(a), linears(b)):
            assert torch.equal(ma.mask, mb.mask)


def test_never_revive_and_lower_sparsity_changes_nothing():
    model = mlp()
    magnitude_prune(model, 0.5)
    masks = [m.mask.clone() for _, m in linears(model)]
    with torch.no_grad():  # make the pruned positions the largest: they still must not come back
        for (_, m), mask in zip(linears(model), masks):
            m.weight.copy_(torch.where(mask, torch.rand_like(m.weight) * 0.01, torch.full_like(m.weight, 10.0)))
    magnitude_prune(model, 0.3)
    for (_, m), mask in zip(linears(model), masks):
        assert torch.equal(m.mask, mask)
    magnitude_prune(model, 0.8)
    total = sum(m.weight.numel() for _, m in linears(model))
    assert pruned_count(model) == round(0.8 * total)
    for (_, m), mask in zip(linears(model), masks):
        assert not (m.mask & ~mask).any()


def test_biases_are_not_pruned():
    model = mlp()
    biases = [m.bias.detach().clone() for _, m in linears(model)]
    magnitude_prune(model, 0.95)
    for (_, m), b in zip(linears(model), biases):
        assert torch.equal(m.bias, b)


def test_existing_zeros_count_as_pruned():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, :3] = 0  # 60 of 240 weights already zero
    magnitude_prune(model, 0.0)
    assert (model[0].mask == (model[0].weight != 0)).all() and model[0].density == pytest.approx(0.75)
    assert model[2].density == 1.0
    # they count towards k: 20% per layer is already reached by the zeros
    magnitude_prune(model, 0.2, scope="layer")
    assert int((~model[0].mask).sum()) == 60 and int((~model[2].mask).sum()) == 64


def test_include_and_exclude_patterns():
    model = nn.Sequential(mlp(), mlp(1))
    magnitude_prune(model, 0.5, include="*.0", exclude="1.*")
    assert [n for n, m in linears(model) if isinstance(m, MaskedSparseLinear)] == ["0.0"]
    with pytest.raises(ValueError, match=r"exclude: the model has no module named '9'"):
        magnitude_prune(model, 0.5, exclude="9")


def test_include_by_names_string_and_callable():
    model = mlp()
    magnitude_prune(model, 0.5, include=["0", "4"])
    assert isinstance(model[0], MaskedSparseLinear) and isinstance(model[4], MaskedSparseLinear)
    assert type(model[2]) is nn.Linear
    n = model[0].weight.numel() + model[4].weight.numel()
    assert pruned_count(model) == round(0.5 * n)

    model = mlp()
    magnitude_prune(model, 0.5, include="2")
    assert [type(m) for _, m in linears(model)] == [nn.Linear, MaskedSparseLinear, nn.Linear]

    model = mlp()
    magnitude_prune(model, 0.5, include=lambda name, m: m.out_features > 10)
    assert [type(m) for _, m in linears(model)] == [MaskedSparseLinear, MaskedSparseLinear, nn.Linear]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(10, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("rebuild_sparsity", [0.0, 0.3])
def test_state_dict_round_trip_into_rebuilt_model(rebuild_sparsity):
    model = Net()
    magnitude_prune(model, 0.8)
    sd = model.state_dict()
    assert {"fc1.mask", "fc2.mask", "head.mask"} <= set(sd)
    fresh = Net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    magnitude_prune(fresh, rebuild_sparsity)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 10)
    torch.testing.assert_close(fresh(x), model(x))
    for name in ("fc1", "fc2", "head"):
        assert torch.equal(getattr(fresh, name).mask, getattr(model, name).mask)
    assert sparsity_report(fresh).kept == sparsity_report(model).kept
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))


def test_to_dense_undoes_conversion():
    model = Net()
    magnitude_prune(model, 0.6)
    x = torch.randn(3, 10)
    expected = model(x)
    for name in ("fc1", "fc2", "head"):
        dense = getattr(model, name).to_dense()
        assert type(dense) is nn.Linear
        assert torch.equal(dense.weight == 0, ~getattr(model, name).mask) or \
            torch.all(dense.weight[~getattr(model, name).mask] == 0)
        setattr(model, name, dense)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_sparsity_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(mlp(), bad)
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualPruner(mlp(), bad, 0, 10)
    with pytest.raises(ValueError, match="amount"):
        prune_neurons(mlp(), bad)
    with pytest.raises(ValueError, match=r"sparsities\[1\]"):
        iterative_prune(mlp(), [0.1, bad], lambda m: None)


def test_bad_types_and_options_rejected():
    with pytest.raises(TypeError, match="sparsity"):
        magnitude_prune(mlp(), "0.5")
    with pytest.raises(TypeError, match="sparsity"):
        magnitude_prune(mlp(), True)
    with pytest.raises(TypeError, match="model"):
        magnitude_prune("not a model", 0.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(mlp(), 0.5, scope="row")
    with pytest.raises(ValueError, match="criterion"):
        prune_neurons(mlp(), 0.5, criterion="l3")


def test_model_without_linear_layers_rejected():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU())
    for call in (lambda: magnitude_prune(model, 0.5), lambda: GradualPruner(model, 0.5, 0, 10),
                 lambda: l1_penalty(model), lambda: prune_neurons(model, 0.5)):
        with pytest.raises(ValueError, match="model.*no nn.Linear"):
            call()


def test_include_naming_missing_or_non_linear_layer_rejected():
    with pytest.raises(ValueError, match="include.*'fc9'"):
        magnitude_prune(Net(), 0.5, include=["fc1", "fc9"])
    with pytest.raises(ValueError, match="include.*'1'.*ReLU"):
        magnitude_prune(mlp(), 0.5, include=["1"])
    with pytest.raises(ValueError, match="include"):
        magnitude_prune(mlp(), 0.5, include=lambda n, m: False)
    with pytest.raises(ValueError, match="include"):
        l1_penalty(Net(), include=["nope"])
    with pytest.raises(ValueError, match="include"):
        GradualPruner(Net(), 0.5, 0, 10, include=["nope"])


def test_nan_weights_rejected():
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model.*'2'.*NaN"):
        magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"model.*'2'.*NaN"):
        prune_neurons(model, 0.5)
    # only the selected layers matter, and only their kept weights
    magnitude_prune(model, 0.5, include=["0"])
    model = mlp()
    magnitude_prune(model, 0.5)
    with torch.no_grad():
        model[2].weight[~model[2].mask] = float("nan")
    magnitude_prune(model, 0.6)
    assert not torch.isnan(model(torch.randn(2, 12))).any()
    with torch.no_grad():
        model[2].weight[model[2].mask.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(ValueError, match=r"model.*'2'.*NaN"):
        magnitude_prune(model, 0.7)


def test_gradual_pruner_bad_arguments():
    with pytest.raises(ValueError, match="end_step"):
        GradualPruner(mlp(), 0.5, 10, 5)
    with pytest.raises(ValueError, match="frequency"):
        GradualPruner(mlp(), 0.5, 0, 5, frequency=0)
    with pytest.raises(ValueError, match="start_step"):
        GradualPruner(mlp(), 0.5, -1, 5)
    with pytest.raises(ValueError, match="initial_sparsity"):
        GradualPruner(mlp(), 0.5, 0, 5, initial_sparsity=0.7)
    with pytest.raises(ValueError, match="initial_sparsity"):
        GradualPruner(mlp(), 0.5, 0, 5, initial_sparsity=1.0)
    with pytest.raises(TypeError, match="start_step"):
        GradualPruner(mlp(), 0.5, 1.5, 5)
    with pytest.raises(ValueError, match="sparsities must be non-decreasing"):
        iterative_prune(mlp(), [0.5, 0.3], lambda m: None)
    with pytest.raises(TypeError, match="train_fn"):
        iterative_prune(mlp(), [0.5], None)


# --------------------------------------------------------------------------- schedules


def zhu_gupta(t, s_i, s_f, t0, t_end):
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3


def test_gradual_schedule_values():
    p = GradualPruner(mlp(), 0.9, start_step=10, end_step=110, frequency=10, initial_sparsity=0.1)
    assert p.sparsity == 0.0 and p.sparsity_at(9) == 0.0  # before start
    assert p.sparsity_at(10) == pytest.approx(0.1)  # start: s_i
    assert p.sparsity_at(15) == pytest.approx(0.1)  # held until the next pruning step
    assert p.sparsity_at(20) == pytest.approx(zhu_gupta(20, 0.1, 0.9, 10, 110))
    assert p.sparsity_at(60) == pytest.approx(0.8)  # middle: 0.9 - 0.8 / 8
    assert p.sparsity_at(69) == pytest.approx(0.8)
    assert p.sparsity_at(109) == pytest.approx(zhu_gupta(100, 0.1, 0.9, 10, 110))
    assert p.sparsity_at(110) == 0.9  # end
    assert p.sparsity_at(10_000) == 0.9  # after end
    values = [p.sparsity_at(t) for t in range(0, 200)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert len(set(values)) == 1 + 10 + 1  # 0, ten pruning steps in [10, 110), final

    q = GradualPruner(mlp(), 0.5, start_step=0, end_step=8)
    assert [q.sparsity_at(t) for t in range(9)] == pytest.approx([zhu_gupta(t, 0, 0.5, 0, 8) for t in range(9)])
    r = GradualPruner(mlp(), 0.5, start_step=4, end_step=4)  # one-shot at step 4
    assert [r.sparsity_at(t) for t in range(6)] == [0, 0, 0, 0, 0.5, 0.5]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_pruner_steps_apply_the_schedule(scope):
    model = mlp(sizes=(16, 24, 12, 4))
    p = GradualPruner(model, 0.8, start_step=2, end_step=12, frequency=3, scope=scope)
    assert all(isinstance(m, MaskedSparseLinear) for _, m in linears(model))
    total = sum(m.weight.numel() for _, m in linears(model))
    previous = [m.mask.clone() for _, m in linears(model)]
    for t in range(1, 16):
        target = p.step()
        assert p.step_count == t and target == p.sparsity == p.sparsity_at(t)
        if scope == "global":
            assert pruned_count(model) == round(target * total)
        else:
            for _, m in linears(model):
                assert int((~m.mask).sum()) == round(target * m.weight.numel())
        for (_, m), old in zip(linears(model), previous):
            assert not (m.mask & ~old).any()
        previous = [m.mask.clone() for _, m in linears(model)]
    assert pruned_count(model) == round(0.8 * total) or scope == "layer"


def test_gradual_pruner_resume_from_state_dict():
    a = mlp()
    pa = GradualPruner(a, 0.7, 0, 20, frequency=4)
    for _ in range(9):
        pa.step()
    b = mlp()
    pb = GradualPruner(b, 0.7, 0, 20, frequency=4)
    pb.load_state_dict(pa.state_dict())
    assert pb.sparsity == pa.sparsity
    assert pruned_count(b) == pruned_count(a)


def test_gradual_pruner_include_only_touches_selected_layers():
    model = Net()
    p = GradualPruner(model, 0.9, 0, 4, include=["fc1", "fc2"])
    for _ in range(5):
        p.step()
    assert type(model.head) is nn.Linear
    n = model.fc1.weight.numel() + model.fc2.weight.numel()
    assert int((~model.fc1.mask).sum() + (~model.fc2.mask).sum()) == round(0.9 * n)


def test_iterative_prune_calls_train_fn_after_each_step():
    model = mlp()
    seen = []

    def train_fn(m):
        seen.append(sparsity_report(m).sparsity)
        return len(seen)

    assert iterative_prune(model, [0.3, 0.6, 0.9], train_fn) == [1, 2, 3]
    assert seen == pytest.approx([0.3, 0.6, 0.9], abs=0.01)


# --------------------------------------------------------------------------- L1


def test_l1_penalty_value_and_gradient_dense_and_masked():
    model = mlp()
    expected = sum(m.weight.abs().sum() for _, m in linears(model))
    value = l1_penalty(model)
    torch.testing.assert_close(value, expected)
    value.backward()
    for _, m in linears(model):
        torch.testing.assert_close(m.weight.grad, torch.sign(m.weight.detach()))
        assert m.bias.grad is None
    model.zero_grad()
    magnitude_prune(model, 0.5, include=["0", "2"])
    with torch.no_grad():  # pruned weights are no longer part of the penalty even when non-zero
        model[0].weight.add_(1.0)
    expected = sum((m.weight * m.mask).abs().sum() if isinstance(m, MaskedSparseLinear) else m.weight.abs().sum()
                   for _, m in linears(model))
    value = l1_penalty(model)
    torch.testing.assert_close(value, expected)
    value.backward()
    for _, m in linears(model):
        mask = m.mask if isinstance(m, MaskedSparseLinear) else torch.ones_like(m.weight, dtype=torch.bool)
        torch.testing.assert_close(m.weight.grad, torch.sign(m.weight.detach()) * mask)
    sub = l1_penalty(model, include=["4"])
    torch.testing.assert_close(sub, model[4].weight.abs().sum())


# --------------------------------------------------------------------------- structured


def kept_neurons(weight, amount, criterion="l1"):
    w = weight.detach().double()
    score = w.abs().sum(1) if criterion == "l1" else w.pow(2).sum(1).sqrt()
    n = score.numel()
    remove = min(round(amount * n), n - 1)
    drop = set(torch.argsort(score)[:remove].tolist())
    return [i for i in range(n) if i not in drop]


def zero_outgoing(consumer, keep):
    with torch.no_grad():
        cols = torch.ones(consumer.in_features, dtype=torch.bool)
        cols[keep] = False
        consumer.weight[:, cols] = 0


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_prune_neurons_sequential_matches_zeroed_columns(criterion, amount):
    model = mlp(sizes=(12, 20, 16, 5), act=nn.Tanh)
    before = copy.deepcopy(model.state_dict())
    small = prune_neurons(model, amount, criterion=criterion)
    for k, v in model.state_dict().items():  # original untouched
        assert torch.equal(v, before[k])
    keep1 = kept_neurons(model[0].weight, amount, criterion)
    keep2 = kept_neurons(model[2].weight, amount, criterion)
    assert small[0].weight.shape == (len(keep1), 12)
    assert small[2].weight.shape == (len(keep2), len(keep1))
    assert small[4].weight.shape == (5, len(keep2))
    if amount > 0:
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    ref = copy.deepcopy(model)
    zero_outgoing(ref[2], keep1)
    zero_outgoing(ref[4], keep2)
    x = torch.randn(9, 12)
    torch.testing.assert_close(small(x), ref(x))
    torch.testing.assert_close(small[0].weight, model[0].weight[keep1])


def test_prune_neurons_nested_sequential_with_batchnorm_dropout_prelu():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(10, 32),
        nn.Sequential(nn.BatchNorm1d(32), nn.PReLU(32), nn.Dropout(0.2)),
        nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.BatchNorm1d(24), nn.LeakyReLU(0.1)),
        nn.Linear(24, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
        if isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.uniform_(-0.5, 0.5)
    model.eval()
    small = prune_neurons(model, 0.5)
    keep1 = kept_neurons(model[0].weight, 0.5)
    keep2 = kept_neurons(model[2][0].weight, 0.5)
    assert small[1][0].num_features == len(keep1) == small[1][0].running_mean.numel()
    assert small[1][1].weight.numel() == len(keep1)
    assert small[2][2].num_features == len(keep2)
    assert small[3].in_features == len(keep2)
    ref = copy.deepcopy(model)
    zero_outgoing(ref[2][0], keep1)
    zero_outgoing(ref[3], keep2)
    x = torch.randn(6, 10)
    torch.testing.assert_close(small(x), ref(x))
    assert not small.training
    small.train()
    small(x).sum().backward()  # still trainable


class FxNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(8, 20)
        self.hidden = nn.ModuleDict({"a": nn.Linear(20, 14)})
        self.out = nn.Linear(14, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = F.relu(self.inp(x)) * 2.0 + 1.0
        h = self.drop(torch.tanh(self.hidden["a"](h)).clamp(-0.9, 0.9))
        return F.log_softmax(self.out(h), dim=-1)


def test_prune_neurons_fx_traced_custom_module():
    model = FxNet().eval()
    small = prune_neurons(model, 0.25)
    assert type(small) is FxNet
    keep1 = kept_neurons(model.inp.weight, 0.25)
    keep2 = kept_neurons(model.hidden["a"].weight, 0.25)
    assert small.inp.out_features == len(keep1) == 15
    assert small.hidden["a"].weight.shape == (len(keep2), len(keep1))
    assert small.out.in_features == len(keep2)
    ref = copy.deepcopy(model)
    zero_outgoing(ref.hidden["a"], keep1)
    zero_outgoing(ref.out, keep2)
    x = torch.randn(4, 8)
    torch.testing.assert_close(small(x), ref(x))
    assert set(small.state_dict()) == set(model.state_dict())


def test_prune_neurons_keeps_mask_of_masked_layers():
    model = mlp()
    magnitude_prune(model, 0.5)
    small = prune_neurons(model, 0.5)
    assert isinstance(small[0], MaskedSparseLinear)
    keep1 = kept_neurons(model[0].weight * model[0].mask, 0.5)
    assert torch.equal(small[0].mask, model[0].mask[keep1])
    ref = copy.deepcopy(model)
    zero_outgoing(ref[2], keep1)
    keep2 = kept_neurons(model[2].weight * model[2].mask, 0.5)
    zero_outgoing(ref[4], keep2)
    x = torch.randn(3, 12)
    torch.testing.assert_close(small(x), ref(x))


def test_prune_neurons_keeps_at_least_one_neuron():
    model = nn.Sequential(nn.Linear(5, 2), nn.ReLU(), nn.Linear(2, 3))
    small = prune_neurons(model, 0.9)
    assert small[0].out_features == 1 and small[2].in_features == 1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 10)
        self.fc3 = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h)) + h)


class Reshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.view(h.shape[0], 3, 4).reshape(-1, 12))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.block(torch.relu(self.block(torch.relu(self.fc1(x)))))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head1 = nn.Linear(8, 2)
        self.head2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.head1(h), self.head2(h)


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.fc2(h)


@pytest.mark.parametrize("model, pattern", [
    (Residual(), r"layer 'fc(1|2)'.*(several consumers|combines it with other tensors)"),
    (Reshape(), r"layer 'fc1'.*view"),
    (nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), r"layer '0'.*Flatten"),
    (Shared(), r"layer 'block'.*called 2 times"),
    (nn.Sequential(*(lambda l: [nn.Linear(4, 4), nn.ReLU(), l, nn.ReLU(), l, nn.ReLU(), nn.Linear(4, 2)])(nn.Linear(4, 4))),
     r"layer '2'.*called 2 times"),
    (Tied(), r"layer 'fc(1|2)'.*shared.*weight tying"),
    (Concat(), r"layer '(a|b)'.*cat"),
    (Softmaxed(), r"layer 'fc1'.*softmax"),
    (DataDependent(), r"torch.fx.*DataDependent"),
])
def test_prune_neurons_refuses_graphs_it_cannot_follow(model, pattern):
    with pytest.raises(ValueError, match=pattern):
        prune_neurons(model, 0.5)


def test_prune_neurons_one_layer_feeding_two_consumers_is_pruned():
    model = TwoConsumers()  # whole-model pruning: one hidden dimension, two consumers' columns follow
    small = prune_neurons(model, 0.5)
    keep = kept_neurons(model.trunk.weight, 0.5)
    ref = copy.deepcopy(model)
    zero_outgoing(ref.head1, keep)
    zero_outgoing(ref.head2, keep)
    x = torch.randn(3, 6)
    assert small.head1.in_features == small.head2.in_features == len(keep) == 4
    for a, b in zip(small(x), ref(x)):
        torch.testing.assert_close(a, b)


def test_prune_neurons_without_hidden_layer_rejected():
    with pytest.raises(ValueError, match="no hidden layer"):
        prune_neurons(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=-1)), 0.5)


def test_residual_around_the_output_layer_is_fine():
    class OutResidual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.fc1 = nn.Linear(6, 10)
            self.fc2 = nn.Linear(10, 6)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) + x

    model = OutResidual()
    small = prune_neurons(model, 0.5)
    keep = kept_neurons(model.fc1.weight, 0.5)
    ref = copy.deepcopy(model)
    zero_outgoing(ref.fc2, keep)
    x = torch.randn(3, 6)
    torch.testing.assert_close(small(x), ref(x))


# --------------------------------------------------------------------------- report


def test_sparsity_report():
    model = Net()
    with torch.no_grad():
        model.head.weight[0, :5] = 0
    magnitude_prune(model, 0.75, include=["fc1", "fc2"])
    report = sparsity_report(model)
    assert [layer.name for layer in report] == ["fc1", "fc2", "head"]
    assert report["fc1"].kind == "MaskedSparseLinear" and report["head"].kind == "Linear"
    assert report["head"].kept == 16 * 4 - 5
    n = 240 + 384
    assert report["fc1"].kept + report["fc2"].kept == n - round(0.75 * n)
    assert report.weights == n + 64
    assert report.sparsity == pytest.approx(1 - report.kept / report.weights)
    md = report.to_markdown()
    assert "| fc2 | MaskedSparseLinear | 16x24 |" in md and "**total**" in md
    d = report.to_dict()
    assert d["total"]["kept"] == report.kept and len(d["layers"]) == 3


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_magnitude_and_gradual_and_neurons():
    model = mlp().cuda()
    magnitude_prune(model, 0.7)
    total = sum(m.weight.numel() for _, m in linears(model))
    assert pruned_count(model) == round(0.7 * total)
    assert all(m.mask.is_cuda for _, m in linears(model))
    cpu = mlp()
    magnitude_prune(cpu, 0.7)
    for (_, a), (_, b) in zip(linears(model), linears(cpu)):
        assert torch.equal(a.mask.cpu(), b.mask)
    small = prune_neurons(mlp().cuda(), 0.5)
    assert small[0].weight.is_cuda
    l1_penalty(model).backward()


def test_float64_and_bfloat16_models():
    model = mlp().double()
    magnitude_prune(model, 0.5)
    assert model[0].weight.dtype == torch.float64
    assert model(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64
    model = mlp().to(torch.bfloat16)
    magnitude_prune(model, 0.5, scope="layer")
    for _, m in linears(model):
        assert int((~m.mask).sum()) == round(0.5 * m.weight.numel())


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_gradual_pruning_on_digits_keeps_accuracy():
    from torchslim.data import load_dataset

    data = load_dataset(seed=0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible and fast enough for this size
    try:
        base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        steps_per_epoch = math.ceil(len(data.x_train) / 64)

        def train(model, epochs, lr, seed, pruner=None):
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            g = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                order = torch.randperm(len(data.x_train), generator=g)
                for i in range(0, len(order), 64):
                    idx = order[i:i + 64]
                    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if pruner is not None:
                        pruner.step()

        def accuracy(model):
            model.eval()
            with torch.no_grad():
                return 100.0 * (model(data.x_test).argmax(1) == data.y_test).float().mean().item()

        train(base, 15, 3e-3, seed=0)
        dense, pruned = copy.deepcopy(base), copy.deepcopy(base)
        train(dense, 20, 1e-3, seed=100)  # the same fine-tuning, without pruning
        pruner = GradualPruner(pruned, 0.9, start_step=0, end_step=steps_per_epoch * 20 // 3, frequency=10)
        train(pruned, 20, 1e-3, seed=100, pruner=pruner)
    finally:
        torch.set_num_threads(threads)
    report = sparsity_report(pruned)
    dense_acc, pruned_acc = accuracy(dense), accuracy(pruned)
    assert report.sparsity >= 0.9 - 1e-6
    assert dense_acc >= 95.0
    assert pruned_acc >= dense_acc - 1.0, (dense_acc, pruned_acc)
