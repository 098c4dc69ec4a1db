"""Moving one step's inputs (input_ids, positions, StepMetadata) between processes and onto a device.

Rank 0 builds the step on the host once; `pack_step` turns it into bytes of numpy arrays (plain pickle,
never torch's shared-memory reductions, so nothing is left in /dev/shm), and each worker `unpack_step`s
it. `step_to_device` copies a host step to the rank's device.
"""
import dataclasses
import pickle

import numpy as np
import torch

from nanovllm.core.step_metadata import StepMetadata

Step = tuple[torch.Tensor, torch.Tensor, StepMetadata]


def map_tensors(obj, fn):
    """`obj` with `fn` applied to every tensor (or array) inside its tuples and dataclasses."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(x, fn) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


def pack_step(step: Step) -> bytes:
    return pickle.dumps(map_tensors(step, lambda t: t.numpy()), protocol=pickle.HIGHEST_PROTOCOL)


def unpack_step(payload: bytes) -> Step:
    return map_tensors(pickle.loads(payload), lambda a: torch.from_numpy(a.copy()))  # writable: broadcast fills it


def step_to_device(step: Step, device: torch.device) -> Step:
    return map_tensors(step, lambda t: t.to(device, non_blocking=True))
