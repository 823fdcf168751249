"""Export a training checkpoint (any ZeRO stage) to an HF BART folder, optionally averaging.

    python -m pretrain.export --save-dir runs/pretrain --out runs/bart-janus            # newest checkpoint
    python -m pretrain.export --save-dir runs/pretrain --tag step_00001000 --out DIR
    python -m pretrain.export --save-dir runs/pretrain --average 5 --out DIR           # mean of the last 5

The folder loads with ``BartForConditionalGeneration.from_pretrained`` (tied embeddings
checked identical before writing) and with ``JanusBart.from_bart`` (JANUS extras included);
the tokenizer the model was trained with is copied in: the copy each checkpoint stores (checked against
the hashes recorded at save); for older checkpoints the run's tokenizer folder, only while it still
matches the one training started with. A damaged checkpoint or a mismatching tokenizer is refused,
naming the file.
"""
from __future__ import annotations

import argparse
import json

from janus.export import export  # the export logic lives in the core (finetune/NMT share it)

__all__ = ["export", "main"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="the run's save_dir (holds checkpoints/)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    p.add_argument("--average", type=int, default=0, help="average the last K complete checkpoints")
    args = p.parse_args(argv)
    try:
        info = export(args.save_dir, args.out, args.tag, args.average)
    except (OSError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
