import os
import platform
import subprocess
import sys

import pytest
import torch

import torchslim
from torchslim import _extension


def _expected_simd():
    """The SIMD level from the CPU's own flags (/proc/cpuinfo), capped by TORCHSLIM_SIMD as the
    extension caps it; None where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
    except (OSError, StopIteration):
        return None
    flags = set(line.split(":", 1)[1].split())
    level = "scalar"
    if {"avx2", "fma"} <= flags:
        level = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            level = "avx512"
    order = ["scalar", "avx2", "avx512"]
    cap = os.environ.get("TORCHSLIM_SIMD")
    if cap in order and order.index(cap) < order.index(level):
        level = cap
    return level


def test_build_info_keys_and_values():
    """Every value against a source build_info() does not read itself."""
    import torchslim._build_config as config

    info = torchslim.build_info()
    for key in ("version", "torch_version_built", "torch_version", "cuda_built", "cuda_available", "simd", "threads",
                "openmp", "arch", "compiler"):
        assert key in info, key
    # The C++ defines against the file CMake wrote beside the extension, and the package.
    assert info["version"] == config.VERSION
    assert info["version"] in (torchslim.__version__, "0.0.0+dev")  # a pip build, or dev_build.sh
    assert info["torch_version_built"] == config.TORCH_VERSION
    assert _extension._same_release(info["torch_version_built"], torch.__version__)
    assert info["torch_version"] == torch.__version__
    assert info["cuda_built"] is bool(config.WITH_CUDA)
    if torch.version.cuda is None:
        assert info["cuda_built"] is False  # a CPU torch cannot have CUDA kernels built against it
    assert info["cuda_available"] is (info["cuda_built"] and torch.cuda.is_available())
    # The run-time SIMD choice against the CPU's flags.
    assert info["simd"] in ("scalar", "avx2", "avx512")
    expected = _expected_simd() if platform.machine() in ("x86_64", "AMD64") else "scalar"
    if expected is not None:
        assert info["simd"] == expected, (info["simd"], expected)
    assert info["arch"] == {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine(), "other")
    assert isinstance(info["compiler"], str) and info["compiler"]
    # "threads" is live: it follows torch.set_num_threads, not a value cached at import.
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert torchslim.build_info()["threads"] == n
    finally:
        torch.set_num_threads(threads)


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
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHSLIM_SIMD": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "torchslim", "info", "--json"], capture_output=True, text=True, check=True)
    assert '"simd"' in out.stdout
