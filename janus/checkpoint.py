"""Checkpoints that count only when complete, RNG state per rank, export and averaging.

Layout under ``<save_dir>/checkpoints``::

    step_00000100/            DeepSpeed tag dir (model + ZeRO optimizer shards, client state)
        rng_rank{r}.pt        every rank's RNG states (CUDA: the rank's own device only)
        tokenizer/            the tokenizer the model was trained with (its files only), for export
        model_meta.json       BartConfig + JANUS extras config, to rebuild the model for export
        COMPLETE              written last, after every rank finished: only then is it a checkpoint;
                              JSON: step, world_size, ... and "files": size (and sha256 when small)
                              of every other file of the tag dir
    latest                    name of the newest complete tag (replaced atomically)
    resume_log.jsonl          one line per resume: the tag, the damaged ones skipped

An interrupted save leaves a tag dir without ``COMPLETE``; it is ignored (and cleaned up by the
next successful save), so the previous checkpoint stays the one that resumes. ``resume`` checks
every file against ``COMPLETE`` before loading, and falls back to the previous complete
checkpoint, loudly, when one is missing or has the wrong size.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from janus.distributed import barrier, is_rank0, print0

TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
HASHED_MAX_BYTES = 4 << 20  # files up to this size (RNG, meta, tokenizer) also get a sha256; every rank checks them
VIEW_RETRY_S = 5.0  # ranks disagreeing about a checkpoint's files (a lagging shared file system): look again once
RESUME_LOG = "resume_log.jsonl"


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
    if torch.cuda.is_available():  # this rank's device only: the other visible devices belong to other ranks
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, device)


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
        meta = dict(model_meta)
        meta["tokenizer_files"] = _store_tokenizer(path, model_meta)
        _write_atomic(os.path.join(path, "model_meta.json"), json.dumps(meta, indent=2))
    files = _gathered_listing(path)  # every rank's view merged: rank 0 alone may not see others' files yet
    if is_rank0():
        marker = {"step": step, **client_state.get("summary", {}), "files": files}
        _write_atomic(os.path.join(path, MARKER), json.dumps(marker))
        _write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep_last)
    barrier()
    return tag


def _store_tokenizer(path: str, model_meta: dict) -> dict | None:
    """Copy the run's tokenizer files (never model weights that share the folder) into the tag dir, so an
    export ships the tokenizer the model was trained with even if the original folder changes later.
    Returns their sha256 by name (None: nothing stored)."""
    from data_pipeline.tokenizer import file_hashes, tokenizer_files, tokenizer_problems

    source = model_meta.get("tokenizer_dir")
    if not source or not os.path.isdir(source) or not tokenizer_files(source):
        return None
    record = model_meta.get("tokenizer")
    if isinstance(record, dict) and record.get("sha256"):
        problems = tokenizer_problems(source, record, against="the one training started with",
                                      why="the tokenizer folder changed during training")
        if problems:
            print(f"WARNING: not storing the tokenizer with checkpoint {path}: " + "; ".join(problems)
                  + ". Restore the folder; export will refuse a tokenizer that does not match", file=sys.stderr, flush=True)
            return None
    target = os.path.join(path, "tokenizer")
    os.makedirs(target, exist_ok=True)
    for file in tokenizer_files(source):
        shutil.copy2(file, os.path.join(target, file.name))
    return file_hashes(target)


def _listing(path: str) -> dict[str, dict]:
    """relative path -> {"size"[, "sha256"]} of every file under a tag dir except the marker."""
    out = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if rel == MARKER or ".tmp" in name:
                continue
            size = os.path.getsize(full)
            out[rel] = {"size": size}
            if size <= HASHED_MAX_BYTES:
                out[rel]["sha256"] = _sha256(full)
    return out


def _gathered_listing(path: str) -> dict[str, dict]:
    """Collective: the union of every rank's listing; per file the entry with the largest size (the writer's
    own view is complete; another node's may lag behind it, never ahead)."""
    mine = _listing(path)
    views = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        views = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(views, mine)
    merged: dict[str, dict] = {}
    for view in views:
        for rel, entry in view.items():
            if rel not in merged or entry["size"] > merged[rel]["size"]:
                merged[rel] = entry
    return dict(sorted(merged.items()))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, MARKER)) as f:
        text = f.read()
    try:
        marker = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable": True}
    return marker if isinstance(marker, dict) else {"unreadable": True}


def verify_tag(root: str, tag: str) -> list[str]:
    """Problems of a complete checkpoint as this process sees it ("PATH: what"); empty: intact. Every file
    recorded in COMPLETE must be there with its size (and sha256 for small files); whatever the record, the
    meta and one RNG file per saving rank must exist. Cheap: stats plus hashing the small files."""
    path = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(path, MARKER)):
        return [f"{os.path.join(path, MARKER)}: missing (not a complete checkpoint)"]
    marker = read_marker(root, tag)
    if marker.get("unreadable"):
        return [f"{os.path.join(path, MARKER)}: unreadable JSON"]
    problems = []
    for rel, entry in (marker.get("files") or {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            problems.append(f"{full}: missing")
        elif (size := os.path.getsize(full)) != entry["size"]:
            problems.append(f"{full}: {size} bytes, expected {entry['size']} (truncated or overwritten)")
        elif "sha256" in entry and _sha256(full) != entry["sha256"]:
            problems.append(f"{full}: sha256 differs from the one recorded at save (overwritten)")
    required = ["model_meta.json"] + [f"rng_rank{r}.pt" for r in range(int(marker.get("world_size", 1)))]
    for rel in required:
        full = os.path.join(path, rel)
        if not os.path.isfile(full) and f"{full}: missing" not in problems:
            problems.append(f"{full}: missing")
    return problems


def _broadcast(obj):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _all_gather(obj) -> list:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        views = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(views, obj)
        return views
    return [obj]


def _agreed_problems(root: str, tag: str) -> list[str]:
    """Collective: every rank verifies the tag; the problems any rank sees (with its rank when not all see them)."""
    views = _all_gather(verify_tag(root, tag))
    if any(views) and not all(views):  # ranks disagree: give a lagging shared file system a moment
        time.sleep(VIEW_RETRY_S)
        views = _all_gather(verify_tag(root, tag))
    merged: dict[str, list[int]] = {}
    for rank, problems in enumerate(views):
        for problem in problems:
            merged.setdefault(problem, []).append(rank)
    everyone = len(views)
    return [p if len(ranks) == everyone else f"{p} (seen by rank {', '.join(map(str, ranks))})" for p, ranks in merged.items()]


def resume(engine, root: str, requested: str, world_size: int, seed: int = 0,
           fail_conversion: bool = False) -> tuple[str | None, dict, dict]:
    """Collective: choose, verify and load the checkpoint to resume from. Returns (tag or None, client state,
    info = {"requested", "tag", "fallbacks", "skipped": [{"tag", "problems"}]}).

    ``requested``: "none" (fresh start), "auto" (the newest complete checkpoint under ``root``; none there:
    fresh start) or a tag. Rank 0 lists the checkpoints and broadcasts the candidates, so every rank
    loads the same one whatever its file system shows. Each candidate is verified on every rank against
    its COMPLETE record; a damaged one is skipped with a loud warning (auto) -- the previous complete one
    is used, each skip counted in info["fallbacks"] and in ``root/resume_log.jsonl`` -- or refused (an
    explicit tag: no silent substitute). When no complete checkpoint is usable it refuses, naming every
    problem. A checkpoint written at another world size is converted to DeepSpeed's universal format
    (once, by rank 0) and loaded at this size (``janus.elastic``; ``seed`` seeds ranks the old run did
    not have, ``fail_conversion`` is a test hook)."""
    info: dict = {"requested": requested, "tag": None, "fallbacks": 0, "skipped": []}
    if requested == "none":
        return None, {}, info
    plan = None
    if is_rank0():
        tags = complete_tags(root)
        if requested == "auto":
            plan = (tags[::-1], None)
        elif requested in tags:
            plan = ([requested], None)
        else:
            state = "incomplete (no COMPLETE marker)" if os.path.isdir(os.path.join(root, requested)) else "does not exist"
            plan = ([], f"--run.resume {requested}: checkpoint {os.path.join(root, requested)} {state}; complete "
                        f"checkpoints: {', '.join(tags) or 'none'} (or --run.resume auto | none)")
    candidates, error = _broadcast(plan)
    if error:
        raise FileNotFoundError(error)
    chosen = None
    for tag in candidates:
        problems = _agreed_problems(root, tag)
        if not problems:
            chosen = tag
            break
        detail = "\n  ".join(problems)
        if requested != "auto":
            raise RuntimeError(f"checkpoint {os.path.join(root, tag)} is damaged:\n  {detail}\nRestore those files, or "
                               f"resume from another complete checkpoint with --run.resume TAG ({', '.join(candidates)} "
                               "was asked for) or --run.resume auto")
        info["fallbacks"] += 1
        info["skipped"].append({"tag": tag, "problems": problems})
        if is_rank0():
            print(f"WARNING: checkpoint {os.path.join(root, tag)} is damaged, skipping it:\n  {detail}\n"
                  "WARNING: falling back to the previous complete checkpoint", file=sys.stderr, flush=True)
    if chosen is None:
        if candidates:
            listing = "\n".join(f"  {s['tag']}:\n    " + "\n    ".join(s["problems"]) for s in info["skipped"])
            raise RuntimeError(f"no usable checkpoint in {root}: every complete checkpoint is damaged:\n{listing}\n"
                               "Restore the files named above, or start over deliberately with --run.resume none "
                               "(ideally with a new --run.save_dir, as the next saves replace these)")
        return None, {}, info
    marker = read_marker(root, chosen)
    if marker.get("world_size", world_size) != world_size:  # elastic resume: convert once, load at this size
        from janus.elastic import load_resized

        client = load_resized(engine, root, chosen, marker, seed, fail_midway=fail_conversion)
        info["elastic"] = client["elastic"]
    else:
        client = load(engine, root, chosen)
    info["tag"] = chosen
    if is_rank0():
        with open(os.path.join(root, RESUME_LOG), "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}) + "\n")
        if info["fallbacks"]:
            print(f"WARNING: resumed from {chosen} after skipping {info['fallbacks']} damaged newer checkpoint(s): "
                  + ", ".join(s["tag"] for s in info["skipped"]), file=sys.stderr, flush=True)
    return chosen, client, info


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
    converted = os.path.join(root, "universal")  # elastic-resume conversions (janus.elastic) of removed tags
    if os.path.isdir(converted):
        kept = set(complete_tags(root))
        for name in os.listdir(converted):
            if name.split(".partial-")[0] not in kept:
                shutil.rmtree(os.path.join(converted, name), ignore_errors=True)


def load(engine, root: str, tag: str) -> dict:
    """Restore model/optimizer/scheduler through DeepSpeed and this rank's RNG; returns client state.
    A checkpoint missing this rank's RNG file is incomplete (resume would not be exact): an error."""
    path = os.path.join(root, tag)
    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    rank = torch.distributed.get_rank()
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"{rng_file}: missing: checkpoint {path} is incomplete (an exact resume needs every "
                                "rank's RNG state); resume from another complete checkpoint with --run.resume TAG")
    try:
        load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file that passed the size check, or a foreign layout
        raise RuntimeError(f"loading checkpoint {path} failed ({type(err).__name__}: {err}); a file in it is damaged: "
                           "restore it, or resume from another complete checkpoint with --run.resume TAG") from err
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    set_rng_state(rng)
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


def _export_tokenizer(root: str, tag: str, meta: dict) -> str | None:
    """The tokenizer folder to ship with an export: the copy stored in the checkpoint (checked against the
    hashes recorded at save), else -- a checkpoint from before tokenizers were stored -- the run's tokenizer
    folder, only if it still is the one the model was trained with. None (with a warning): there is none."""
    from data_pipeline.tokenizer import tokenizer_files, tokenizer_problems

    record = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    stored = os.path.join(root, tag, "tokenizer")
    if os.path.isdir(stored):
        problems = tokenizer_problems(stored, record, meta.get("tokenizer_files"), against="the one recorded at save",
                                      why="the checkpoint's copy was changed")
        if problems:
            raise ValueError(f"checkpoint {os.path.join(root, tag)}: its tokenizer copy is damaged: " + "; ".join(problems)
                             + "; restore it (from the shards folder's tokenizer/ if unchanged) or export another --tag")
        return stored
    source = meta.get("tokenizer_dir")
    if not source or not os.path.isdir(source) or not tokenizer_files(source):
        print(f"WARNING: checkpoint {tag} holds no tokenizer and its run's tokenizer folder {source} is gone: exporting "
              "without one; copy the tokenizer the model was trained with into the export", file=sys.stderr, flush=True)
        return None
    if record.get("sha256"):
        problems = tokenizer_problems(source, record, against="the one the model was trained with",
                                      why="the tokenizer folder changed after training")
        if problems:
            raise ValueError("refusing to export with a different tokenizer: " + "; ".join(problems)
                             + "; restore that folder, or copy the right tokenizer into the export yourself")
    else:
        print(f"WARNING: checkpoint {tag} holds no tokenizer: copying {source} unverified (checkpoints written from now on "
              "store their tokenizer)", file=sys.stderr, flush=True)
    return source


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
    else:
        chosen = [tag or tags[-1]]
        if chosen[0] not in tags:
            raise FileNotFoundError(f"{root}/{chosen[0]} is not a complete checkpoint; have {tags}")
    for t in chosen:  # name the damaged file instead of failing somewhere inside the consolidation
        if problems := verify_tag(root, t):
            raise ValueError(f"checkpoint {os.path.join(root, t)} is damaged:\n  " + "\n  ".join(problems)
                             + "\nrestore the files, or export another checkpoint with --tag")
    metas = [read_model_meta(root, t) for t in chosen]
    meta = metas[-1]
    if len({json.dumps(m.get("tokenizer_files"), sort_keys=True) for m in metas if m.get("tokenizer_files")}) > 1:
        raise ValueError(f"--average {average}: the checkpoints {chosen} were saved with different tokenizers")
    tokenizer = _export_tokenizer(root, chosen[-1], meta)  # checked before anything is written
    state = averaged_state_dict(root, chosen) if average else consolidated_state_dict(root, chosen[0])
    model = model_from_state(state, meta)
    model.save_pretrained(out)
    if tokenizer is not None:
        from data_pipeline.tokenizer import tokenizer_files

        for file in tokenizer_files(tokenizer):
            shutil.copy2(file, os.path.join(out, file.name))
    info = {"source": root, "tags": chosen, "averaged": len(chosen) > 1, "out": out,
            "tokenizer": None if tokenizer is None else str(tokenizer)}
    with open(os.path.join(out, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
