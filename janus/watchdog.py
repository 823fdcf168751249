"""Step watchdog: a hung step ends the job in minutes, with every rank's Python stacks on disk.

A rank stuck in a collective (a peer hung, a network fault, a desynchronised step) cannot notice
anything itself, so each rank runs one daemon thread with a deadline. The loop ``arm``s it at the
start of every training step and ``disarm``s it around work bounded by the process-group timeout
instead (evaluation, saving, export). When a deadline passes, the thread writes the stacks of
every thread of its process (``faulthandler``) to ``<save_dir>/hangs/<run start>/rank<R>.txt``,
dumps NCCL's flight recorder next to it where torch has one (``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0),
waits a little for the other ranks' files and exits with ``HANG_EXIT_CODE``. Every rank fires on
its own deadline: the healthy ones are blocked in a collective waiting for the hung one, whose
steps started at the same time, so all of them dump.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time

import torch

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, worth a retry (the batch script requeues on it)
PEER_WAIT_S = 20.0  # how long a firing rank waits for the other ranks' dumps before it exits


class StepWatchdog:
    def __init__(self, timeout_s: float, save_dir: str, run_tag: str, rank: int, world: int):
        self.timeout_s, self.rank, self.world = timeout_s, rank, world
        self.folder = os.path.join(save_dir, "hangs", run_tag)
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._step = 0
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="janus-step-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step: int) -> None:
        """Step ``step`` starts now: it must end within the timeout."""
        with self._cond:
            self._deadline, self._step = time.monotonic() + self.timeout_s, step
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed, self._deadline = True, None
            self._cond.notify()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
            if self._closed:
                return
            step = self._step
        self._fire(step)

    def _fire(self, step: int) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"rank{self.rank}.txt")
        with open(path + ".tmp", "w") as f:
            f.write(f"rank {self.rank} of {self.world} on {socket.gethostname()} (pid {os.getpid()}): step {step} "
                    f"did not finish within {self.timeout_s:.0f} s (--run.hang_timeout_minutes); "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\nPython stacks of every thread, most recent call first:\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        os.replace(path + ".tmp", path)
        nccl = self._dump_nccl()
        print(f"rank {self.rank}: step {step} hung for {self.timeout_s:.0f} s: stacks in {path}"
              + (f", NCCL flight recorder in {nccl}" if nccl else "") + f"; exiting with {HANG_EXIT_CODE}",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + PEER_WAIT_S  # let the other ranks dump before this one's exit breaks their collectives
        while time.monotonic() < deadline and any(not os.path.exists(os.path.join(self.folder, f"rank{r}.txt"))
                                                  for r in range(self.world)):
            time.sleep(0.2)
        os._exit(HANG_EXIT_CODE)

    def _dump_nccl(self) -> str | None:
        """NCCL's flight recorder (the last collectives of every process group), where this torch has one."""
        dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if dump is None or int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0") or 0) <= 0:
            return None
        try:
            data = dump()
        except Exception as err:  # noqa: BLE001 - a diagnosis must never mask the hang itself
            print(f"rank {self.rank}: NCCL flight recorder dump failed: {err}", file=sys.stderr, flush=True)
            return None
        path = os.path.join(self.folder, f"nccl_trace_rank_{self.rank}")  # torchfrtrace -p nccl_trace_rank <folder>
        with open(path, "wb") as f:
            f.write(data)
        return path
