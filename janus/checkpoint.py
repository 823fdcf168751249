"""Checkpoints that count only when complete: save, verify, resume (with fallback), prune, RNG per rank.

Exporting a checkpoint (consolidation, averaging, HF folders) is ``janus.export``.

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
checkpoint, loudly, when one is missing or has the wrong size. A step saved again while its complete
checkpoint exists goes to ``step_N.resave`` first and replaces ``step_N`` only once complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time

import torch

from janus.distributed import all_gather_objects, barrier, broadcast_object, is_rank0
from janus.rng import rng_state, set_rng_state  # noqa: F401  (part of this module's API)

TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
HASHED_MAX_BYTES = 4 << 20  # files up to this size (RNG, meta, tokenizer) also get a sha256; every rank checks them
VIEW_RETRY_S = 5.0  # ranks disagreeing about a checkpoint's files (a lagging shared file system): look again once
RESUME_LOG = "resume_log.jsonl"
RESAVE, REPLACED = ".resave", ".replaced"  # a complete step saved again: the new copy, the old one during the swap


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


def save(engine, root: str, step: int, client_state: dict, model_meta: dict, keep_last: int,
         fail_midway: bool = False) -> str:
    """Collective: every rank calls it. Returns the tag.

    A step whose complete checkpoint exists already (a stop on an overflow-skipped step right after
    a resume, say) is written to ``<tag>.resave`` and swapped in only once complete: the newest
    complete checkpoint is never deleted before its replacement is complete."""
    tag = tag_for(step)
    replacing = broadcast_object(is_rank0() and os.path.isfile(os.path.join(root, tag, MARKER)))
    written = tag + RESAVE if replacing else tag
    path = os.path.join(root, written)
    if is_rank0() and os.path.exists(path):  # a leftover incomplete save of the same step
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(root, tag=written, client_state=client_state, save_latest=False)
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
        if replacing:
            _swap_in(root, tag)
        _write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep_last)
    barrier()
    return tag


def _swap_in(root: str, tag: str) -> None:
    """Rank 0: replace the complete ``tag`` by its complete re-save. Killed half way, either name still
    holds a complete checkpoint and ``finish_interrupted_saves`` completes the swap."""
    final, new, old = (os.path.join(root, tag + suffix) for suffix in ("", RESAVE, REPLACED))
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(os.path.join(root, "universal", tag), ignore_errors=True)  # a conversion of the old content


def finish_interrupted_saves(root: str) -> None:
    """Rank 0, while no save runs: complete a swap a kill interrupted, drop incomplete re-saves."""
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        base = name[: -len(RESAVE)]
        if not (name.endswith(RESAVE) and TAG_RE.match(base)):
            continue
        if os.path.isfile(os.path.join(root, name, MARKER)):
            print(f"completing the interrupted replacement of checkpoint {os.path.join(root, base)}", flush=True)
            _swap_in(root, base)
        else:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in os.listdir(root):
        base = name[: -len(REPLACED)]
        if name.endswith(REPLACED) and TAG_RE.match(base):
            if os.path.isfile(os.path.join(root, base, MARKER)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            elif not os.path.exists(os.path.join(root, base)):
                os.rename(os.path.join(root, name), os.path.join(root, base))


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


def _agreed_problems(root: str, tag: str) -> list[str]:
    """Collective: every rank verifies the tag; the problems any rank sees (with its rank when not all see them)."""
    views = all_gather_objects(verify_tag(root, tag))
    if any(views) and not all(views):  # ranks disagree: give a lagging shared file system a moment
        time.sleep(VIEW_RETRY_S)
        views = all_gather_objects(verify_tag(root, tag))
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
        finish_interrupted_saves(root)
        tags = complete_tags(root)
        if requested == "auto":
            plan = (tags[::-1], None)
        elif requested in tags:
            plan = ([requested], None)
        else:
            state = "incomplete (no COMPLETE marker)" if os.path.isdir(os.path.join(root, requested)) else "does not exist"
            plan = ([], f"--run.resume {requested}: checkpoint {os.path.join(root, requested)} {state}; complete "
                        f"checkpoints: {', '.join(tags) or 'none'} (or --run.resume auto | none)")
    candidates, error = broadcast_object(plan)
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
