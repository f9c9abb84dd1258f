"""bfloat16 layers against a float64 reference, by flash-attention's rule: the error of
torchslim's bf16 path is at most 2x (plus a small absolute slack) the error of PyTorch's own
bf16 computation of the same product. Shapes are large enough that the sparse path is the
one that runs (asserted), and every SIMD level is run (TORCHSLIM_SIMD in a subprocess)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.nn import MaskedSparseLinear
from torchslim.ops import sparse_codebook_linear
from torchslim.ops.sparse_codebook_linear import sparse_codebook_pack


def _max_err(got, ref):
    return (got.double() - ref).abs().max().item()


def _check_rule(ours, torch_bf16, ref, what):
    e_ours, e_torch = _max_err(ours, ref), _max_err(torch_bf16, ref)
    assert e_ours <= 2 * e_torch + 1e-3 * ref.abs().max().item(), (what, e_ours, e_torch)


@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_masked_sparse_bf16_within_twice_torch_error(batch):
    torch.manual_seed(batch)
    out_f, in_f = 512, 768  # 393216 weights: the sparse path at batch 1 and at batch > 1 (bf16 rule: <= 0.2)
    lin = nn.Linear(in_f, out_f)
    layer = MaskedSparseLinear.from_dense(lin, mask=torch.rand(out_f, in_f) < 0.1).to(torch.bfloat16).eval()
    x = torch.randn(batch, in_f).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert layer.last_path == "sparse"
    w = (layer.weight * layer.mask).detach()
    ref = F.linear(x.double(), w.double(), layer.bias.double())
    _check_rule(y, F.linear(x, w, layer.bias), ref, f"masked batch {batch}")


@pytest.mark.parametrize("num_clusters", [16, 40])
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_sparse_codebook_bf16_within_twice_torch_error(num_clusters, batch):
    torch.manual_seed(num_clusters + batch)
    out_f, in_f = 300, 700
    labels = torch.randint(1, num_clusters, (out_f, in_f))
    keep = torch.rand(out_f, in_f) < 0.1
    row_ptr, col_idx, codes = sparse_codebook_pack(labels, keep, num_clusters=num_clusters)
    codebook = torch.randn(num_clusters).to(torch.bfloat16)
    bias = torch.randn(out_f).to(torch.bfloat16)
    x = torch.randn(batch, in_f).to(torch.bfloat16)
    y = sparse_codebook_linear(x, row_ptr, col_idx, codes, codebook, bias)
    assert y.dtype == torch.bfloat16
    w = torch.where(keep, codebook[labels], torch.zeros((), dtype=torch.bfloat16))
    ref = F.linear(x.double(), w.double(), bias.double())
    _check_rule(y, F.linear(x, w, bias), ref, f"sparse-codebook K={num_clusters} batch {batch}")


@pytest.mark.parametrize("level", ["avx2", "scalar"])
def test_bf16_rule_holds_on_lower_simd_levels(level):
    # The same checks with the SIMD level forced down (a CPU without AVX-512 / AVX512_BF16).
    code = textwrap.dedent(f"""
        import sys, pytest, torchslim
        assert torchslim._C.build_info()["simd"] == {level!r}, torchslim._C.build_info()
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {os.path.abspath(__file__)!r},
                              "-k", "within_twice"]))
    """)
    env = dict(os.environ, TORCHSLIM_SIMD=level)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
