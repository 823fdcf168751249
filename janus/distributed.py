"""Process-group set-up shared by every entry point, and rank-0 printing in one place."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from janus import stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 60.0) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; works under torchrun, the deepspeed
    launcher, srun (via torchrun) and plain ``python`` (a one-rank group). ``timeout_minutes``
    bounds every collective, including the waits of other ranks while rank 0 works alone
    (scoring, export, pruning checkpoints). Returns (rank, world_size, local_rank).
    SIGUSR1/SIGTERM are recorded from here on (``janus.stop``): a stop asked for during start-up
    is honoured at the first step boundary."""
    stop.install()
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    if not dist.is_initialized():
        backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(), int(os.environ.get("LOCAL_RANK", 0)))


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave together and tear the process group down before interpreter exit: a live gloo
    group at exit can abort a rank ("terminate called without an active exception") after
    all its work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (picklable objects; a no-op without a multi-rank group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, obj)
        return views
    return [obj]
