"""`torchslim run` end to end with tiny epochs: outputs, report.json schema, the saved model,
and CLI argument errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchslim
from torchslim.cli import main
from torchslim.pipeline import PipelineConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGE_KEYS = {"name", "accuracy", "params", "nonzeros", "bytes", "compression_ratio", "latency_b1_ms", "latency_b256_ms"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_outputs(out: Path, names: list[str]) -> dict:
    for f in ("report.md", "report.json", "model.safetensors", "accuracy_vs_size.png", "layer_sparsity.png",
              "weight_histogram.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] == names
    for s in stages:
        assert STAGE_KEYS <= set(s)
        assert 0.0 <= s["accuracy"] <= 1.0
        assert s["params"] >= s["nonzeros"] > 0 and s["bytes"] > 0 and s["compression_ratio"] > 0
        assert s["latency_b1_ms"] > 0 and s["latency_b256_ms"] > 0
    assert stages[0]["name"] == "dense" and stages[-1].get("final") is True
    assert stages[-1]["bytes"] == (out / "model.safetensors").stat().st_size
    md = (out / "report.md").read_text()
    for s in stages:
        assert f"| {s['name']} |" in md
    # the deployable model reloads and scores what the report says
    from torchslim.data import load_dataset
    from torchslim.distill import accuracy
    split = load_dataset(report["config"]["data"], seed=report["config"]["seed"])
    model = torchslim.load(out / "model.safetensors")
    if stages[-1]["name"].endswith("deploy"):
        model = torchslim.io.to_sparse(model)
    assert accuracy(model, split.x_test, split.y_test) == pytest.approx(stages[-1]["accuracy"])
    assert report["summary"]["reload_matches"] is True
    return report


def test_dense_and_student_only(tmp_path, capsys):
    rc = main(["run", "--no-prune", "--no-share", "--epochs", "2", "--hidden", "32,16", "--student-hidden", "8",
               "--out", str(tmp_path), "--no-progress", "--seed", "1", "--latency-time", "0.01"])
    assert rc == 0
    report = _check_outputs(tmp_path, ["dense", "student"])
    assert report["config"]["hidden"] == [32, 16]
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| student |" in printed


def test_full_pipeline_tiny(tmp_path):
    out = tmp_path / "o"
    rc = main(["run", "--epochs", "3", "--prune-epochs", "2", "--share-epochs", "1", "--sparsity", "0.8", "--bits", "3",
               "--student-hidden", "16", "--hidden", "48,24", "--out", str(out), "--no-progress",
               "--latency-time", "0.01"])
    assert rc == 0
    report = _check_outputs(out, ["dense", "pruned", "shared", "deploy", "student", "student-pruned",
                                  "student-shared", "student-deploy"])
    st = {s["name"]: s for s in report["stages"]}
    assert st["pruned"]["nonzeros"] <= 0.25 * st["dense"]["params"]
    assert st["shared"]["bytes"] < st["pruned"]["bytes"] < st["dense"]["bytes"]
    assert st["student-shared"]["compression_ratio"] > st["shared"]["compression_ratio"]
    # deploy: the student-shared file, run as sparse layers
    assert st["student-deploy"]["bytes"] == st["student-shared"]["bytes"]
    assert st["student-deploy"]["nonzeros"] == st["student-shared"]["nonzeros"]
    assert st["deploy"]["bytes"] == st["shared"]["bytes"]
    loaded = torchslim.load(out / "model.safetensors")
    assert any(type(m).__name__ == "CodebookLinear" for m in loaded.modules())


def test_global_codebook_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    payload = run_pipeline(PipelineConfig(data=str(tmp_path / "d.npz"), hidden=(16,), epochs=2, prune_epochs=1,
                                          share_epochs=1, global_codebook=True, bits=2, out=str(tmp_path / "o"),
                                          progress=False, verbose=False, latency_min_run_time=0.01))
    assert [s["name"] for s in payload["stages"]] == ["dense", "pruned", "shared", "deploy"]
    model = torchslim.load(tmp_path / "o" / "model.safetensors")
    cbs = {id(m.codebook) for m in model.modules() if hasattr(m, "codebook")}
    assert len(cbs) == 1


def test_python_dash_m_entry_point(tmp_path):
    # The child imports the same torchslim as this process (installed or the source tree).
    package_parent = os.path.dirname(os.path.dirname(torchslim.__file__))
    env = {"PYTHONPATH": package_parent, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torchslim", "run", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "--sparsity" in r.stdout and "--global-codebook" in r.stdout


@pytest.mark.parametrize("argv,match", [
    (["--hidden", "0,3"], "layer sizes"),
    (["--optimizer", "rmsprop"], "invalid choice"),
])
def test_cli_argument_errors(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--bits", "9"], "bits"),
    (["--data", "/nonexistent/data.npz"], "does not exist"),
])
def test_config_errors_exit_2(tmp_path, capsys, argv, match):
    rc = main(["run", "--out", str(tmp_path), "--no-progress", "--epochs", "1", *argv])
    assert rc == 2
    assert match in capsys.readouterr().err
