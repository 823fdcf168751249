"""Stop requests: SIGUSR1, SIGTERM (and SIGXCPU) ask training to save a checkpoint at the next step boundary.

Slurm stops a job (``scancel``, the time limit, pre-emption) by sending SIGTERM to every process
of the job step -- the launcher, every rank, every DataLoader worker -- then SIGKILL after
``KillWait`` (30 s by default); at the time limit SIGXCPU comes too. ``--signal=USR1@T`` sends
USR1 the same way. So:

- every rank records the signal (``install``, done by ``init_distributed`` before anything slow,
  so a signal during start-up is not lost) and the loop all-reduces it with the other
  per-micro-batch flags: every rank stops after the same step and saves;
- DataLoader workers ignore these signals (``ignore_in_worker`` is their ``worker_init_fn``): a
  worker killed by the signal would make its rank fail before the save; the rank shuts its
  workers down itself when it is done;
- the launcher must outlive the save: ``slurm/common.sh`` starts torchrun with these signals
  ignored and ``--signals-to-handle`` without them, so torchrun neither dies nor kills its ranks.
"""
from __future__ import annotations

import signal
import threading
import time

# SIGXCPU: Slurm's time limit sends it to the step's processes along with SIGTERM (its default action kills).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGXCPU)
WORKER_IGNORED = (*STOP_SIGNALS, signal.SIGINT)

_state: dict = {"signal": 0, "time": None}


def _record(signum, frame) -> None:
    if not _state["signal"]:
        _state.update(signal=int(signum), time=time.time())


def install() -> dict:
    """Record SIGUSR1/SIGTERM/SIGXCPU from now on (main thread only). Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def requested() -> int:
    """The first stop signal received (0: none)."""
    return _state["signal"]


def received_at() -> float | None:
    """``time.time()`` when the first stop signal arrived."""
    return _state["time"]


def clear() -> None:
    _state.update(signal=0, time=None)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the stop signals are for the rank, which shuts its workers down."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
