"""A patched tiny Llama under transformers' tensor parallelism (tp_plan="auto", torch.distributed,
2 processes on the gloo backend, CPU) gives the logits of the unpatched model in one process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
from hf_models import build  # noqa: E402

WORLD = 2
IDS = torch.arange(3, 12).view(1, 9)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, path, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import transfuse
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
        weight = model.model.layers[0].self_attn.q_proj.weight
        local_rows = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
        transfuse.patch(model)
        with torch.no_grad():
            logits = model(IDS).logits
        results.put((rank, local_rows, sorted(transfuse.patched_modules(model))[:1], logits))
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put((rank, None, None, repr(error)))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_patched_llama_matches_one_process(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(IDS).logits
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, str(tmp_path), port, results))
               for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    outputs = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    for rank, local_rows, patched, logits in outputs:
        assert local_rows is not None, f"rank {rank}: {logits}"
        assert local_rows == model.model.layers[0].self_attn.q_proj.weight.shape[0] // WORLD
        assert patched == ["<attention>"]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
