import subprocess
import sys

import pytest
import torch

import torchslim
from torchslim import _extension


def test_build_info_keys_and_values():
    info = torchslim.build_info()
    for key in ("version", "torch_version_built", "torch_version", "cuda_built", "simd", "threads"):
        assert key in info, key
    assert info["simd"] in ("scalar", "avx2", "avx512")
    assert _extension._same_release(info["torch_version_built"], torch.__version__)
    assert info["threads"] == torch.get_num_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux") or "openmp" not in torch.__config__.parallel_info().lower(),
                    reason="OpenMP is expected where torch itself uses it (Linux wheels)")
def test_kernels_use_torchs_threads():
    """Without OpenMP at build time, at::parallel_for in the extension runs serially."""
    assert torchslim.build_info()["openmp"] is True
    # and a parallel kernel gives the same result on 1 and 2 threads
    x, w = torch.randn(3, 700), torch.randn(900, 700)
    mask = torch.rand(900, 700) < 0.3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torchslim.ops.masked_linear(x, w, mask)
        torch.set_num_threads(2)
        two = torchslim.ops.masked_linear(x, w, mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two)


def test_release_comparison():
    assert _extension._same_release("2.13.0+cpu", "2.13.0")
    assert not _extension._same_release("2.13.0+cpu", "2.14.1+cu128")


def test_mismatched_torch_gives_clear_import_error(monkeypatch):
    import torchslim._build_config as config

    monkeypatch.setattr(config, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch .* is running.*--no-build-isolation"):
        _extension.load()


def test_simd_cap_from_environment():
    code = "import torchslim; print(torchslim.build_info()['simd'])"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TORCHSLIM_SIMD": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "torchslim", "info", "--json"], capture_output=True, text=True, check=True)
    assert '"simd"' in out.stdout
