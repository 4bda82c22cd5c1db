"""Backend selection, the package without its extension, and the `transfuse` command."""
import json
import subprocess
import sys

import pytest
import torch

import transfuse
from transfuse import backends


@pytest.fixture
def no_extension(monkeypatch):
    """The package as installed when transfuse._C failed to build."""
    monkeypatch.setattr(backends, "extension", lambda: (None, "transfuse._C could not be "
                                                        "imported (simulated build failure)"))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends._resolve.cache_clear()
    monkeypatch.setattr(backends, "_warned", set())
    yield
    backends._resolve.cache_clear()


def test_without_extension_auto_falls_back_to_reference_with_a_warning(no_extension):
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        y = transfuse.ops.rms_norm(x, w)
    torch.testing.assert_close(y, transfuse.reference.rms_norm(x, w))
    with pytest.raises(ValueError, match="backend='cpu'.*simulated build failure"):
        transfuse.ops.rms_norm(x, w, backend="cpu")
    assert "simulated build failure" in transfuse.info()["extension"]
    assert "simulated build failure" in transfuse.info()["backends"]["cpu"]["cpu"]


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("norm", None, torch.device("cpu")) == "reference"
    assert backends.resolve("norm", "cpu", torch.device("cpu")) == "cpu"  # argument wins
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        backends.resolve("norm", None, torch.device("cpu"))


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "transfuse.cli", "info"], check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out)
    assert report["extension"].startswith("built")
    assert report["backends"]["reference"]["cpu"] is True
    assert "torch" in report["versions"]


def test_bench_command_writes_json_and_plot(tmp_path):
    subprocess.run([sys.executable, "-m", "transfuse.cli", "bench", "--model", "none", "--ops",
                    "norm", "--repeat", "2", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    ops = {row["op"] for row in report["ops"]}
    assert {"add+layer_norm fwd", "rms_norm fwd", "layer_norm bwd"} <= ops
    for row in report["ops"]:
        assert all(v > 0 for v in row["ms"].values())
        assert row["speedup_vs_baseline"]["eager"] == 1.0
    assert report["device"] and report["versions"]["torch"] == torch.__version__
    assert (tmp_path / "bench-cpu.png").stat().st_size > 0
