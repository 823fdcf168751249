"""From checkpoints to models: fp32 consolidation of ZeRO shards, checkpoint averaging, HF export.

``export`` writes an HF BART folder (+ JANUS extras and the tokenizer the model was trained
with) from the newest complete checkpoint, a given tag, or the mean of the last K. Saving,
verifying and resuming checkpoints is ``janus.checkpoint``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from janus.checkpoint import complete_tags, verify_tag


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
