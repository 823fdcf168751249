"""Guards that make GPU-only mistakes fail on a CPU machine.

``strict_device()``: every tensor factory (``torch.tensor``, ``zeros``, ``full``, ``arange`` ...)
called from the project's own code must name its device. On a GPU a factory without
``device=`` makes a CPU tensor; mixing it with CUDA tensors (``torch.stack``, a collective
under NCCL, an index) crashes there, while on CPU everything is on one device and nothing
fails. Inside this guard such a call raises ``DeviceError`` naming the file and line.
Calls from torch, DeepSpeed, transformers and the tests themselves are not checked, nor
factories whose data is already a tensor (``torch.as_tensor(t)`` keeps ``t``'s device).

``no_host_sync()``: operations that make the host wait for the device (``.item()``,
``int(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing, ``masked_select``) raise
``HostSyncError``; used on the per-micro-batch hot path, where a sync stops the CPU from
queuing work ahead of the GPU. So do host-to-device copies of Python data made by the project's
own code (``torch.tensor(0.5, device=d)``, ``torch.as_tensor([..], device=d)``): on a GPU each is a
copy from pageable memory that waits for the stream; on the CPU nothing shows it, so the call
itself is refused (``torch.full((), v, device=d)`` fills on the device instead).
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The device side of the project. data_pipeline/ and finetune/data.py are left out on purpose: they build host batches
# (CPU tensors by design, pinned and copied to the device by the training loop).
PROJECT_DIRS = tuple(os.path.join(REPO, d) + os.sep for d in ("janus", "pretrain", "finetune", "benchmarks"))
HOST_SIDE = (os.path.join(REPO, "finetune", "data.py"),)  # finetuning's batch builder: host batches too

FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.eye, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.linspace, torch.scalar_tensor, torch.as_tensor}


class DeviceError(RuntimeError):
    pass


class HostSyncError(RuntimeError):
    pass


def _project_caller() -> str | None:
    """file:line of the caller of the factory when that caller is project code (not torch's own
    internals such as the DataLoader, not a library, not a test)."""
    frame = sys._getframe(2)  # 0: here, 1: __torch_function__, 2: whoever called the factory
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    name = frame.f_code.co_filename if frame is not None else ""
    if name.startswith(PROJECT_DIRS) and name not in HOST_SIDE:
        return f"{os.path.relpath(name, REPO)}:{frame.f_lineno}"
    return None


class _StrictDevice(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            data_is_tensor = func in (torch.tensor, torch.as_tensor) and args and torch.is_tensor(args[0])
            where = None if data_is_tensor else _project_caller()
            if where is not None:
                raise DeviceError(f"{where}: torch.{func.__name__}(...) without device= makes a CPU tensor on a GPU "
                                  "run; take the device from the data it works with")
        return func(*args, **kwargs)


@contextmanager
def strict_device():
    with _StrictDevice():
        yield


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "nonzero_static", "unique", "_unique2",
            "unique_consecutive", "repeat_interleave"}


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t is not None and torch.is_tensor(t) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))
        if name in SYNC_OPS or bool_index:
            stack = "".join(traceback.format_stack(limit=12)[:-1])
            raise HostSyncError(f"host sync on the hot path: aten.{name}\n{stack}")
        return func(*args, **kwargs)


class _NoHostCopy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and args and not torch.is_tensor(args[0]):
            where = _project_caller()
            if where is not None:
                raise HostSyncError(f"{where}: torch.{func.__name__}(<python data>) on the hot path is a host-to-device "
                                    "copy from pageable memory on a GPU (the host waits for the stream); fill on the "
                                    "device (torch.full) or build the tensor once")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync():
    with _NoHostCopy(), _NoHostSync():
        yield
