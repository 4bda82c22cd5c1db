"""Fuzz: tiny random models quantized by transfuse.quantize and saved with save_pretrained, the
checkpoint corrupted at random (a tensor of an int8 layer dropped, its int8 weight or scales
retyped, any tensor reshaped, the quantization_config's mode / skip / quant_method edited or the
config removed), then loaded
with from_pretrained. Each load either raises (ValueError naming the tensor, or transformers' own
error for a float tensor of the wrong shape) or gives the model that was saved: the same tensors
and logits (a mode edited to the other valid mode: the same int8 weights run in that mode).
A checkpoint whose quantization_config is gone, or names a quant_method transformers does not know,
runs no quantizer in a plain load (see transfuse.hf.quantizer): it is loaded here as a user would
repair it, with quantization_config=Int8Config(...), which must raise."""
import json
import tempfile
from pathlib import Path

import pytest
import torch

import transfuse
from transfuse.nn import Int8Linear
from transfuse.ops.int8 import MODES

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hf_models import HEADS, FAMILIES, build, make_batch, run  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

MODELS = ["llama", "gpt2", "bert"]  # nn.Linear decoder, Conv1D with a tied head, encoder
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32]
SKIP_NAMES = ["lm_head", "classifier", "score", "q_proj", "mlp", "c_fc", "intermediate", "pooler",
              "nothing"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model_type, mode) -> (quantized model, its checkpoint directory, tensors, config dict)."""
    cache = {}

    def get(model_type, mode):
        if (model_type, mode) not in cache:
            model = transfuse.quantize(build(model_type), mode)
            path = tmp_path_factory.mktemp(f"{model_type}-{mode}")
            model.save_pretrained(path)
            config = json.loads((path / "config.json").read_text())
            cache[model_type, mode] = model, path, load_file(path / "model.safetensors"), config
        return cache[model_type, mode]
    return get


def logits(model, model_type, mode=None):
    """The model's output on the test batch, its int8 layers run in `mode` (default: theirs)."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    modes = [layer.mode for layer in layers]
    try:
        for layer in layers:
            layer.mode = mode or layer.mode
        with torch.no_grad():
            return run(model, make_batch(model_type))
    finally:
        for layer, previous in zip(layers, modes):
            layer.mode = previous


def reshaped(shape, draw):
    numel = int(torch.tensor(shape).prod())
    options = [(numel,), (numel, 1), (1, *shape), tuple(reversed(shape))]
    return draw(st.sampled_from(options))


@pytest.mark.filterwarnings("ignore:transfuse.*tied weights")  # GPT-2, lm_head not skipped
@settings(max_examples=16, deadline=None)
@given(data=st.data())
def test_corrupted_checkpoint_loads_the_same_model_or_raises(saved, data):
    model_type = data.draw(st.sampled_from(MODELS), label="model")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    model, path, tensors, config = saved(model_type, mode)
    tensors, config = dict(tensors), json.loads(json.dumps(config))
    int8_keys = sorted(key for key in tensors if key.rpartition(".")[0] in {  # and biases
        name for name, m in model.named_modules() if isinstance(m, Int8Linear)})
    kind = data.draw(st.sampled_from(["none", "drop", "retype", "reshape", "mode", "skip",
                                      "quant_method", "remove"]), label="corruption")
    key, expected_mode, load_kwargs = None, mode, {}
    if kind == "drop":
        key = data.draw(st.sampled_from(int8_keys), label="key")
        del tensors[key]
    elif kind == "retype":  # a float bias is cast to the model's dtype, as any float tensor
        key = data.draw(st.sampled_from([k for k in int8_keys if not k.endswith(".bias")]),
                        label="key")
        dtype = data.draw(st.sampled_from([d for d in DTYPES if d != tensors[key].dtype]))
        tensors[key] = tensors[key].to(dtype)
    elif kind == "reshape":
        key = data.draw(st.sampled_from(sorted(k for k in tensors if tensors[k].numel() > 1)),
                        label="key")
        tensors[key] = tensors[key].reshape(reshaped(list(tensors[key].shape), data.draw))
    elif kind == "mode":
        expected_mode = data.draw(st.sampled_from([*MODES, "w4a16", "W8A8", "", None, 8]))
        config["quantization_config"]["mode"] = expected_mode
    elif kind == "skip":
        config["quantization_config"]["skip"] = data.draw(
            st.lists(st.sampled_from(SKIP_NAMES), unique=True, max_size=4))
    elif kind in ("quant_method", "remove"):
        if kind == "remove":
            del config["quantization_config"]
        else:
            config["quantization_config"]["quant_method"] = data.draw(
                st.sampled_from(["transfuse_int4", "int8", "Transfuse_Int8"]))
        load_kwargs = {"quantization_config": transfuse.Int8Config(mode)}

    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config))
        try:
            loaded = HEADS[FAMILIES[model_type][0]].from_pretrained(directory, **load_kwargs)
        except (ValueError, RuntimeError) as error:
            assert kind != "none", error
            if key is None:  # a config edit
                assert isinstance(error, ValueError), error
            elif key in int8_keys or isinstance(error, ValueError):
                assert key in str(error), error
            # else: transformers' error for a float tensor's shape, which names it in its log
            return
    assert kind not in ("drop", "retype", "quant_method", "remove"), f"{kind} {key} loaded"
    assert expected_mode in MODES
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert torch.equal(logits(loaded, model_type), logits(model, model_type, expected_mode))
