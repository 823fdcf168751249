"""Export a training checkpoint (any ZeRO stage) to an HF BART folder, optionally averaging.

    python -m pretrain.export --save-dir runs/pretrain --out runs/bart-janus            # newest checkpoint
    python -m pretrain.export --save-dir runs/pretrain --tag step_00001000 --out DIR
    python -m pretrain.export --save-dir runs/pretrain --average 5 --out DIR           # mean of the last 5

The folder loads with ``BartForConditionalGeneration.from_pretrained`` (tied embeddings
checked identical before writing) and with ``JanusBart.from_bart`` (JANUS extras included);
the tokenizer the shards were built with is copied in when it is found.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from transformers import BartConfig

from janus import checkpoint
from janus.model import JanusBart

TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def export(save_dir: str, out: str, tag: str | None = None, average: int = 0) -> dict:
    root = os.path.join(save_dir, "checkpoints")
    tags = checkpoint.complete_tags(root)
    if not tags:
        raise FileNotFoundError(f"{root}: no complete checkpoint")
    if average:
        if average > len(tags):
            raise ValueError(f"--average {average}: only {len(tags)} complete checkpoints in {root}")
        chosen = tags[-average:]
        state = checkpoint.averaged_state_dict(root, chosen)
    else:
        chosen = [tag or tags[-1]]
        if chosen[0] not in tags:
            raise FileNotFoundError(f"{root}/{chosen[0]} is not a complete checkpoint; have {tags}")
        state = checkpoint.consolidated_state_dict(root, chosen[0])
    meta = checkpoint.read_model_meta(root, chosen[-1])
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
    model.save_pretrained(out)
    tok_dir = meta.get("tokenizer_dir")
    if tok_dir and os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(out, name))
    info = {"source": root, "tags": chosen, "averaged": len(chosen) > 1, "out": out}
    with open(os.path.join(out, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="the run's save_dir (holds checkpoints/)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    p.add_argument("--average", type=int, default=0, help="average the last K complete checkpoints")
    args = p.parse_args(argv)
    info = export(args.save_dir, args.out, args.tag, args.average)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
