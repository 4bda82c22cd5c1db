"""`transfuse bench --peers`: the engines a user would pick instead of transfuse (ONNX Runtime,
OpenVINO, CTranslate2), built from the same encoder and called as bench.time_model calls the torch
models: side(**batch).last_hidden_state, a float32 tensor of the padded shape [batch, seq, hidden].
So they get the same batches, the same comparison with eager and the same interleaved rounds.

Every engine is optional (pip install 'transfuse[peers]'); one that is not importable is named as
skipped, with the pip command that installs it. The conversions (export, graph optimization,
quantization) run once, into a folder the caller gives, outside the timed rounds. Every engine runs
on CPU with torch's thread count (torch.get_num_threads()) and one stream. CTranslate2 runs in a
process of its own (see ctranslate2_sides); the others in the bench's.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import logging
import multiprocessing
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # what the exports take, in order


class PeerOutput(NamedTuple):
    last_hidden_state: torch.Tensor


@dataclass
class PeerSide:
    """One engine in one configuration, called as a transformers encoder is."""
    run: Callable               # the tokenizer's batch (dict of tensors) -> last_hidden_state
    weight_bytes: int | None    # the weights as the engine holds them (its file, its constants)
    timed: Callable | None = None  # the call as timed, where it differs: (**batch) -> anything

    def __call__(self, **batch):
        return PeerOutput(self.run(batch))


@dataclass
class Source:
    """What every engine builds from: the eager fp32 model and its folder (CTranslate2 converts
    from the folder), one tokenized batch to trace with, the batches to calibrate with, a folder
    for the converted files, and the thread count."""
    model: torch.nn.Module
    path: str
    example: dict
    calibration: list
    folder: Path
    threads: int
    converted: dict = field(default_factory=dict)  # what more than one engine entry reuses

    @property
    def names(self):
        return [name for name in INPUT_NAMES if name in self.example]


@dataclass
class Peers:
    sides: dict = field(default_factory=dict)     # label -> PeerSide
    skipped: dict = field(default_factory=dict)   # engine -> why (the pip command, or the error)
    notes: list = field(default_factory=list)     # what a label cannot say
    versions: dict = field(default_factory=dict)  # package -> version, of the engines that ran
    threads: int = 0


class _LastHiddenState(torch.nn.Module):
    """A copy of the model as the exporters take it: tensors in (INPUT_NAMES order), the last
    hidden state out, in eval mode. The copy keeps the eager side out of their reach:
    torch.onnx.export restores the training mode it found, and a new Module is in training mode
    (left so, the eager model would run its dropout afterwards)."""

    def __init__(self, model, names):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.names = names
        self.eval()

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).last_hidden_state


# ------------------------------------------------------------------------------- ONNX Runtime

def export_onnx(src):
    """The eager model as ONNX (opset 17, dynamic batch and sequence axes), by the TorchScript
    exporter (dynamo=False): ONNX Runtime's BERT fusions (Attention, EmbedLayerNormalization)
    match its graph, and find neither in the dynamo exporter's (torch 2.13, onnxruntime 1.32)."""
    file = src.folder / "model.onnx"
    example = tuple(src.example[name] for name in src.names)
    axes = {name: {0: "batch", 1: "seq"} for name in [*src.names, "last_hidden_state"]}
    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHiddenState(src.model, src.names), example, str(file),
                          input_names=src.names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return file


def onnxruntime_sides(src):
    """fp32: the export through onnxruntime's transformer optimizer (model_type="bert"); int8:
    quantize_dynamic of the optimized graph (QInt8 weights per channel, activations quantized per
    call; per tensor, MiniLM's sentence embeddings fell to cosine 0.947 on an AVX2 CPU)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    config = src.model.config
    optimized, quantized = src.folder / "optimized.onnx", src.folder / "optimized-int8.onnx"
    optimize_model(str(export_onnx(src)), model_type="bert", hidden_size=config.hidden_size,
                   num_heads=config.num_attention_heads).save_model_to_file(str(optimized))
    # the fused operators (com.microsoft) defeat its shape inference: their outputs are float
    quantize_dynamic(optimized, quantized, weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = src.threads, 1

    def side(file):
        session = onnxruntime.InferenceSession(str(file), options,
                                               providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return PeerSide(lambda batch: torch.from_numpy(session.run(
            None, {name: batch[name].numpy() for name in names})[0]), file.stat().st_size)

    return {"onnxruntime fp32 optimized": side(optimized),
            "onnxruntime int8 dynamic": side(quantized)}, [
        "onnxruntime: TorchScript ONNX export, optimize_model(model_type='bert'); int8: "
        "quantize_dynamic, QInt8 per-channel weights"]


# ----------------------------------------------------------------------------------- OpenVINO

def _openvino_model(src):
    """openvino.convert_model of the eager model (dynamic batch and sequence), converted once."""
    if "openvino" not in src.converted:
        import openvino
        with warnings.catch_warnings():  # tracer warnings
            warnings.simplefilter("ignore")
            src.converted["openvino"] = openvino.convert_model(
                _LastHiddenState(src.model, src.names),
                example_input=tuple(src.example[name] for name in src.names))
    return src.converted["openvino"]


def _openvino_side(src, ov_model, precision):
    """The model compiled for the CPU with `precision` as INFERENCE_PRECISION_HINT; with the
    precision it really runs (a CPU without bf16 runs f32 under the bf16 hint)."""
    import openvino
    compiled = openvino.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_NUM_THREADS": src.threads, "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": precision})
    weights = sum(op.get_byte_size() for op in ov_model.get_ordered_ops()
                  if op.get_type_name() == "Constant")
    side = PeerSide(lambda batch: torch.from_numpy(
        compiled([batch[name].numpy() for name in src.names])[0]), weights)
    return side, compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def openvino_sides(src):
    """fp32, and the bf16 hint, labelled with the precision OpenVINO chose under it."""
    import openvino
    ov_model = _openvino_model(src)
    fp32, _ = _openvino_side(src, ov_model, "f32")
    bf16, ran = _openvino_side(src, ov_model, "bf16")
    notes = ["openvino: convert_model of the torch model, compiled for CPU, "
             "INFERENCE_PRECISION_HINT f32 or bf16"]
    if ran != "bf16":
        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        notes.append(f"openvino bf16 hint: this CPU has no bf16 ({', '.join(capabilities)}), "
                     f"OpenVINO ran {ran}")
    return {"openvino fp32": fp32,
            "openvino bf16 hint" + ("" if ran == "bf16" else f" (ran {ran})"): bf16}, notes


@contextlib.contextmanager
def _quiet_nncf():
    """nncf's tables (its logger, at INFO) off, and its progress bars on stderr rather than in
    the stdout that `transfuse bench` prints its report to."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def openvino_int8_sides(src):
    """nncf.compress_weights (its default for int8: asymmetric per-channel int8 weights, f32
    activations), and nncf.quantize (post-training int8 weights and activations, calibrated on
    `src.calibration`)."""
    import nncf
    ov_model = _openvino_model(src)
    feeds = [[batch[name].numpy() for name in src.names] for batch in src.calibration]
    with _quiet_nncf():
        weights = nncf.compress_weights(ov_model.clone())
        ptq = nncf.quantize(ov_model.clone(), nncf.Dataset(feeds), subset_size=len(feeds),
                            model_type=nncf.ModelType.TRANSFORMER)
    sentences = sum(len(batch["input_ids"]) for batch in src.calibration)
    return {"openvino int8 weights": _openvino_side(src, weights, "f32")[0],
            "openvino int8 PTQ": _openvino_side(src, ptq, "f32")[0]}, [
        "openvino int8 weights: nncf.compress_weights (int8 asym per channel); int8 PTQ: "
        f"nncf.quantize, calibrated on {sentences} of the bench sentences"]


# -------------------------------------------------------------------------------- CTranslate2

def ctranslate2_forward(encoder, batch):
    """CTranslate2 takes each sequence's real tokens (a ragged list: it pads itself) and returns
    them right-padded to the longest; this puts them back where the batch has them, zeros at the
    pad positions."""
    mask = batch["attention_mask"].bool()

    def ragged(ids):
        return [row[real].tolist() for row, real in zip(ids, mask)]

    types = ragged(batch["token_type_ids"]) if "token_type_ids" in batch else None
    output = encoder.forward_batch(ragged(batch["input_ids"]), token_type_ids=types)
    hidden = torch.from_numpy(np.asarray(output.last_hidden_state))
    lengths = mask.sum(1, keepdim=True)
    padded = hidden.new_zeros(*mask.shape, hidden.shape[-1])
    padded[mask] = hidden[torch.arange(hidden.shape[1]) < lengths]
    return padded


def ctranslate2_conversions(path, folder, computes=("float32", "int8")):
    """The transformers model folder `path` through ctranslate2's TransformersConverter into
    `folder`, as float32 and with int8 weights (or the `computes` of these asked for): (side
    label, compute type, converted folder)."""
    import ctranslate2

    converter = ctranslate2.converters.TransformersConverter(path)
    for compute in computes:
        with warnings.catch_warnings():  # transformers' deprecations, as the converter loads
            warnings.simplefilter("ignore")
            converted = converter.convert(str(Path(folder) / f"ctranslate2-{compute}"), force=True,
                                          quantization=None if compute == "float32" else compute)
        yield f"ctranslate2 {'fp32' if compute == 'float32' else compute}", compute, converted


def _ctranslate2_worker(connection, path, folder, threads):
    """CTranslate2's process: converts the model folder `path` into `folder` (float32, and int8
    weights), loads each with the matching compute type, sends (label, compute type, file bytes)
    per model, then answers each (label, batch, wants_output) with the last_hidden_state (or None)
    until the pipe closes. An error goes back as the exception."""
    import ctranslate2

    try:
        encoders, about = {}, []
        for label, compute, converted in ctranslate2_conversions(path, folder):
            encoders[label] = ctranslate2.Encoder(converted, device="cpu", compute_type=compute,
                                                  intra_threads=threads, inter_threads=1)
            about.append((label, encoders[label].compute_type,
                          (Path(converted) / "model.bin").stat().st_size))
        connection.send(about)
        while True:
            label, arrays, wants_output = connection.recv()
            hidden = ctranslate2_forward(
                encoders[label], {name: torch.from_numpy(a) for name, a in arrays.items()})
            connection.send(hidden.numpy() if wants_output else None)
    except EOFError:  # the bench dropped its end: done
        return
    except Exception as error:  # noqa: BLE001 -- raised again in the bench's process
        connection.send(error)


class Worker:
    """A process running `target(connection, *args)`, asked over a pipe; it ends when this object
    goes (its end of the pipe closes)."""

    def __init__(self, target, *args):
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()
        theirs.close()

    def receive(self):
        reply = self.connection.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def ask(self, message):
        self.connection.send(message)
        return self.receive()

    def run(self, label, batch, wants_output):
        """The worker's answer to (label, batch, wants_output), tensors sent as numpy arrays (a
        tensor would go through shared memory: about 0.4 ms each way)."""
        answer = self.ask((label, {name: t.numpy() for name, t in batch.items()}, wants_output))
        return None if answer is None else torch.from_numpy(answer)


def ctranslate2_sides(src):
    """The model folder through ctranslate2's TransformersConverter, once as float32 and once
    with int8 weights; each loaded with the matching compute type. In a process of CTranslate2's
    own: it ships its own GNU OpenMP runtime, and with it loaded and run in the bench's process,
    the torch sides ran slower between its turns (AMD EPYC, 2 threads, all-MiniLM-L6-v2 8 x 128:
    transfuse fp32 133 -> 151 ms, w8a8 58 -> 76, eager 150 -> 173; OpenVINO and ONNX Runtime in
    the same process measured no such effect). A timed call sends the batch and gets no output
    back: a pipe round trip on top of the engine's time (0.13-0.17 ms for 8 x 128 tokens,
    measured)."""
    worker = Worker(_ctranslate2_worker, src.path, str(src.folder), src.threads)
    sides, computes = {}, []
    for label, compute, file_bytes in worker.receive():
        computes.append(compute)
        sides[label] = PeerSide(lambda batch, label=label: worker.run(label, batch, True),
                                file_bytes,
                                timed=lambda label=label, **batch: worker.run(label, batch, False))
    return sides, [f"ctranslate2: TransformersConverter, Encoder compute types "
                   f"{' and '.join(computes)}, in a process of its own"]


# ------------------------------------------------------------------------------------- peers

ENGINES = {  # engine -> (the modules it imports (each its own distribution's name), the pip
             # command that installs them, builder)
    "onnxruntime": (("onnxruntime", "onnx"), "pip install onnxruntime onnx", onnxruntime_sides),
    "openvino": (("openvino",), "pip install openvino", openvino_sides),
    "openvino int8": (("openvino", "nncf"), "pip install openvino nncf", openvino_int8_sides),
    "ctranslate2": (("ctranslate2",), "pip install ctranslate2", ctranslate2_sides),
}


def _importable(modules):
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def peer_sides(model, path, example, calibration, folder):
    """The sides of every engine that is importable, built from the eager fp32 `model` (and its
    folder `path`), traced with the tokenized batch `example`, int8-calibrated (OpenVINO PTQ) on
    the batches `calibration`, converted into the folder `folder` (which must outlive the
    sides: the engines may map their files). An engine that fails to convert the model is
    skipped with its error, so that one engine's limits do not end the whole bench."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"model: the peers convert an fp32 model, got "
                         f"{next(model.parameters()).dtype}")
    peers = Peers(threads=torch.get_num_threads())
    src = Source(model, str(path), example, calibration, Path(folder), peers.threads)
    for engine, (modules, pip, build) in ENGINES.items():
        if not _importable(modules):
            peers.skipped[engine] = f"not installed: {pip}"
            continue
        try:
            sides, notes = build(src)
        except Exception as error:  # noqa: BLE001 -- reported beside the figures instead
            first_line = str(error).partition("\n")[0]
            peers.skipped[engine] = f"failed: {type(error).__name__}: {first_line}"
            continue
        peers.sides.update(sides)
        peers.notes += notes
        peers.versions.update({m: importlib.metadata.version(m) for m in modules})
    return peers
