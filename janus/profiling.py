"""Where time and memory go: ``torch.profiler`` traces of chosen steps, CUDA memory snapshots.

``--run.profile_steps A-B`` profiles steps A..B on every rank and writes, under
``<save_dir>/profile/``, a Chrome trace (``rank<R>.chrome_trace.json``, open in ``chrome://tracing``
or https://ui.perfetto.dev) and the same trace under the TensorBoard profiler plugin's name
(``rank<R>.<time>.pt.trace.json``, what ``tensorboard_trace_handler`` writes; ``tensorboard --logdir
<save_dir>/profile`` with ``torch-tb-profiler`` installed). The ranges
are named ``data wait``, ``stream building``, ``encoder``, ``decoder``, ``vocabulary losses``,
``backward``, ``optimizer step`` and ``logging``; on CUDA the trace also records the kernels,
tensor shapes and memory.

``--run.memory_snapshot N`` (CUDA) records the caching allocator's history from the start and
writes ``<save_dir>/memory/rank<R>_step<N>.pickle`` after step N, and ``rank<R>_oom.pickle`` on
an out-of-memory error (then re-raises it); drag a file onto https://pytorch.org/memory_viz.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def parse_steps(text: str) -> tuple[int, int] | None:
    """``"A-B"`` (or ``"A"``) -> (A, B); empty -> None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2) or m.group(1)) < int(m.group(1)):
        raise ValueError(f"run.profile_steps must be 'A-B' with 1 <= A <= B (or one step 'A'), got {text!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def _model_ranges(module) -> list[tuple[object, str, str]]:
    """(owner, attribute, range name) of the model's phases: the encoder and decoder passes of the
    module, the stream builder and the loss function its forward calls."""
    import janus.model as model_module

    found = [(module, "encode", "encoder"), (module, "run_decoder", "decoder"),
             (model_module, "build_streams", "stream building"), (model_module, "janus_losses", "vocabulary losses")]
    return [(owner, attr, name) for owner, attr, name in found if callable(getattr(owner, attr, None))]


@contextlib.contextmanager
def _named(module):
    """Wrap the model's phases in ``record_function`` ranges while the profiler runs (only then)."""
    saved = []
    for owner, attr, name in _model_ranges(module):
        fn = getattr(owner, attr)

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            with record_function(__name):
                return __fn(*args, **kwargs)

        saved.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, before in reversed(saved):
            if before is None:
                delattr(owner, attr)  # an instance attribute shadowing the method: remove it
            else:
                setattr(owner, attr, before)


class StepProfiler:
    """The loop calls ``begin(step)`` before a step and ``end(step)`` after it; ``range(name)`` is a
    ``record_function`` while profiling and free otherwise."""

    def __init__(self, steps: tuple[int, int] | None, save_dir: str, rank: int, module, dev: torch.device):
        self.steps, self.rank, self.module, self.dev = steps, rank, module, dev
        self.folder = os.path.join(save_dir, "profile")
        self._prof = None
        self._names = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def range(self, name: str):
        return record_function(name) if self._prof is not None else contextlib.nullcontext()

    def begin(self, step: int) -> None:
        if self.steps is None or self._prof is not None or step != self.steps[0]:
            return
        cuda = self.dev.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._prof = profile(activities=activities, record_shapes=cuda, profile_memory=cuda, with_stack=False)
        self._names = _named(self.module)
        self._names.__enter__()
        self._prof.__enter__()

    def end(self, step: int) -> None:
        if self._prof is None or step < self.steps[1]:
            return
        self.close()

    def close(self) -> None:
        """Stop and write the traces (also when training stops inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self._names.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        chrome = os.path.join(self.folder, f"rank{self.rank}.chrome_trace.json")
        prof.export_chrome_trace(chrome)  # a trace exports once: the plugin's file is the same JSON, linked
        plugin = os.path.join(self.folder, f"rank{self.rank}.{time.time_ns()}.pt.trace.json")  # tensorboard_trace_handler's name
        try:
            os.link(chrome, plugin)
        except OSError:
            shutil.copyfile(chrome, plugin)
        if self.rank == 0:
            print(f"profile of steps {self.steps[0]}-{self.steps[1]}: {self.folder} (TensorBoard: tensorboard "
                  f"--logdir {self.folder}; Chrome/Perfetto: {chrome})", flush=True)


class MemorySnapshot:
    """CUDA allocator history, dumped after one step and on an out-of-memory error."""

    def __init__(self, at_step: int | None, save_dir: str, rank: int, dev: torch.device):
        self.at_step, self.rank = at_step, rank
        self.folder = os.path.join(save_dir, "memory")
        self.enabled = at_step is not None and dev.type == "cuda"
        if at_step is not None and not self.enabled and rank == 0:
            print(f"run.memory_snapshot: memory snapshots need CUDA (this run is on {dev.type}); no snapshot will be "
                  "written. On CPU, the step's memory is in benchmarks.train_step's peak figures", file=sys.stderr,
                  flush=True)
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def dump(self, name: str) -> str | None:
        if not self.enabled:
            return None
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"rank{self.rank}_{name}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        print(f"rank {self.rank}: CUDA memory snapshot in {path} (open it at https://pytorch.org/memory_viz)",
              file=sys.stderr, flush=True)
        return path

    def after_step(self, step: int) -> None:
        if self.enabled and step == self.at_step:
            self.dump(f"step{step}")

    def close(self) -> None:
        if self.enabled:
            torch.cuda.memory._record_memory_history(enabled=None)
