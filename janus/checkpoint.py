"""Checkpoints that count only when complete, RNG state per rank, export and averaging.

Layout under ``<save_dir>/checkpoints``::

    step_00000100/            DeepSpeed tag dir (model + ZeRO optimizer shards, client state)
        rng_rank{r}.pt        every rank's RNG states
        model_meta.json       BartConfig + JANUS extras config, to rebuild the model for export
        COMPLETE              written last, after every rank finished: only then is it a checkpoint
    latest                    name of the newest complete tag (replaced atomically)

An interrupted save leaves a tag dir without ``COMPLETE``; it is ignored (and cleaned up by the
next successful save), so the previous checkpoint stays the one that resumes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from janus.distributed import barrier, is_rank0

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(root: str) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if TAG_RE.match(t) and os.path.exists(os.path.join(root, t, "COMPLETE"))]
    return sorted(tags)


def latest_complete(root: str) -> str | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: str, step: int, client_state: dict, model_meta: dict, keep_last: int,
         fail_midway: bool = False) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if is_rank0() and os.path.exists(path):  # a leftover incomplete save of the same step
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    rank = torch.distributed.get_rank()
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    if fail_midway:  # test hook: die after the shards are written, before the checkpoint counts
        os._exit(23)
    barrier()
    if is_rank0():
        _write_atomic(os.path.join(path, "model_meta.json"), json.dumps(model_meta, indent=2))
        _write_atomic(os.path.join(path, "COMPLETE"), json.dumps({"step": step, **client_state.get("summary", {})}))
        _write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep_last)
    barrier()
    return tag


def _prune(root: str, keep_last: int) -> None:
    tags = complete_tags(root)
    newest = tags[-1]
    for t in os.listdir(root):
        full = os.path.join(root, t)
        if not TAG_RE.match(t) or not os.path.isdir(full):
            continue
        stale_incomplete = t not in tags and t < newest
        too_old = keep_last > 0 and t in tags[:-keep_last]
        if stale_incomplete or too_old:
            shutil.rmtree(full, ignore_errors=True)


def load(engine, root: str, tag: str) -> dict:
    """Restore model/optimizer/scheduler through DeepSpeed and this rank's RNG; returns client state."""
    path = os.path.join(root, tag)
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rank = torch.distributed.get_rank()
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return client_state


def consolidated_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of one checkpoint, gathered from the ZeRO shards (any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    return {k.removeprefix("module."): v for k, v in state.items()}


def averaged_state_dict(root: str, tags: list[str]) -> dict[str, torch.Tensor]:
    """Uniform average of several checkpoints' fp32 weights (the paper averages the last 5)."""
    total: dict[str, torch.Tensor] = {}
    for tag in tags:
        for k, v in consolidated_state_dict(root, tag).items():
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(tags)).float() for k, v in total.items()}


def read_model_meta(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, "model_meta.json")) as f:
        return json.load(f)


TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def model_from_state(state: dict[str, torch.Tensor], meta: dict):
    """A ``JanusBart`` holding a consolidated (or averaged) training state.

    ``meta`` is the checkpoint's ``model_meta.json``; when it names an ``export_prefix`` (e.g.
    ``"nat."`` for Multi-Task NAT) only that sub-model is kept and everything else (the AT
    decoder) is dropped. Tied embeddings must be identical when the state holds several copies."""
    from transformers import BartConfig

    from janus.model import JanusBart

    prefix = meta.get("export_prefix", "")
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = dict(state)
    model = JanusBart(BartConfig.from_dict(meta["bart_config"]), **meta["janus"])
    shared = state.get("model.shared.weight")
    if shared is None:
        raise KeyError("checkpoint has no model.shared.weight")
    for k in TIED:  # ZeRO consolidation may store a tied tensor once; when present, it must be identical
        if k in state and not torch.equal(state[k], shared):
            raise ValueError(f"tied weight {k} differs from model.shared.weight in the checkpoint")
        state.pop(k, None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in TIED]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model


def export(save_dir: str, out: str, tag: str | None = None, average: int = 0) -> dict:
    """Write an HF BART folder (+ JANUS extras and the run's tokenizer) from the newest checkpoint,
    a given ``tag``, or the mean of the last ``average`` complete checkpoints."""
    root = os.path.join(save_dir, "checkpoints")
    tags = complete_tags(root)
    if not tags:
        raise FileNotFoundError(f"{root}: no complete checkpoint")
    if average:
        if average > len(tags):
            raise ValueError(f"--average {average}: only {len(tags)} complete checkpoints in {root}")
        chosen = tags[-average:]
        state = averaged_state_dict(root, chosen)
    else:
        chosen = [tag or tags[-1]]
        if chosen[0] not in tags:
            raise FileNotFoundError(f"{root}/{chosen[0]} is not a complete checkpoint; have {tags}")
        state = consolidated_state_dict(root, chosen[0])
    meta = read_model_meta(root, chosen[-1])
    model = model_from_state(state, meta)
    model.save_pretrained(out)
    tok_dir = meta.get("tokenizer_dir")
    if tok_dir and os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(out, name))
    info = {"source": root, "tags": chosen, "averaged": len(chosen) > 1, "out": out}
    with open(os.path.join(out, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
