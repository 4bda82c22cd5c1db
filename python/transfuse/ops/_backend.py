"""The backend an op call runs on. Kept out of transfuse.backends, which `transfuse info`
imports with torch alone: the decorator imports torch._dynamo."""
import torch

from .. import backends


@torch.compiler.assume_constant_result  # a constant under torch.compile: no guard on the env
def resolve(op, backend, device):
    return backends.resolve(op, backend, device)
