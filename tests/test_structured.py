"""Whole-model structured pruning: prune_neurons over FFNs, gated MLPs and Conv1D, prune_heads
over BERT / Llama (GQA) / GPT-2 / timm attention. References are the unpruned models with the
removed units' weights zeroed (so the function is unchanged), compared in float64."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.nn import MaskedSparseLinear
from torchslim.prune import magnitude_prune
from torchslim.structured import PruningPlan, StructuredPruningWarning, prune_heads, prune_neurons

transformers = pytest.importorskip("transformers")
logging = transformers.utils.logging
logging.set_verbosity_error()

VOCAB = 97


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.1,
                                  attention_probs_dropout_prob=0.1, **kw)
    return transformers.BertModel(cfg).eval()


def llama(seed=0, heads=4, kv_heads=2, inter=48):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=VOCAB,
                                   max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(batch=3, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def out(model, x):
    y = model(input_ids=x)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y.logits


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StructuredPruningWarning)
        return fn(*args, **kw)


def half(n, seed=0):
    """A random half of range(n) (sorted), the units zeroed by a test."""
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[: n // 2]).values


def rest(n, drop):
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return torch.nonzero(keep).flatten().tolist()


# --------------------------------------------------------------------------- transformers FFNs


def test_bert_ffn_zeroed_half_is_removed_exactly_in_float64():
    model = bert().double()
    x = ids()
    drops = {}
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            drops[i] = half(64, seed=i)
            layer.intermediate.dense.weight[drops[i]] = 0
            layer.intermediate.dense.bias[drops[i]] = 0
    before = copy.deepcopy(model.state_dict())
    plan = prune_neurons(model, 0.5, dry_run=True)
    assert plan.discovery == "dummy_inputs"
    assert [(g.producers, g.consumers, g.width_before, g.width_after) for g in plan.groups] == [
        ([f"encoder.layer.{i}.intermediate.dense"], [f"encoder.layer.{i}.output.dense"], 64, 32) for i in range(2)]
    for i, g in enumerate(plan.groups):
        assert g.keep == rest(64, drops[i])
    with pytest.warns(StructuredPruningWarning, match="attention.self.query.*head split"):
        small = prune_neurons(model, 0.5, example_inputs={"input_ids": x})
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    for i, layer in enumerate(small.encoder.layer):
        assert layer.intermediate.dense.weight.shape == (32, 32)
        assert layer.output.dense.weight.shape == (32, 32)
        torch.testing.assert_close(layer.output.dense.weight, model.encoder.layer[i].output.dense.weight[:, rest(64, drops[i])])
    assert small.config.intermediate_size == 32 and model.config.intermediate_size == 64
    assert n_params(small) == n_params(model) - 2 * (32 * 32 + 32 + 32 * 32)
    torch.testing.assert_close(out(small, x), out(model, x))


def test_llama_gated_mlp_gate_and_up_pruned_together_fp32():
    model = llama()
    x = ids()
    drops = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            drops[i] = half(48, seed=10 + i)
            layer.mlp.gate_proj.weight[drops[i]] = 0
            layer.mlp.up_proj.weight[drops[i]] = 0
    plan = prune_neurons(model, 0.5, example_inputs=x, dry_run=True)
    assert plan.discovery == "example_inputs"
    mlp_groups = [g for g in plan.groups if "mlp" in g.producers[0]]
    assert len(mlp_groups) == 2 and len(plan.groups) == 2
    for i, g in enumerate(mlp_groups):
        assert g.producers == [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"]
        assert g.consumers == [f"model.layers.{i}.mlp.down_proj"]
        assert g.keep == rest(48, drops[i])
    small = quiet(prune_neurons, model, 0.5, example_inputs=x)
    for layer in small.model.layers:
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 24
        assert layer.mlp.down_proj.in_features == 24 and layer.mlp.intermediate_size == 24
    assert small.config.intermediate_size == 24
    torch.testing.assert_close(out(small, x), out(model, x), rtol=1e-5, atol=1e-5)


def test_llama_gated_scores_sum_over_gate_and_up_rows():
    model = llama()
    mlp = model.model.layers[0].mlp
    plan = prune_neurons(model, 0.25, criterion="l2", example_inputs=ids(), dry_run=True)
    score = mlp.gate_proj.weight.detach().double().norm(dim=1) + mlp.up_proj.weight.detach().double().norm(dim=1)
    expected = torch.sort(torch.argsort(score, stable=True)[12:]).values.tolist()
    assert plan.groups[0].keep == expected


def test_gpt2_conv1d_mlp_zeroed_half_removed_exactly_in_float64():
    model = gpt2().double()
    x = ids()
    drops = {}
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            drops[i] = half(128, seed=20 + i)
            block.mlp.c_fc.weight[:, drops[i]] = 0  # Conv1D weight is [in, out]
            block.mlp.c_fc.bias[drops[i]] = 0
    small = quiet(prune_neurons, model, 0.5)
    for i, block in enumerate(small.transformer.h):
        assert type(block.mlp.c_fc).__name__ == "Conv1D"
        assert block.mlp.c_fc.weight.shape == (32, 64) and block.mlp.c_fc.nf == 64
        assert block.mlp.c_proj.weight.shape == (64, 32)
        torch.testing.assert_close(block.mlp.c_proj.weight, model.transformer.h[i].mlp.c_proj.weight[rest(128, drops[i])])
    assert small.config.n_inner == 64
    torch.testing.assert_close(out(small, x), out(model, x))


@pytest.mark.parametrize("amount", [0.25, 0.3, 0.9])
def test_shapes_shrink_by_the_amount(amount):
    for make, inter, path in ((bert, 64, lambda m: [l.intermediate.dense for l in m.encoder.layer]),
                              (llama, 48, lambda m: [l.mlp.up_proj for l in m.model.layers]),
                              (gpt2, 128, lambda m: [b.mlp.c_fc for b in m.transformer.h])):
        model = make()
        small = quiet(prune_neurons, model, amount)
        for layer in path(small):
            w = layer.weight.shape[1] if type(layer).__name__ == "Conv1D" else layer.out_features
            assert w == inter - round(amount * inter)
        assert n_params(small) < n_params(model)


def test_fine_tune_step_after_pruning_neurons_and_heads():
    for make in (bert, llama, gpt2):
        model = make()
        small = quiet(prune_heads, quiet(prune_neurons, model, 0.5), 0.25 if make is not llama else 0.5)
        small.train()
        opt = torch.optim.SGD(small.parameters(), lr=0.1)
        x = ids()
        y = out(small, x)
        loss = y.float().pow(2).mean()
        loss.backward()
        grads = [p.grad for p in small.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        before = [p.detach().clone() for p in small.parameters()]
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, small.parameters()))


# --------------------------------------------------------------------------- attention heads


def test_bert_heads_zeroed_removed_exactly_in_float64():
    model = bert().double()
    x = ids()
    dead = {0: [1, 3], 1: [0, 2]}
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            for h in dead[i]:
                rows = slice(8 * h, 8 * h + 8)
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                layer.attention.output.dense.weight[:, rows] = 0
    plan = prune_heads(model, 0.5, dry_run=True)
    assert [(g.module, g.unit, g.width_before, g.width_after, g.keep) for g in plan.groups] == [
        ("encoder.layer.0.attention", "heads", 4, 2, [0, 2]), ("encoder.layer.1.attention", "heads", 4, 2, [1, 3])]
    small = prune_heads(model, 0.5, example_inputs={"input_ids": x})
    for layer in small.encoder.layer:
        s = layer.attention.self
        assert s.num_attention_heads == 2 and s.all_head_size == 16 and s.attention_head_size == 8
        assert s.query.weight.shape == s.key.weight.shape == s.value.weight.shape == (16, 32)
        assert layer.attention.output.dense.weight.shape == (32, 16)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4
    torch.testing.assert_close(out(small, x), out(model, x))


def test_llama_gqa_heads_pruned_in_key_value_groups_fp32():
    model = llama(heads=4, kv_heads=2)
    x = ids()
    hd = 8
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            g = i  # layer 0 loses kv group 0 (query heads 0, 1), layer 1 loses group 1 (query heads 2, 3)
            a = layer.self_attn
            a.k_proj.weight[g * hd:(g + 1) * hd] = 0
            a.v_proj.weight[g * hd:(g + 1) * hd] = 0
            a.q_proj.weight[2 * g * hd:(2 * g + 2) * hd] = 0
            a.o_proj.weight[:, 2 * g * hd:(2 * g + 2) * hd] = 0
    plan = prune_heads(model, 0.5, dry_run=True)
    assert [(g.unit, g.width_before, g.width_after, g.keep) for g in plan.groups] == [
        ("kv groups", 2, 1, [1]), ("kv groups", 2, 1, [0])]
    small = prune_heads(model, 0.5, example_inputs=x)
    for layer in small.model.layers:
        a = layer.self_attn
        assert a.q_proj.out_features == 16 and a.k_proj.out_features == a.v_proj.out_features == 8
        assert a.o_proj.in_features == 16 and a.num_key_value_groups == 2 and a.head_dim == 8
    torch.testing.assert_close(out(small, x), out(model, x), rtol=1e-5, atol=1e-5)


def test_llama_multi_head_and_multi_query():
    model = llama(heads=4, kv_heads=4)
    small = prune_heads(model, 0.25)
    assert all(l.self_attn.q_proj.out_features == 24 and l.self_attn.k_proj.out_features == 24
               for l in small.model.layers)
    out(small, ids())
    mqa = llama(heads=4, kv_heads=1)
    plan = prune_heads(mqa, 0.5, dry_run=True)
    assert not plan.groups and "multi-query" in plan.skipped[0].reason
    with pytest.raises(ValueError, match="multi-query"):
        prune_heads(mqa, 0.5)
    with pytest.raises(ValueError, match="strict=True.*multi-query"):
        prune_heads(mqa, 0.5, strict=True, dry_run=True)


def test_gpt2_fused_qkv_heads_zeroed_removed_exactly_in_float64():
    model = gpt2().double()
    x = ids()
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            h = 2 - i  # layer 0 loses head 2, layer 1 head 1
            for part in range(3):
                cols = slice(part * 32 + 8 * h, part * 32 + 8 * h + 8)
                block.attn.c_attn.weight[:, cols] = 0
                block.attn.c_attn.bias[cols] = 0
            block.attn.c_proj.weight[8 * h:8 * h + 8] = 0
    small = prune_heads(model, 0.25)
    for block in small.transformer.h:
        assert block.attn.num_heads == 3 and block.attn.split_size == 24 and block.attn.head_dim == 8
        assert block.attn.c_attn.weight.shape == (32, 72) and block.attn.c_proj.weight.shape == (24, 32)
    torch.testing.assert_close(out(small, x), out(model, x))


def test_heads_score_includes_output_columns():
    model = bert()
    a = model.encoder.layer[0].attention
    with torch.no_grad():
        a.output.dense.weight[:, 16:24] *= 100  # head 2 has big output columns: it must stay
        for lin in (a.self.query, a.self.key, a.self.value):
            lin.weight[16:24] *= 1e-3
    plan = prune_heads(model, 0.75, include="encoder.layer.0.*", dry_run=True)
    assert plan.groups[0].keep == [2] and len(plan.groups) == 1


class ToyAttention(nn.Module):
    """An attention-like module prune_heads does not know."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w


def test_unknown_attention_is_skipped_and_reported():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True), ToyAttention())
    plan = prune_heads(model, 0.5, dry_run=True)
    assert not plan.groups
    assert {g.module for g in plan.skipped} == {"0", "1"}
    assert all("not a supported attention module" in g.reason for g in plan.skipped)
    with pytest.raises(ValueError, match="no attention module prune_heads can prune.*MultiheadAttention"):
        prune_heads(model, 0.5)
    host = nn.ModuleDict({"bert": bert(), "toy": ToyAttention()})
    with pytest.warns(StructuredPruningWarning, match="'toy'"):
        prune_heads(host, 0.5)


def test_timm_vit_and_mixer():
    try:
        import timm
    except Exception:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    small = quiet(prune_neurons, vit, 0.5, example_inputs=x)
    assert small.blocks[0].mlp.fc1.out_features == vit.blocks[0].mlp.fc1.out_features // 2
    plan = prune_heads(small, 0.25, dry_run=True)
    if plan.groups:  # timm versions whose Attention merges heads with reshape(B, N, C) are skipped
        small = quiet(prune_heads, small, 0.25, example_inputs=x)
        assert small.blocks[0].attn.num_heads == vit.blocks[0].attn.num_heads - round(0.25 * vit.blocks[0].attn.num_heads)
    else:
        assert all("reshape(B, N, C)" in g.reason for g in plan.skipped)
    assert small(x).shape == (2, 5)
    mixer = timm.create_model("mixer_s16_224", pretrained=False, img_size=32, patch_size=8, num_blocks=2,
                              num_classes=5).eval()
    small = quiet(prune_neurons, mixer, 0.5, example_inputs=x)
    assert small(x).shape == (2, 5)
    assert n_params(small) < n_params(mixer)


# --------------------------------------------------------------------------- plans, skips, strict, selection


def test_dry_run_plan_lists_groups_and_reasons():
    model = llama()
    plan = prune_neurons(model, 0.5, dry_run=True)
    assert isinstance(plan, PruningPlan)
    reasons = {tuple(g.producers): g.reason for g in plan.skipped}
    assert "head split" in reasons[("model.layers.0.self_attn.q_proj",)]
    resid = [r for p, r in reasons.items() if "model.layers.0.mlp.down_proj" in p][0]
    assert "residual" in resid
    assert "lm_head" in plan.outputs
    d = plan.to_dict()
    assert d["groups"][0]["width_before"] == 48 and d["groups"][0]["width_after"] == 24
    assert all("reason" in s for s in d["skipped"])
    md = plan.to_markdown()
    assert "model.layers.1.mlp.down_proj" in md and "skipped:" in md
    # a dry run changes nothing
    assert model.model.layers[0].mlp.gate_proj.out_features == 48


def test_strict_raises_on_skips_and_include_narrows_the_selection():
    model = bert()
    with pytest.raises(ValueError, match=r"strict=True.*attention\.self\.query.*head split"):
        prune_neurons(model, 0.5, strict=True)
    small = prune_neurons(model, 0.5, include="*.intermediate.dense", strict=True)
    assert [l.intermediate.dense.out_features for l in small.encoder.layer] == [32, 32]
    small = prune_neurons(model, 0.5, include="*.intermediate.dense", exclude="encoder.layer.1.*")
    assert [l.intermediate.dense.out_features for l in small.encoder.layer] == [32, 64]
    with pytest.raises(ValueError, match="include"):
        prune_neurons(model, 0.5, include="no.such.layer")


def test_partially_selected_gated_group_is_skipped():
    model = llama()
    plan = prune_neurons(model, 0.5, include="*.gate_proj", dry_run=True)
    assert not plan.groups and len(plan.skipped) == 2
    assert all("up_proj" in g.reason and "include/exclude" in g.reason for g in plan.skipped)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.trunk = nn.Linear(6, 8)
        self.head1 = nn.Linear(8, 2)
        self.head2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.head1(h), self.head2(h)


@pytest.mark.parametrize("use_inputs", [False, True])
def test_one_producer_several_consumers(use_inputs):
    model = TwoHeads().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        model.trunk.weight[[1, 4, 6, 7]] = 0
        model.trunk.bias[[1, 4, 6, 7]] = 0
    small = prune_neurons(model, 0.5, example_inputs=x if use_inputs else None)
    assert small.trunk.out_features == 4 and small.head1.in_features == small.head2.in_features == 4
    for a, b in zip(small(x), model(x)):
        torch.testing.assert_close(a, b)


class Gated(nn.Module):
    """Llama-style gated MLP with a residual around it, on 3-D input."""

    def __init__(self, d=10, h=23):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class Funky(nn.Module):
    """Layout ops that keep the hidden dimension last: flatten of leading dims, transpose
    of other dims, a softmax over tokens, a token mean, a CLS pick, cat over tokens."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 14)
        self.fc2 = nn.Linear(14, 9)
        self.fc3 = nn.Linear(9, 3)

    def forward(self, x):  # x: [B, T, 6]
        h = F.gelu(self.fc1(x))
        h = h.reshape(-1, h.shape[-1]).view(x.shape[0], x.shape[1], h.shape[-1]).transpose(0, 1).transpose(0, 1)
        h = h * torch.softmax(h, dim=1)
        h = torch.cat([h, h[:, :1]], dim=1)
        g = torch.tanh(self.fc2(h))
        return self.fc3(g.mean(dim=1) + g[:, 0])


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_running_discovery_follows_layout_ops_exactly(criterion):
    torch.manual_seed(3)
    model = Funky().double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    plan = prune_neurons(model, 0.3, criterion=criterion, example_inputs=x, dry_run=True)
    assert [(g.producers, g.consumers) for g in plan.groups] == [(["fc1"], ["fc2"]), (["fc2"], ["fc3"])]
    small = prune_neurons(model, 0.3, criterion=criterion, example_inputs=x)
    assert small.fc1.out_features == 14 - 4 and small.fc2.out_features == 9 - 3
    ref = copy.deepcopy(model)
    with torch.no_grad():  # the reference: same model, removed neurons' outgoing columns zeroed
        for g, consumer in zip(plan.groups, (ref.fc2, ref.fc3)):
            cols = torch.ones(consumer.in_features, dtype=torch.bool)
            cols[g.keep] = False
            consumer.weight[:, cols] = 0
    torch.testing.assert_close(small(x), ref(x))
    xn = torch.randn(5, 4, 6, dtype=torch.float64).transpose(0, 1)  # non-contiguous input
    torch.testing.assert_close(small(xn), ref(xn))
    assert small(x[:0]).shape == (0, 3)  # empty batch


def test_gated_with_residual_on_3d_input_matches_zeroed_reference():
    torch.manual_seed(4)
    model = Gated().double()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    drop = torch.randperm(23, generator=torch.Generator().manual_seed(3))[:12]  # round(0.5 * 23) = 12 go
    with torch.no_grad():
        model.gate.weight[drop] = 0
        model.up.weight[drop] = 0
    small = prune_neurons(model, 0.5, example_inputs=x)  # down's output meets the residual: output only
    assert small.gate.out_features == small.up.out_features == 23 - 12 == small.down.in_features
    torch.testing.assert_close(small(x), model(x))
    fx_small = prune_neurons(model, 0.5)  # fx path: the same group
    torch.testing.assert_close(fx_small(x), model(x))


class Blocked(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):  # x: [B, 4, 6]
        h = torch.relu(self.fc1(x))
        if self.kind == "residual":
            h = h + self.fc2(h)
        elif self.kind == "heads":
            h = h.view(*h.shape[:-1], 2, 4).transpose(-1, -2).reshape(*h.shape)
        elif self.kind == "norm":
            h = F.layer_norm(h, (8,))
        elif self.kind == "bn3d":
            h = self.bn(h)
        elif self.kind == "cat":
            h = torch.cat([h[..., :4], h[..., 4:]], dim=-1)
        elif self.kind == "transpose":
            h = h.transpose(1, 2).transpose(1, 2).transpose(-1, -2).transpose(-1, -2)
        return self.fc3(h)


@pytest.mark.parametrize("kind, pattern", [
    ("residual", r"residual"),
    ("heads", r"\.view\(\).*reshapes"),
    ("norm", r"layer_norm"),
    ("bn3d", r"BatchNorm1d.*3-D"),
    ("cat", r"indexed along its dimension"),
    ("transpose", r"moves its dimension"),
])
def test_running_discovery_skips_what_it_cannot_follow(kind, pattern):
    model = Blocked(kind)
    x = torch.randn(3, 4, 6)
    plan = prune_neurons(model, 0.5, example_inputs=x, dry_run=True)
    assert any("fc1" in g.producers and re.search(pattern, g.reason) for g in plan.skipped), plan
    with pytest.raises(ValueError, match=pattern):
        prune_neurons(model, 0.5, example_inputs=x, strict=True)


def test_skipped_dimension_left_alone_rest_pruned_with_warning():
    torch.manual_seed(6)
    model = nn.ModuleDict({"a": Blocked("residual"), "b": Funky()})

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["a"](x).sum() + self.m["b"](x).sum()

    host = Host()
    x = torch.randn(2, 4, 6)
    with pytest.warns(StructuredPruningWarning, match=r"layer 'm\.a\.fc1' \+ layer 'm\.a\.fc2'.*residual"):
        small = prune_neurons(host, 0.5, example_inputs=x)
    assert small.m["a"].fc1.out_features == 8 and small.m["b"].fc1.out_features == 7


def test_masked_layers_keep_their_masks_through_running_discovery():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    magnitude_prune(model, 0.5)
    small = prune_neurons(model, 0.5, example_inputs=torch.randn(3, 12))
    assert isinstance(small[0], MaskedSparseLinear) and isinstance(small[2], MaskedSparseLinear)
    keep = prune_neurons(model, 0.5, dry_run=True).groups[0].keep
    assert torch.equal(small[0].mask, model[0].mask[keep])
    assert torch.equal(small[2].mask, model[2].mask[:, keep])


def test_bad_arguments():
    model = bert()
    with pytest.raises(ValueError, match=r"amount must be in \[0, 1\)"):
        prune_neurons(model, 1.5)
    with pytest.raises(TypeError, match="amount"):
        prune_heads(model, "half")
    with pytest.raises(ValueError, match="criterion"):
        prune_neurons(model, 0.5, criterion="l3")
    with pytest.raises(TypeError, match="example_inputs must be"):
        prune_neurons(model, 0.5, example_inputs=3)
    with pytest.raises(ValueError, match="example_inputs: running BertModel on them failed"):
        prune_neurons(model, 0.5, example_inputs=torch.randn(2, 3))
    with pytest.raises(TypeError, match="model must be"):
        prune_neurons("bert", 0.5)
    with pytest.raises(ValueError, match="torch.fx cannot trace Blocked.*example_inputs"):
        prune_neurons(Blocked("heads"), 0.5)  # fx cannot unpack h.shape
    with pytest.raises(ValueError, match="include"):
        prune_heads(model, 0.5, include="nothing.here")


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_of_shrunk_models(tmp_path):
    import torchslim

    model = llama()
    x = ids()
    small = quiet(prune_neurons, model, 0.5)
    path = tmp_path / "llama.safetensors"
    torchslim.save(small, path)
    # the updated config rebuilds the shrunk architecture
    skeleton = transformers.LlamaForCausalLM(small.config).eval()
    loaded = torchslim.load(path, model=skeleton)
    torch.testing.assert_close(out(loaded, x), out(small, x))
    heads = quiet(prune_heads, small, 0.5)
    torchslim.save(heads, tmp_path / "heads.safetensors")
    again = torchslim.load(tmp_path / "heads.safetensors", model=copy.deepcopy(heads))
    torch.testing.assert_close(out(again, x), out(heads, x))


def test_shrunk_model_pruned_and_deployed():
    """Structured, then unstructured pruning on top: the deployed form of the shrunk model
    computes what it computes, from its compressed layers only."""
    import torchslim
    from torchslim.nn.deployed import DeployedSparseLinear
    from torchslim.prune import magnitude_prune

    x = ids()
    small = quiet(prune_neurons, llama(), 0.5)
    magnitude_prune(small, 0.9, exclude="*lm_head")
    deployed = torchslim.deploy(small)
    assert any(isinstance(m, DeployedSparseLinear) for m in deployed.modules())
    with torch.inference_mode():
        torch.testing.assert_close(out(deployed, x), out(small, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- timm-style attention without timm


class TimmStyleAttention(nn.Module):
    """timm's Attention layout (fused qkv reshaped to (B, N, 3, heads, head_dim)); ``merge``
    says how the heads are merged back: by -1 (prunable) or by the input width C (not)."""

    def __init__(self, dim=24, num_heads=4, merge="-1"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.merge = merge

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class TimmStyleAttentionC(TimmStyleAttention):
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def test_fused_qkv_attention_heads_zeroed_removed_exactly_in_float64():
    torch.manual_seed(8)
    model = nn.Sequential(TimmStyleAttention(), nn.GELU(), TimmStyleAttentionC()).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        a = model[0]
        for part in range(3):
            a.qkv.weight[part * 24 + 6:part * 24 + 12] = 0  # head 1
            a.qkv.bias[part * 24 + 6:part * 24 + 12] = 0
        a.proj.weight[:, 6:12] = 0
    plan = prune_heads(model, 0.25, dry_run=True)
    assert [(g.module, g.keep) for g in plan.groups] == [("0", [0, 2, 3])]
    assert [g.module for g in plan.skipped] == ["2"] and "reshape(B, N, C)" in plan.skipped[0].reason
    with pytest.warns(StructuredPruningWarning, match="reshape"):
        small = prune_heads(model, 0.25, example_inputs=x)
    assert small[0].num_heads == 3 and small[0].qkv.out_features == 54 and small[0].proj.in_features == 18
    assert small[2].num_heads == 4
    torch.testing.assert_close(small(x), model(x))


# --------------------------------------------------------------------------- more skips by running


# The fx-path tests in test_prune.py build the same small graphs; here they run through the
# discovery that executes the model.
from test_prune import Shared as Twice, Tied as TiedPair  # noqa: E402


class Summed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h / h.sum(-1, keepdim=True))


@pytest.mark.parametrize("model, pattern", [
    (TiedPair(), r"layer 'fc1'.*shared with another module \(weight tying\)"),
    (Twice(), r"layer 'fc1'.*'block' is called 2 times"),
    (Summed(), r"layer 'fc1'.*\.sum\(\), which works across its dimension"),
])
def test_running_discovery_refuses_ties_shared_layers_and_reductions(model, pattern):
    with pytest.raises(ValueError, match=pattern):
        prune_neurons(model, 0.5, example_inputs=torch.randn(3, 6))


def test_codebook_consumer_is_skipped():
    from torchslim.share import cluster_weights

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    cluster_weights(model, num_clusters=4, include=["4"])
    x = torch.randn(3, 6)
    with pytest.warns(StructuredPruningWarning, match=r"layer '2'.*CodebookLinear '4'.*before weight sharing"):
        small = prune_neurons(model, 0.5, example_inputs=x)
    assert small[0].out_features == 4 and small[2].out_features == 8


class FixedWidthAttention(TimmStyleAttention):
    """Merges heads back to a width stored at build time: pruning heads breaks it."""

    def __init__(self):
        super().__init__()
        self.width = 24

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, self.width))


def test_prune_heads_checks_forward_on_example_inputs():
    model = FixedWidthAttention()
    x = torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match="no longer runs on example_inputs.*RuntimeError"):
        prune_heads(model, 0.25, example_inputs=x)
    assert model.num_heads == 4 and model(x).shape == (2, 5, 24)  # the input model is untouched


def test_zero_width_hidden_layer_is_skipped():
    model = nn.Sequential(nn.Linear(4, 0), nn.ReLU(), nn.Linear(0, 3), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: zero-element init
        plan = prune_neurons(model, 0.5, example_inputs=torch.randn(2, 4), dry_run=True)
    assert [g.producers for g in plan.groups] == [["2"], ["3"]]
    assert plan.skipped[0].producers == ["0"] and "width 0" in plan.skipped[0].reason


class WritesInto(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.where = where
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.where == "feature":
            h[..., 0] = 0.0  # names neuron 0 by position
        else:
            h[0] = 0.0  # a row: element-wise for the features
        return self.fc2(h)


def test_writes_into_the_hidden_dimension():
    x = torch.randn(3, 6)
    plan = prune_neurons(WritesInto("feature"), 0.5, example_inputs=x, dry_run=True)
    assert not plan.groups and "written into along its dimension" in plan.skipped[0].reason
    model = WritesInto("row")
    small = prune_neurons(model, 0.5, example_inputs=x)
    keep = prune_neurons(model, 0.5, example_inputs=x, dry_run=True).groups[0].keep
    ref = copy.deepcopy(model)
    with torch.no_grad():
        cols = torch.ones(8, dtype=torch.bool)
        cols[keep] = False
        ref.fc2.weight[:, cols] = 0
    torch.testing.assert_close(small(x), ref(x))
