"""transfuse.patch(model) in one call (norms, attention, and int8 when asked) over every supported
family: patching twice is harmless, and unpatch gives back the original outputs and state dict."""
import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")
from hf_models import FAMILIES, assert_close_scaled, build, make_batch, run  # noqa: E402


@pytest.mark.parametrize("int8", [None, "w8a16"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_one_call_twice_then_unpatch(model_type, int8):
    model, batch = build(model_type), make_batch(model_type)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = run(model, batch)
        for _ in range(2):
            assert transfuse.patch(model, int8=int8) is model
        patched = transfuse.patched_modules(model)
        assert "<attention>" in patched
        assert any("Norm" in v for v in patched.values())
        assert any("Int8Linear" in v for v in patched.values()) == (int8 is not None)
        actual = run(model, batch)
        if FAMILIES[model_type][0] != "seq2seq":  # padding removal leaves zeros at pad positions
            real = batch["attention_mask"].bool()
            actual, expected_real = actual[real], expected[real]
        else:
            expected_real = expected
        if int8 is None:
            assert_close_scaled(actual, expected_real, name=model_type)
        else:  # int8 weights: close, not equal
            assert (actual - expected_real).abs().max() <= 0.05 * expected_real.abs().max()
        transfuse.unpatch(model)
        assert dict(model.named_modules()) == modules
        assert transfuse.patched_modules(model) == {}
        torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
