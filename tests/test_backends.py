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
    out = subprocess.run([sys.executable, "-m", "transfuse_cli", "info"], check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out)
    assert report["extension"].startswith("built")
    assert report["backends"]["reference"]["cpu"] is True
    assert "torch" in report["versions"]


def test_bench_command_writes_json_and_plot(tmp_path):
    subprocess.run([sys.executable, "-m", "transfuse_cli", "bench", "--model", "none", "--ops",
                    "norm,activation", "--repeat", "2", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    ops = {row["op"] for row in report["ops"]}
    assert {"add+layer_norm fwd", "rms_norm fwd", "layer_norm bwd", "bias+gelu fwd",
            "layer_norm dispatch (1x64)", "rms_norm dispatch (1x64)",
            "bias_gelu dispatch (1x64)"} <= ops
    for row in report["ops"]:
        assert all(v > 0 for v in row["ms"].values())
        assert row["speedup_vs_baseline"]["eager"] == 1.0
    assert report["device"] and report["versions"]["torch"] == torch.__version__
    assert (tmp_path / "bench-cpu.png").stat().st_size > 0


@pytest.fixture
def fresh_resolve():
    backends._resolve.cache_clear()
    yield
    backends._resolve.cache_clear()


def test_unknown_environment_backend_is_named_at_patch_and_at_resolve(monkeypatch, fresh_resolve):
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND must be one of .*got 'bogus'"):
        backends.check_requested()
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND must be one of .*got 'bogus'"):
        backends.resolve("norm", None, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.LayerNorm(8))
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND"):
        transfuse.patch(model)
    assert type(model[0]) is torch.nn.LayerNorm  # checked before any work
    assert transfuse.info()["TRANSFUSE_BACKEND"].startswith("bogus (unusable: ")
    assert transfuse.patch(model, backend="reference") is model  # the argument wins
    with pytest.raises(ValueError, match="^backend must be one of .*got 'bogus'"):
        backends.check_requested("bogus")


def test_unavailable_environment_backend_says_why_at_patch(no_extension, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND='cpu' cannot run on this machine: "
                                         ".*simulated build failure"):
        transfuse.patch(torch.nn.Sequential(torch.nn.LayerNorm(8)))
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND='cpu' cannot run this norm op: "
                                         ".*simulated build failure"):
        backends.resolve("norm", None, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_backend_without_cuda_names_the_variable(monkeypatch, fresh_resolve):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="TRANSFUSE_BACKEND='cuda' cannot run on this machine: "
                                         ".*CUDA is not available"):
        backends.check_requested()
    with pytest.raises(ValueError, match="^backend='cuda' cannot run on this machine"):
        transfuse.patch(torch.nn.Sequential(torch.nn.LayerNorm(8)), backend="cuda")


def test_auto_on_cuda_follows_the_measured_order(monkeypatch, fresh_resolve):
    """With every backend available, auto on CUDA tensors takes the one the H200 runs measured
    faster per case (backends.AUTO_ORDER); the reason a skipped one is missing is named."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "missing_reason", lambda backend, device_type: "")
    cuda = torch.device("cuda")
    expected = {"attention": "triton", "attention_small": "cuda", "attention_decode": "cuda",
                "int8": "triton", "int8_small": "cuda", "int8_weight_only": "cuda",
                "quantize": "cuda", "bias_gelu": "cuda", "silu_mul": "cuda", "gelu_mul": "cuda",
                "norm": "cuda", "rotary": "cuda", "linear": "cuda"}
    assert {case: backends.resolve(case, None, cuda) for case in expected} == expected
    assert backends.resolve("attention", "cuda", cuda) == "cuda"  # an explicit choice stays
    backends._resolve.cache_clear()
    monkeypatch.setattr(backends, "missing_reason",
                        lambda backend, device_type: "planted" if backend == "triton" else "")
    with pytest.warns(RuntimeWarning, match="attention on cuda uses the cuda backend because "
                                            "triton is unavailable: planted"):
        assert backends.resolve("attention", None, cuda) == "cuda"


def test_each_op_asks_auto_for_its_case(monkeypatch):
    """Decoding (one query row, padded or packed) and prefill attention, w8a8 and w8a16,
    quantization and each activation are separate cases of auto: the ops name them. Prefill
    attention and w8a8 are "_small" below backends.TRITON_MIN_FLOPS (4 q.numel() S_kv, and
    2 m n k), here lowered to the calls' flops."""
    from transfuse.ops import _backend
    asked = []
    monkeypatch.setattr(_backend, "resolve", lambda case, backend, device: asked.append(case)
                        or "reference")
    ops = transfuse.ops

    def case_of(call):
        asked.clear()
        call()
        return set(asked)

    q = torch.randn(1, 2, 1, 8)
    kv = torch.randn(1, 2, 5, 8)
    assert case_of(lambda: ops.attention(q, kv, kv)) == {"attention_decode"}
    monkeypatch.setattr(backends, "TRITON_MIN_FLOPS", 4 * kv.numel() * 5)
    assert case_of(lambda: ops.attention(kv, kv, kv)) == {"attention"}
    assert case_of(lambda: ops.attention(kv, kv[:, :, :4], kv[:, :, :4])) == {"attention_small"}
    packed_q, packed_kv = torch.randn(2, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 7],
                                                                          dtype=torch.int32)
    assert case_of(lambda: ops.varlen_attention(packed_q, packed_kv, packed_kv, cu_q, cu_k, 1,
                                                4)) == {"attention_decode"}
    monkeypatch.setattr(backends, "TRITON_MIN_FLOPS", 4 * packed_kv.numel() * 4)
    assert case_of(lambda: ops.varlen_attention(packed_kv, packed_kv, packed_kv, cu_k, cu_k, 4,
                                                4)) == {"attention"}
    monkeypatch.setattr(backends, "TRITON_MIN_FLOPS", 4 * packed_kv.numel() * 4 + 1)
    assert case_of(lambda: ops.varlen_attention(packed_kv, packed_kv, packed_kv, cu_k, cu_k, 4,
                                                4)) == {"attention_small"}
    w, s = transfuse.reference.quantize_per_token(torch.randn(3, 8))
    x = torch.randn(2, 8)
    monkeypatch.setattr(backends, "TRITON_MIN_FLOPS", 2 * 2 * 3 * 8)
    assert case_of(lambda: ops.int8_linear(x, w, s, None, "w8a8")) == {"int8"}
    assert case_of(lambda: ops.int8_matmul(w[:2], w)) == {"int8"}
    monkeypatch.setattr(backends, "TRITON_MIN_FLOPS", 2 * 2 * 3 * 8 + 1)
    assert case_of(lambda: ops.int8_linear(x, w, s, None, "w8a8")) == {"int8_small"}
    assert case_of(lambda: ops.int8_matmul(w[:2], w)) == {"int8_small"}
    assert case_of(lambda: ops.int8_linear(x, w, s, None, "w8a16")) == {"int8_weight_only"}
    assert case_of(lambda: ops.quantize_per_token(x)) == {"quantize"}
    assert case_of(lambda: ops.bias_gelu(x, torch.randn(8))) == {"bias_gelu"}
    assert case_of(lambda: ops.silu_mul(x, x)) == {"silu_mul"}
    assert case_of(lambda: ops.gelu_mul(x, x)) == {"gelu_mul"}
