"""Resume a checkpoint at another world size (elastic resume), optimizer state intact.

A ZeRO checkpoint holds the optimizer state partitioned over the ranks that wrote it, so it
loads only at that data-parallel size. When a run resumes with a different number of ranks
(a requeued Slurm job that got other nodes), the checkpoint is converted once into DeepSpeed's
*universal* format (per-parameter fp32 weights and Adam moments), which loads at any size:

    <save_dir>/checkpoints/step_N/                 the original (never modified)
    <save_dir>/checkpoints/universal/step_N/       the conversion; counts only with its COMPLETE
    <save_dir>/checkpoints/universal/step_N.partial-PID/   an interrupted conversion (redone)

Rank 0 converts (``deepspeed.checkpoint.ds_to_universal --inject_missing_state``) while the
other ranks wait; the result is renamed into place only when finished, so a conversion killed
midway leaves the original usable and is simply redone at the next start.

What carries over: weights, Adam moments, the LR-schedule position, the step and skip counters,
the data position (a global sample count: the next global batch is the one the old run would
have used) and the global batch size (the gradient accumulation is recomputed for the new world
size; ``janus.steps.accum_for`` refuses with the arithmetic when it cannot fit). RNG: rank r
restores the RNG state rank r saved when the old run had such a rank; every other rank seeds
torch, NumPy and Python from (run seed, step, rank) — see ``fresh_rank_seed``. Which samples a
rank sees changes with the world size anyway, so dropout masks (and hence losses, by a little)
differ from an uninterrupted run; the sample stream itself is identical.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from janus.distributed import barrier, broadcast_object, is_rank0, print0
from janus.rng import set_rng_state
from janus.steps import accum_for

UNIVERSAL = "universal"


def universal_dir(root: str) -> str:
    return os.path.join(root, UNIVERSAL)


def is_converted(root: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(universal_dir(root), tag, "COMPLETE"))


def convert(root: str, tag: str, workers: int = 4, fail_midway: bool = False) -> dict:
    """Convert ``root/tag`` into ``root/universal/tag`` (not collective: one process does it).
    Returns {"path", "seconds", "reused"}; raises with DeepSpeed's output when the conversion fails."""
    out_root = universal_dir(root)
    final = os.path.join(out_root, tag)
    if is_converted(root, tag):
        return {"path": final, "seconds": 0.0, "reused": True}
    os.makedirs(out_root, exist_ok=True)
    for name in os.listdir(out_root):  # leftovers of interrupted conversions of this tag
        if name.startswith(f"{tag}.partial-") or name == tag:
            shutil.rmtree(os.path.join(out_root, name), ignore_errors=True)
    partial = os.path.join(out_root, f"{tag}.partial-{os.getpid()}")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(root, tag),
           "--output_folder", partial, "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {os.path.join(root, tag)} to a universal checkpoint failed "
                           f"({' '.join(cmd)} exited {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if fail_midway:  # test hook: killed after DeepSpeed wrote its files, before the conversion counts
        os._exit(29)
    seconds = time.perf_counter() - t0
    with open(os.path.join(partial, "COMPLETE"), "w") as f:
        json.dump({"source": tag, "seconds": round(seconds, 2)}, f)
    os.replace(partial, final)
    return {"path": final, "seconds": seconds, "reused": False}


def fresh_rank_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a rank that has no saved RNG state (it did not exist in the old run)."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


def _seed_all(value: int) -> None:
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
    random.seed(value)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(value)


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO wrapper (or the engine's optimizer itself)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _unshare_step_counters(engine) -> int:
    """Give every optimizer state its own ``step`` tensor; returns how many were shared.

    DeepSpeed's ZeRO-3 universal loader stores ONE loaded ``step`` tensor into the state of every
    fp32 sub-group. torch's Adam/AdamW advance ``step`` in place, once per parameter group, so with
    the tensor shared each optimizer step advances it once per group: the second group (no decay)
    sees steps 6, 8, 10 ... instead of 5, 6, 7 and its bias correction (hence its updates) is wrong.
    ZeRO-1/2 load each group's step separately and are unaffected."""
    state = _base_optimizer(engine).state
    seen, shared = set(), 0
    for entry in state.values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if not torch.is_tensor(step):
            continue
        if id(step) in seen:
            entry["step"] = step.clone()
            shared += 1
        seen.add(id(entry["step"]))
    return shared


@contextlib.contextmanager
def _universal_loading(engine):
    """DeepSpeed reads ``checkpoint.load_universal`` from its config at load time only."""
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before


def load_resized(engine, root: str, tag: str, marker: dict, seed: int, fail_midway: bool = False) -> dict:
    """Collective: convert (rank 0, others wait), load the universal checkpoint, restore or seed the RNG
    and keep the saved global batch. ``marker`` is the checkpoint's COMPLETE record. Returns the client
    state with "elastic" = what was done."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    saved_world = int(marker["world_size"])
    micro = engine.train_micro_batch_size_per_gpu()
    saved_global = int(marker.get("global_batch") or engine.train_batch_size())
    new_accum = accum_for(saved_global, micro, world)  # refuses (with the arithmetic) before any conversion
    result = None
    if is_rank0():
        print0(f"checkpoint {tag} was written by {saved_world} ranks, this run has {world}: converting it to a "
               f"universal checkpoint in {universal_dir(root)} (once; the original stays as it is)")
        try:
            result = convert(root, tag, fail_midway=fail_midway)
        except Exception as err:  # every rank must learn of it, not wait forever
            result = {"error": str(err)}
    result = broadcast_object(result)
    if "error" in result:
        raise RuntimeError(result["error"])
    barrier()
    groups = _base_optimizer(engine).param_groups
    hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in groups]
    with _universal_loading(engine):
        load_path, client = engine.load_checkpoint(universal_dir(root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    # DeepSpeed's ZeRO-3 universal loader gives every parameter group the first group's hyperparameters
    # (biases and LayerNorm weights would start to decay): the groups' own settings are the run's.
    for group, own in zip(_base_optimizer(engine).param_groups, hyper):
        group.update(own)
    _unshare_step_counters(engine)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {result['path']}")
    rng_file = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if rank < saved_world:
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        rng = f"rank {rank}'s saved RNG state"
    else:
        _seed_all(fresh_rank_seed(seed, client["step"], rank))
        rng = f"fresh seed fresh_rank_seed({seed}, {client['step']}, {rank})"
    old_accum = engine.gradient_accumulation_steps()
    if saved_global != engine.train_batch_size():
        engine.set_train_batch_size(saved_global)
    print0(f"resumed {tag} at {world} ranks (written by {saved_world}): global batch kept at {saved_global} = "
           f"micro {micro} x accum {new_accum} x {world} ranks"
           + (f" (accumulation {old_accum} -> {new_accum})" if new_accum != old_accum else "")
           + (f"; conversion took {result['seconds']:.1f} s" if not result["reused"] else "; conversion reused"))
    client["elastic"] = {"saved_world_size": saved_world, "world_size": world, "global_batch": saved_global,
                         "grad_accum": new_accum, "conversion_seconds": round(result["seconds"], 2),
                         "conversion_reused": result["reused"], "rng": rng}
    return client
