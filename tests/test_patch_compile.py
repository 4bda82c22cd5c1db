"""torch.compile(fullgraph=True) over patched models (norms + attention): no graph break, the same
outputs as eager, and generate() through a compiled forward."""
import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")
from hf_models import build, make_batch, run  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_compiled_patched_model_matches_eager(model_type):
    model, batch = build(model_type), make_batch(model_type)
    expected = run(model, batch)
    transfuse.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, batch), expected, rtol=1e-5, atol=1e-6)


def test_generate_through_a_compiled_patched_forward():
    model = build("llama")
    prompts = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompts, **kwargs)
    transfuse.patch(model)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager",
                                  dynamic=True)
    assert torch.equal(model.generate(prompts, **kwargs), expected)
