"""Layer selection shared by the workflow (torchslim._layers.select_layers): include / exclude
forms and errors, MultiheadAttention's out_proj, transformers Conv1D (GPT-2), tied weights,
the root-module case, torch.nn.utils.prune takeover, layers without weights, and small HF
Llama / BERT / GPT-2 models built from configs (random weights)."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from torchslim._layers import select_layers, tied_parameters
from torchslim.nn import CodebookLinear, MaskedSparseLinear
from torchslim.prune import GradualPruner, iterative_prune, l1_penalty, magnitude_prune, sparsity_report
from torchslim.share import cluster_weights


class Net(nn.Module):
    """Nested linears under several parents, an activation, and a head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.ModuleList([nn.ModuleDict({"attention": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                                                     "ffn": nn.Linear(8, 8)}) for _ in range(2)])
        self.act = nn.ReLU()
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x):
        for block in self.encoder:
            x = self.act(block["ffn"](block["attention"](x)))
        return self.lm_head(x)


def names(layers):
    return [n for n, _ in layers]


ALL = ["encoder.0.attention.0", "encoder.0.attention.1", "encoder.0.ffn",
       "encoder.1.attention.0", "encoder.1.attention.1", "encoder.1.ffn", "lm_head"]


# --------------------------------------------------------------------------- include / exclude forms


def test_default_selects_every_linear_in_module_order():
    assert names(select_layers(Net())) == ALL


@pytest.mark.parametrize("include, expected", [
    ("lm_head", ["lm_head"]),
    (["encoder.1.ffn", "lm_head"], ["encoder.1.ffn", "lm_head"]),
    ("*lm_head", ["lm_head"]),
    ("encoder.*.attention.*", [n for n in ALL if ".attention." in n]),
    ("encoder.?.ffn", ["encoder.0.ffn", "encoder.1.ffn"]),
    (["encoder.0.*", "lm_head", "encoder.0.ffn"], ALL[:3] + ["lm_head"]),  # overlaps counted once, model order
    (lambda n, m: m.out_features == 5, ["lm_head"]),
])
def test_include_names_patterns_and_callables(include, expected):
    assert names(select_layers(Net(), include)) == expected


@pytest.mark.parametrize("exclude, expected", [
    ("lm_head", ALL[:-1]),
    ("*lm_head", ALL[:-1]),
    (["encoder.*.attention.*"], [n for n in ALL if ".attention." not in n]),
    (lambda n, m: n.endswith("ffn"), [n for n in ALL if not n.endswith("ffn")]),
])
def test_exclude_forms(exclude, expected):
    assert names(select_layers(Net(), exclude=exclude)) == expected


def test_include_and_exclude_together_and_in_magnitude_prune():
    model = Net()
    magnitude_prune(model, 0.5, include="encoder.*", exclude="*.attention.1")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in ALL}
    assert kinds == {n: ("Linear" if n.endswith("attention.1") or n == "lm_head" else "MaskedSparseLinear")
                     for n in ALL}


def test_module_registered_twice_is_selected_once_under_either_name():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert names(select_layers(model)) == ["0"]
    assert names(select_layers(model, "2")) == ["0"]  # the alias selects the same module
    out = magnitude_prune(model, 0.5, include="2")
    assert out is model and model[0] is model[2] and isinstance(model[0], MaskedSparseLinear)


def test_select_layers_selection_errors():
    many = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)], nn.ReLU())
    with pytest.raises(ValueError, match=r"pattern 'enc\*' matches none.*'0', '1'.*'9', \.\.\. \(12 in all\)") as e:
        select_layers(many, "enc*")
    assert "'10'" not in str(e.value)  # only the first ten names are listed
    with pytest.raises(ValueError, match=r"include: the model has no module named 'fc9'.*'lm_head'"):
        select_layers(Net(), ["lm_head", "fc9"])
    with pytest.raises(ValueError, match=r"include names 'act', a ReLU, not a linear layer"):
        select_layers(Net(), "act")
    with pytest.raises(ValueError, match=r"include names 'encoder', a ModuleList"):
        select_layers(Net(), "encoder")
    with pytest.raises(ValueError, match="include is empty"):
        select_layers(Net(), [])
    with pytest.raises(ValueError, match="callable selected none"):
        select_layers(Net(), lambda n, m: False)
    # exclude is just as strict: a typo there would compress the layer meant to be protected
    with pytest.raises(ValueError, match=r"exclude: the model has no module named 'lm_haed'"):
        select_layers(Net(), exclude="lm_haed")
    # an exclude pattern may match nothing (one list for several architectures); a name may not
    assert names(select_layers(Net(), exclude=["*classifier", "*lm_head"])) == ALL[:-1]
    with pytest.raises(ValueError, match="exclude removed every selected layer"):
        select_layers(Net(), include="lm_head", exclude="lm_head")
    with pytest.raises(TypeError, match="include must be None, a module name"):
        select_layers(Net(), 3)
    with pytest.raises(TypeError, match="exclude: module names / patterns must be str"):
        select_layers(Net(), exclude=["lm_head", 1])
    with pytest.raises(ValueError, match="purpose"):
        select_layers(Net(), purpose="quantize")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        select_layers("model")
    with pytest.raises(ValueError, match="model: Sequential has no nn.Linear, transformers Conv1D"):
        select_layers(nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU()))
    assert select_layers(nn.Sequential(nn.ReLU()), purpose="report") == []


def test_every_workflow_function_takes_exclude():
    model = Net()
    magnitude_prune(model, 0.5, exclude="lm_head")
    assert type(model.lm_head) is nn.Linear and isinstance(model.encoder[0]["ffn"], MaskedSparseLinear)
    model = Net()
    GradualPruner(model, 0.5, 0, 2, exclude=["*ffn", "lm_head"])
    assert [n for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)] == \
        [n for n in ALL if ".attention." in n]
    model = Net()
    iterative_prune(model, [0.2, 0.4], lambda m: None, exclude="*attention*")
    assert [n for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)] == \
        ["encoder.0.ffn", "encoder.1.ffn", "lm_head"]
    model = Net()
    expected = sum(model.get_submodule(n).weight.abs().sum() for n in ALL if n != "lm_head")
    torch.testing.assert_close(l1_penalty(model, exclude="lm_head"), expected)
    model = Net()
    cluster_weights(model, num_clusters=4, exclude="encoder.*")
    assert isinstance(model.lm_head, CodebookLinear) and type(model.encoder[1]["ffn"]) is nn.Linear


# --------------------------------------------------------------------------- MultiheadAttention


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def test_multihead_attention_out_proj_is_never_selected():
    model = Attn()
    assert names(select_layers(model)) == ["head"]
    assert names(select_layers(model, purpose="report")) == ["head"]
    x = torch.randn(2, 4, 8)
    magnitude_prune(model, 0.5)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert (model.attn.out_proj.weight != 0).all()
    assert [layer.name for layer in sparsity_report(model)] == ["head"]
    torch.testing.assert_close(l1_penalty(model), (model.head.weight * model.head.mask).abs().sum())
    cluster_weights(model, num_clusters=4)
    assert isinstance(model.head, CodebookLinear) and not isinstance(model.attn.out_proj, CodebookLinear)
    assert model(x).shape == (2, 4, 3)
    for call in (lambda: magnitude_prune(Attn(), 0.5, include="attn.out_proj"),
                 lambda: cluster_weights(Attn(), include=["attn.out_proj"]),
                 lambda: l1_penalty(Attn(), include="attn.out_proj")):
        with pytest.raises(ValueError, match="'attn.out_proj', the output projection of an nn.MultiheadAttention"):
            call()
    # excluding it is allowed (it is never selected anyway)
    assert names(select_layers(Attn(), exclude="attn.out_proj")) == ["head"]


# --------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def test_tied_parameters_lists_every_owner():
    model = TiedLM()
    ties = tied_parameters(model)
    assert list(ties) == [id(model.embed.weight)]
    assert [(q, type(m).__name__) for q, m in ties[id(model.embed.weight)]] == [("embed.weight", "Embedding"),
                                                                                ("head.weight", "Linear")]
    # one module registered twice is not a tie
    lin = nn.Linear(2, 2)
    assert tied_parameters(nn.Sequential(lin, lin)) == {}


def test_tied_layer_skipped_with_warning_or_refused_when_named():
    model = TiedLM()
    emb = model.embed.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"prune: layer 'head' left unchanged: its weight is tied to "
                                         r"'embed.weight' \(Embedding\)"):
        magnitude_prune(model, 0.9)
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert isinstance(model.body, MaskedSparseLinear)
    torch.testing.assert_close(model.embed.weight.detach(), emb, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming it in exclude silences the warning
        magnitude_prune(TiedLM(), 0.5, exclude="head")
    for call in (lambda: magnitude_prune(TiedLM(), 0.5, include=["body", "head"]),
                 lambda: magnitude_prune(TiedLM(), 0.5, include="h*"),
                 lambda: GradualPruner(TiedLM(), 0.5, 0, 2, include="head"),
                 lambda: cluster_weights(TiedLM(), include="head"),
                 lambda: l1_penalty(TiedLM(), include="head")):
        with pytest.raises(ValueError, match=r"include selects layer 'head', whose weight is tied to 'embed.weight'"):
            call()
    model = TiedLM()
    with pytest.warns(UserWarning, match="cluster: layer 'head' left unchanged"):
        cluster_weights(model, num_clusters=4)
    assert type(model.head) is nn.Linear and isinstance(model.body, CodebookLinear)
    assert model.head.weight is model.embed.weight


def test_two_linears_sharing_one_weight():
    torch.manual_seed(0)
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), c)
    with pytest.warns(UserWarning) as record:
        magnitude_prune(model, 0.5)
    messages = [str(r.message) for r in record]
    assert any("layer '0' left unchanged: its weight is tied to '2.weight' (Linear)" in m for m in messages)
    assert any("layer '2' left unchanged: its weight is tied to '0.weight' (Linear)" in m for m in messages)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and isinstance(model[4], MaskedSparseLinear)
    with pytest.raises(ValueError, match="layer '0', whose weight is tied to '2.weight'"):
        magnitude_prune(model, 0.5, include=["0", "2"])


def test_only_tied_layers_leave_the_model_unchanged():
    model = nn.Sequential(TiedLM().embed, nn.Linear(6, 10))
    model[1].weight = model[0].weight
    with pytest.warns(UserWarning, match="tied"):
        out = magnitude_prune(model, 0.5)
    assert out is model and type(model[1]) is nn.Linear
    with pytest.warns(UserWarning, match="tied"):
        assert cluster_weights(model, num_clusters=4) is model
    with pytest.warns(UserWarning, match="tied"), pytest.raises(ValueError, match="no linear layer left"):
        l1_penalty(model)


# --------------------------------------------------------------------------- root module


def test_magnitude_prune_of_a_bare_linear_returns_the_masked_layer():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12).double()
    w = lin.weight.detach().clone()
    out = magnitude_prune(lin, 0.5)
    assert isinstance(out, MaskedSparseLinear) and out.weight is lin.weight  # Parameters shared
    assert int((~out.mask).sum()) == 96
    assert (out.mask == (w.abs() > w.abs().flatten().sort().values[95])).all()
    x = torch.randn(3, 5, 16, dtype=torch.float64)  # 3-D input
    torch.testing.assert_close(out(x), x @ (w * out.mask).T + lin.bias.detach())
    again = magnitude_prune(out, 0.75)
    assert again is out and int((~out.mask).sum()) == 144
    with pytest.raises(ValueError, match="GradualPruner needs a model it can convert in place, got a bare Linear"):
        GradualPruner(nn.Linear(4, 4), 0.5, 0, 2)
    with pytest.raises(ValueError, match="iterative_prune needs a model it can convert in place"):
        iterative_prune(nn.Linear(4, 4), [0.5], lambda m: None)
    pruner = GradualPruner(MaskedSparseLinear(8, 8), 0.5, 0, 1)  # already converted: fine
    pruner.step()
    assert pruner.model.density == pytest.approx(0.5)


# --------------------------------------------------------------------------- torch.nn.utils.prune takeover


def test_existing_zeros_count_as_pruned_after_torch_prune_remove():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    tprune.l1_unstructured(model[0], "weight", amount=0.3)
    tprune.remove(model[0], "weight")
    zeros = model[0].weight.detach() == 0
    assert int(zeros.sum()) == 24
    magnitude_prune(model, 0.0)
    assert (model[0].mask == ~zeros).all() and model[0].density == pytest.approx(0.7)
    assert model[2].density == 1.0
    report = sparsity_report(model)
    assert report["0"].kept == 56 and report["2"].kept == 32


@pytest.mark.parametrize("prune_bias", [False, True])
def test_parametrized_torch_prune_layer_is_taken_over_with_its_mask(prune_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    tprune.random_unstructured(model[0], "weight", amount=0.4)
    if prune_bias:
        tprune.l1_unstructured(model[0], "bias", amount=0.25)
    keep = model[0].weight_mask.bool().clone()
    orig = model[0].weight_orig
    x = torch.randn(5, 10, dtype=torch.float64)
    before = model(x)
    with torch.no_grad():  # the penalty reads weight_orig * weight_mask, not the hook's last result
        model[0].weight = torch.zeros_like(model[0].weight)
        expected = (model[0].weight_orig * model[0].weight_mask).abs().sum() + model[2].weight.abs().sum()
    penalty = l1_penalty(model)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    torch.testing.assert_close(orig.grad, torch.sign(orig.detach()) * model[0].weight_mask)
    orig.grad = None
    report = sparsity_report(model)
    assert report["0"].kept == int(keep.sum())
    magnitude_prune(model, 0.0)
    layer = model[0]
    assert isinstance(layer, MaskedSparseLinear) and layer.weight is orig  # the Parameter is taken over
    assert (layer.mask == keep).all() and (layer.weight.detach()[~keep] == 0).all()
    assert not hasattr(layer, "weight_orig") and not layer._forward_pre_hooks
    torch.testing.assert_close(model(x), before)
    if prune_bias:
        assert int((layer.bias.detach() == 0).sum()) == 2
    magnitude_prune(model, 0.6, scope="layer")  # prunes further, never revives
    assert int((~layer.mask).sum()) == 48 and not (layer.mask & ~keep).any()


def test_torch_prune_layer_clustered_keeps_its_zeros():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    tprune.l1_unstructured(lin, "weight", amount=0.5)
    keep = lin.weight_mask.bool()
    out = cluster_weights(nn.Sequential(lin), num_clusters=8)[0]
    assert isinstance(out, CodebookLinear) and out.zero_pinned
    assert (out.weight.detach()[~keep] == 0).all() and (out.weight.detach()[keep] != 0).all()


def test_parametrize_registered_layer_gets_a_clear_error():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
    with pytest.raises(ValueError, match=r"layer '0' is parametrized with torch.nn.utils.parametrize.*remove_param"):
        magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"layer '0' \(ParametrizedLinear\) is parametrized"):
        cluster_weights(model)


# --------------------------------------------------------------------------- layers without weights


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cluster_weights_leaves_zero_width_layers_with_a_warning(shape, scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(*shape), nn.Linear(shape[1], 3))
    x = torch.randn(2, shape[0])
    ref = model(x)
    with pytest.warns(UserWarning, match=r"cluster: layer '0' has no weights .* left unchanged"):
        out = cluster_weights(model, num_clusters=4, scope=scope)
    assert out is model and type(model[0]) is nn.Linear
    if shape[1] == 0:  # the next layer has no weights either
        assert type(model[1]) is nn.Linear
    else:
        assert isinstance(model[1], CodebookLinear)
    assert model(x).shape == ref.shape
    with pytest.warns(UserWarning, match="no weights"):
        root = cluster_weights(nn.Linear(*shape), num_clusters=4)
    assert type(root) is nn.Linear and root(x).shape == (2, shape[1])


def test_magnitude_prune_leaves_zero_width_layers():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="prune: layer '0' has no weights"):
        magnitude_prune(model, 0.5)
    assert type(model[0]) is nn.Linear and isinstance(model[1], MaskedSparseLinear)
    assert model(torch.randn(2, 0)).shape == (2, 3)


# --------------------------------------------------------------------------- transformers models

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def gpt2_config(**kw):
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0, **kw)


def conv1d_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def test_gpt2_mlp_conv1d_pruned_outputs_match_masked_reference():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = GPT2MLP(64, gpt2_config()).double().eval()
    ref = copy.deepcopy(mlp)
    out = magnitude_prune(mlp, 0.6, scope="layer")
    assert out is mlp
    for name in ("c_fc", "c_proj"):
        layer, conv = getattr(mlp, name), getattr(ref, name)
        assert isinstance(layer, MaskedSparseLinear)
        assert (layer.in_features, layer.out_features) == (conv.weight.shape[0], conv.weight.shape[1])
        assert int((~layer.mask).sum()) == round(0.6 * conv.weight.numel())
        # the smallest |w| went, read in the [out, in] layout
        w = conv.weight.detach().t()
        assert w.abs()[~layer.mask].max() <= w.abs()[layer.mask].min()
        with torch.no_grad():
            conv.weight.mul_(layer.mask.t())
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), ref(x))
    x = torch.randn(5, 3, 32, dtype=torch.float64).transpose(0, 1)  # non-contiguous (Conv1D itself needs .view)
    torch.testing.assert_close(mlp(x), ref(x.contiguous()))
    assert mlp(torch.randn(0, 5, 32, dtype=torch.float64)).shape == (0, 5, 32)  # empty batch
    # sparsity_report and l1_penalty read Conv1D as [out, in]
    fresh = GPT2MLP(64, gpt2_config())
    report = sparsity_report(fresh)
    assert [(r.name, r.kind, r.shape) for r in report] == [("c_fc", "Conv1D", (64, 32)), ("c_proj", "Conv1D", (32, 64))]
    torch.testing.assert_close(l1_penalty(fresh), fresh.c_fc.weight.abs().sum() + fresh.c_proj.weight.abs().sum())


def test_gpt2_mlp_conv1d_gradual_pruner_and_training():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = GPT2MLP(64, gpt2_config())
    pruner = GradualPruner(mlp, 0.8, 0, 3, scope="layer")
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)  # built after the pruner (Conv1D weights are new)
    for _ in range(3):
        loss = mlp(torch.randn(4, 3, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    for layer in (mlp.c_fc, mlp.c_proj):
        assert isinstance(layer, MaskedSparseLinear) and int(layer.mask.sum()) == round(0.2 * layer.mask.numel())
        assert (layer.weight.detach()[~layer.mask] == 0).all()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gpt2_conv1d_clustered_matches_decoded_reference(scope):
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = GPT2MLP(64, gpt2_config()).double().eval()
    ref = copy.deepcopy(mlp)
    cluster_weights(mlp, num_clusters=8, scope=scope)
    for name in ("c_fc", "c_proj"):
        layer, conv = getattr(mlp, name), getattr(ref, name)
        assert isinstance(layer, CodebookLinear) and tuple(layer.weight.shape) == tuple(conv.weight.t().shape)
        assert layer.weight.unique().numel() <= 8
        rel = (layer.weight - conv.weight.t()).norm() / conv.weight.norm()
        assert 0 < rel < 0.2  # it is the clustered Conv1D weight, transposed
        with torch.no_grad():
            conv.weight.copy_(layer.weight.t())
            conv.bias.copy_(layer.bias)
    x = torch.randn(4, 2, 32, dtype=torch.float64).transpose(0, 1)  # 3-D, non-contiguous
    torch.testing.assert_close(mlp(x), ref(x.contiguous()))
    assert mlp(torch.randn(0, 4, 32, dtype=torch.float64)).shape == (0, 4, 32)
    root = cluster_weights(ref.c_fc, num_clusters=4)  # a bare Conv1D: the new layer is returned
    assert isinstance(root, CodebookLinear) and (root.in_features, root.out_features) == (32, 64)


def test_gpt2_whole_model_prunes_conv1d_and_leaves_tied_lm_head():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    convs = conv1d_names(model)
    assert len(convs) == 8
    ref = copy.deepcopy(model)
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"layer 'lm_head' left unchanged: its weight is tied to "
                                         r"'transformer.wte.weight' \(Embedding\)"):
        magnitude_prune(model, 0.7)
    assert conv1d_names(model) == []
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)}
    assert sorted(pruned) == sorted(convs)
    assert {n.rsplit(".", 1)[1] for n in pruned} == {"c_attn", "c_proj", "c_fc"}
    total = sum(m.mask.numel() for m in pruned.values())
    assert sum(int((~m.mask).sum()) for m in pruned.values()) == round(0.7 * total)  # global over the Conv1Ds
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight.detach(), wte, rtol=0, atol=0)  # wte not zeroed
    for name, layer in pruned.items():
        with torch.no_grad():
            ref.get_submodule(name).weight.mul_(layer.mask.t())
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="include selects layer 'lm_head', whose weight is tied to "
                                         "'transformer.wte.weight'"):
        magnitude_prune(model, 0.7, include="lm_head")
    report = sparsity_report(model)
    assert "lm_head" in [r.name for r in report] and report["lm_head"].sparsity == 0.0


def test_gpt2_untied_lm_head_can_be_pruned():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(tie_word_embeddings=False))
    if model.lm_head.weight is model.transformer.wte.weight:
        pytest.skip("this transformers version ties the head regardless of the config")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magnitude_prune(model, 0.5, include=["lm_head", "*.c_fc"])
    assert isinstance(model.lm_head, MaskedSparseLinear)
    assert [n for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)] == \
        ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "lm_head"]


def test_llama_exclude_lm_head():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15
    ids = torch.randint(0, 64, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magnitude_prune(model, 0.9, exclude="*lm_head")
    pruned = [n for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)]
    assert pruned == [n for n in linears if n != "lm_head"] and type(model.lm_head) is nn.Linear
    report = sparsity_report(model)
    kept = sum(r.kept for r in report if r.name != "lm_head")
    weights = sum(r.weights for r in report if r.name != "lm_head")
    assert weights - kept == round(0.9 * weights)
    assert torch.isfinite(model(ids).logits).all()
    cluster_weights(model, num_clusters=16, exclude="lm_head")
    assert type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(n), CodebookLinear) and model.get_submodule(n).zero_pinned
               for n in pruned)


def test_bert_exclude_classifier_and_attention_pattern():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=3, pad_token_id=0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ref = copy.deepcopy(model)
    magnitude_prune(model, 0.5, scope="layer", exclude="classifier")
    assert type(model.classifier) is nn.Linear
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, MaskedSparseLinear)}
    assert len(pruned) == 13 and "bert.pooler.dense" in pruned
    for name, layer in pruned.items():
        with torch.no_grad():
            ref.get_submodule(name).weight.mul_(layer.mask)
    ids = torch.randint(1, 64, (3, 9))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    names_ = names(select_layers(ref, include="bert.encoder.*.attention.self.*"))
    assert names_ == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]
    with pytest.raises(ValueError, match=re.escape("include: the pattern '*lm_head' matches none")):
        magnitude_prune(ref, 0.5, include="*lm_head")
    with pytest.raises(ValueError, match=re.escape("exclude: the model has no module named 'lm_head'")):
        magnitude_prune(ref, 0.5, exclude="lm_head")


def test_gpt2_pruned_state_dict_round_trip_into_a_fresh_model():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = magnitude_prune(GPT2MLP(64, gpt2_config()).eval(), 0.7)
    state = mlp.state_dict()
    assert tuple(state["c_fc.weight"].shape) == (64, 32)  # stored [out, in] once converted
    fresh = GPT2MLP(64, gpt2_config()).eval()
    magnitude_prune(fresh, 0.0)  # convert the same layers, then the loaded masks replace its own
    fresh.load_state_dict(state)
    assert (fresh.c_fc.mask == mlp.c_fc.mask).all() and fresh.c_fc.density == pytest.approx(0.3, abs=0.05)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(fresh(x), mlp(x), rtol=0, atol=0)


def test_gpt2_whole_model_clustered_leaves_tied_head_and_embedding():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="cluster: layer 'lm_head' left unchanged: its weight is tied"):
        cluster_weights(model, num_clusters=16, scope="global")
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert len(layers) == 8 and len({id(m.codebook) for m in layers}) == 1 and conv1d_names(model) == []
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight.detach(), wte, rtol=0, atol=0)
    assert torch.isfinite(model(torch.randint(0, 64, (2, 5))).logits).all()
