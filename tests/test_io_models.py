"""save / load(model=) / deploy on real architectures built from small configs (random
weights, no download): transformers' Llama (gated MLP, GQA), BERT, GPT-2 (Conv1D, tied
lm_head), a Sequential MLP, and timm's ViT when timm imports."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, MaskedSparseLinear
from torchslim.nn.deployed import DEPLOYED_TYPES, DeployedLayerError, DeployedSparseLinear
from torchslim.prune import magnitude_prune
from torchslim.share import cluster_weights

transformers = pytest.importorskip("transformers")


def _not_head(name, module):
    return not name.endswith(("lm_head", "classifier", "head"))


def _llama(hidden=64):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return lambda: transformers.LlamaForCausalLM(cfg)


def _bert(hidden=64):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return lambda: transformers.BertForSequenceClassification(cfg)


def _gpt2(hidden=64):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=hidden, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return lambda: transformers.GPT2LMHeadModel(cfg)


def _mlp(hidden=64):
    return lambda: nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, 48), nn.GELU(),
                                 nn.Linear(48, 10))


BUILDERS = {"llama": _llama, "bert": _bert, "gpt2": _gpt2, "mlp": _mlp}


def _input(name):
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return torch.randn(3, 40, generator=g)
    return torch.randint(0, 96, (2, 9), generator=g)


def _out(model, x):
    y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def _compress(model, how):
    if how in ("prune", "both"):
        magnitude_prune(model, 0.9, scope="global", include=_not_head)
    if how in ("layer", "global", "both"):
        cluster_weights(model, 16, scope="global" if how == "global" else "layer", include=_not_head)
    return model


def _fresh(name, meta=False, **kw):
    torch.manual_seed(123)  # another initialisation than the saved model's
    if meta:
        with torch.device("meta"):
            return BUILDERS[name](**kw)()
    return BUILDERS[name](**kw)()


def _compressed(name, how):
    torch.manual_seed(0)
    return _compress(BUILDERS[name]()().eval(), how)


@pytest.mark.parametrize("how", ["prune", "layer", "global", "both"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_roundtrip_into_fresh_and_meta_skeletons(tmp_path, name, how):
    model = _compressed(name, how)
    kinds = {type(m) for m in model.modules()}
    assert (MaskedSparseLinear in kinds) == (how == "prune") and (CodebookLinear in kinds) == (how != "prune")
    x = _input(name)
    with torch.no_grad():
        ref = _out(model, x)
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    for meta in (False, True):
        loaded = torchslim.load(path, model=_fresh(name, meta=meta))
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(_out(loaded, x), ref), (name, how, meta)
        assert {type(m) for m in loaded.modules()} == kinds
        if how == "global":
            books = {id(m.codebook) for m in loaded.modules() if isinstance(m, CodebookLinear)}
            assert len(books) == 1  # one shared Parameter again
        if name == "gpt2":
            assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie, restored
    if name == "mlp":  # Sequential MLPs describe themselves
        with torch.no_grad():
            assert torch.equal(_out(torchslim.load(path), x), ref)


@pytest.mark.parametrize("how", ["prune", "both"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_deploy_matches_and_refuses_gradients(tmp_path, name, how):
    model = _compressed(name, how)
    x = _input(name)
    with torch.no_grad():
        ref = _out(model, x)
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    for dep in (torchslim.deploy(model), torchslim.load(path, model=_fresh(name, meta=True), deploy=True)):
        layers = [m for m in dep.modules() if isinstance(m, DEPLOYED_TYPES)]
        assert layers and not any(isinstance(m, (MaskedSparseLinear, CodebookLinear)) for m in dep.modules())
        assert not any(p.requires_grad for p in dep.parameters())
        if how == "both":  # pruned + shared layers run from their compressed form where the rule says so
            from torchslim._path_rules import deploy_as_sparse_codebook
            from torchslim.nn import DeployedSparseCodebookLinear

            sck = [m for m in layers if isinstance(m, DeployedSparseCodebookLinear)]
            assert sck and all(deploy_as_sparse_codebook(m.density, m.in_features * m.out_features) for m in sck)
            assert all(not deploy_as_sparse_codebook(m.density, m.in_features * m.out_features)
                       for m in layers if isinstance(m, DeployedSparseLinear))
        with torch.inference_mode():
            torch.testing.assert_close(_out(dep, x), ref, rtol=1e-4, atol=1e-5)
        with pytest.raises(DeployedLayerError, match="inference-only.*to_sparse"):
            layers[0].weight
        with pytest.raises(DeployedLayerError, match="inference-only"):
            layers[0].requires_grad_(True)
        # gradients asked for anyway (the rest of the model made trainable again, or an
        # input that requires grad): the first deployed layer refuses them
        dep.requires_grad_(True)
        xg = x.clone().requires_grad_() if x.is_floating_point() else x
        with pytest.raises(DeployedLayerError, match="requires grad"):
            _out(dep, xg)
    assert any(isinstance(m, MaskedSparseLinear if how == "prune" else CodebookLinear) for m in model.modules())


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_mismatched_skeletons_give_one_clear_error(tmp_path, name):
    model = _compressed(name, "prune")
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    with pytest.raises(ValueError, match=r"does not match the model: \d+ problem\(s\).*shape") as exc:
        torchslim.load(path, model=_fresh(name, meta=True, hidden=96))
    assert "more)" in str(exc.value)  # many problems, one error, first ten shown
    skeleton = _fresh(name, meta=True)
    layers = skeleton.model.layers if name == "llama" else (
        skeleton.bert.encoder.layer if name == "bert" else skeleton.transformer.h)
    del layers[1]
    with pytest.raises(ValueError, match="names no module|missing key|unexpected key"):
        torchslim.load(path, model=skeleton)


def test_gpt2_conv1d_layers_and_manifest(tmp_path):
    from torchslim._layers import is_conv1d

    model = _compressed("gpt2", "prune")
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    from safetensors import safe_open
    import json
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["torchslim"])
    assert header["ties"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "transformer.h.0.attn.c_attn" in header["layers"] and "lm_head" not in header["layers"]
    skeleton = _fresh("gpt2", meta=True)
    assert is_conv1d(skeleton.transformer.h[0].attn.c_attn)
    loaded = torchslim.load(path, model=skeleton)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, MaskedSparseLinear)
    torchslim.save(loaded, tmp_path / "again")  # layers loaded into Conv1D skeleton slots say so
    with safe_open(str(tmp_path / "again"), "pt") as f:
        again = json.loads(f.metadata()["torchslim"])
    assert again["layers"]["transformer.h.0.attn.c_attn"]["from"] == "Conv1D"
    with pytest.raises(ValueError, match="replaced a transformers Conv1D"):  # not into an nn.Linear slot
        skel = _fresh("gpt2", meta=True)
        skel.transformer.h[0].attn.c_attn = nn.Linear(64, 192, device="meta")
        torchslim.load(tmp_path / "again", model=skel)
    # a manifest path naming a non-linear module of a real model
    header["layers"]["transformer.ln_f"] = header["layers"].pop("transformer.h.0.attn.c_attn")
    import torchslim.io as tio
    from safetensors.torch import load as st_load, save as st_save
    import zlib
    text = json.dumps(header)
    bad = st_save(st_load(path.read_bytes()), metadata={"torchslim": text,
                                                        "torchslim_crc32": str(zlib.crc32(text.encode()))})
    with pytest.raises(ValueError, match="transformer.ln_f.*LayerNorm, not a linear layer"):
        tio.load_bytes(bad, model=_fresh("gpt2", meta=True))


def test_file_is_smaller_than_the_state_dict(tmp_path):
    model = _compressed("llama", "both")
    path = tmp_path / "m.safetensors"
    size = torchslim.save(model, path)
    dense = sum(t.numel() * t.element_size() for t in torchslim.to_dense(model).state_dict().values())
    assert size < dense / 3  # embeddings stay dense here (vocab 96 x 64 of ~190k weights)


def test_timm_vit_roundtrip(tmp_path):
    try:
        import timm
    except Exception:  # noqa: BLE001  (not installable beside the pinned torch here)
        pytest.skip("timm is not installed")
    make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,  # noqa: E731
                                     num_classes=5)
    torch.manual_seed(0)
    model = _compress(make().eval(), "both")
    x = torch.randn(1, 3, 32, 32)
    torchslim.save(model, tmp_path / "m")
    loaded = torchslim.load(tmp_path / "m", model=make())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
