"""Host synchronisations, found by construction on any device.

On a GPU, an op whose output shape depends on tensor values (``nonzero``, ``unique``, boolean-mask
indexing, ``repeat_interleave`` without an output size, ``bincount``) or that reads a value into
Python (``.item()``, ``int()``, ``bool()``) makes the host wait for every queued kernel: the step
can no longer run ahead of the device. ``torch.cuda.set_sync_debug_mode`` reports them on CUDA only;
``HostSyncs`` records the same ops through the dispatcher on any device (CPU included), so a test
can hold a training step to none; on a GPU it also records copies from the device to the host.
(Copies from the host to the device, e.g. ``torch.tensor(x, device="cuda")``, are not recorded.)
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default: "reads a value into Python (.item(), int(), bool(), float())",
    aten.nonzero.default: "nonzero (also what boolean-mask indexing runs)",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
    aten.bincount.default: "bincount",
    aten.is_nonzero.default: "bool() of a tensor",
    aten.equal.default: "torch.equal",
}


class HostSyncs(TorchDispatchMode):
    """Records every op run inside it that would synchronise the host with a GPU: ``found`` holds
    (op, why, the innermost project frame that called it)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = SYNCING.get(func)
        if func is aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is not None:
            why = None
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _bool_index(args[1]):
            why = "boolean-mask indexing (runs nonzero)"
        if func in (aten._to_copy.default, aten.copy_.default) and _to_host(func, args, kwargs or {}):
            why = "a copy from the device to the host (.cpu(), .tolist(), .numpy())"
        if why is not None:
            self.found.append((str(func), why, _caller()))
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    """Whether this copy reads a device tensor into host memory (never on a CPU-only run)."""
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    target = kwargs.get("device")
    return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype == torch.bool for i in indices)


def _caller() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "syncs.py" not in f.filename]
    frame = frames[-1] if frames else None
    return f"{frame.filename}:{frame.lineno} {frame.line}" if frame else "?"
