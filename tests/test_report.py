"""torchslim.report: counts, sizes (bytes_compressed is the saved file's size), latency and
accuracy fields, markdown and dict forms."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn import MaskedSparseLinear


def _model(density=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    if density is not None:
        for i in (0, 2):
            lin = model[i]
            mask = torch.rand_like(lin.weight) < density
            model[i] = MaskedSparseLinear.from_dense(lin, mask=mask)
    return model


def test_dense_report_fields(tmp_path):
    model = _model()
    x = torch.randn(7, 20)
    r = torchslim.report(model, x, eval_fn=lambda m: 0.75, min_run_time=0.01)
    assert isinstance(r, torchslim.CompressionReport)
    assert r.params_total == 20 * 30 + 30 + 30 * 5 + 5
    assert r.params_nonzero == r.params_total
    assert r.bytes_dense == 4 * r.params_total
    size = torchslim.save(model, tmp_path / "m")
    assert r.bytes_compressed == size
    assert r.compression_ratio == pytest.approx(r.bytes_dense / size)
    assert set(r.latency_ms) == {1, 256} and all(v > 0 for v in r.latency_ms.values())
    assert r.latency_b1_ms == r.latency_ms[1] and r.latency_b256_ms == r.latency_ms[256]
    assert r.accuracy == 0.75
    assert model.training  # report restores the mode


def test_sparse_report_counts_and_ratio(tmp_path):
    model = _model(density=0.1)
    nnz = int(model[0].mask.sum() + model[2].mask.sum()) + 35
    r = torchslim.report(model, torch.randn(3, 20), min_run_time=0.01)
    assert r.params_total == 20 * 30 + 30 + 30 * 5 + 5
    # masked positions whose weight happened to be zero anyway are impossible with randn
    assert r.params_nonzero == nnz
    assert r.bytes_compressed == torchslim.save(model, tmp_path / "m")
    assert r.compression_ratio > 1.5  # small layers: the header weighs in
    assert r.accuracy is None
    assert r.sparsity == pytest.approx(1 - nnz / r.params_total)


def test_eval_fn_sees_eval_mode_and_markdown_dict():
    model = _model()
    modes = []

    def eval_fn(m):
        modes.append(m.training)
        return 0.5
    r = torchslim.report(model, torch.randn(2, 20), eval_fn, batch_sizes=(1, 4), min_run_time=0.01)
    assert modes == [False]
    md = r.to_markdown()
    assert "| compression ratio |" in md and "batch 4" in md and "50.00%" in md
    d = r.to_dict()
    json.dumps(d)
    for key in ("params_total", "params_nonzero", "bytes_dense", "bytes_compressed", "compression_ratio",
                "latency_ms", "accuracy", "latency_b1_ms"):
        assert key in d
    assert d["latency_b256_ms"] is None and d["latency_ms"]["4"] > 0


def test_report_argument_errors():
    with pytest.raises(TypeError):
        torchslim.report("model", torch.randn(1, 2))
    with pytest.raises(TypeError):
        torchslim.report(_model(), [1, 2, 3])
    with pytest.raises(ValueError):
        torchslim.report(_model(), torch.randn(0, 20), min_run_time=0.01)


def test_report_module_and_function_both_work():
    import torchslim.report as report_module
    assert callable(torchslim.report)
    assert report_module.CompressionReport is torchslim.CompressionReport
    r = report_module.report(_model(), torch.randn(2, 20), measure_latency_=False)
    assert r.latency_ms == {}


def test_report_on_pruned_gpt2_counts_conv1d_and_tied_weights_once():
    transformers = pytest.importorskip("transformers")
    from torchslim.io import saved_size
    from torchslim.prune import magnitude_prune, sparsity_report

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    total = sum(p.numel() for p in model.parameters())  # the tied wte / lm_head weight once
    with pytest.warns(UserWarning, match="'lm_head' left unchanged"):
        magnitude_prune(model, 0.8)
    masked = [m for m in model.modules() if isinstance(m, MaskedSparseLinear)]
    assert len(masked) == 8  # every Conv1D
    pruned_ids = {id(m.weight) for m in masked}
    nonzero = sum(int(m.mask.sum()) for m in masked)
    nonzero += sum(int((p != 0).sum()) for p in model.parameters() if id(p) not in pruned_ids)
    sp = sparsity_report(model)
    assert sp["transformer.h.0.mlp.c_fc"].shape == (4 * 32, 32) and sp["lm_head"].sparsity == 0.0
    ids = torch.randint(0, 64, (2, 5))
    r = torchslim.report(model, ids, measure_latency_=False)
    assert r.params_total == total and r.params_nonzero == nonzero
    assert r.bytes_dense == 4 * total
    assert r.bytes_compressed == saved_size(model)
