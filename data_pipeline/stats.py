"""`python -m data_pipeline.stats SHARDS`: measure the masking actually applied, print one JSON line."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np

from janus.config import add_dataclass_flags, dataclass_from_flags

from .manifest import read_manifest
from .masking import MaskingConfig, mask_sample
from .sampling import epoch_permutation
from .shards import ShardReader
from .vocab import VocabInfo


def _runs(mask: np.ndarray) -> int:
    return int(mask[0]) + int((mask[1:] & ~mask[:-1]).sum()) if len(mask) else 0


def measure(shards_dir: str, cfg: MaskingConfig, samples: int, seed: int, epoch: int) -> dict:
    """Mask `samples` blocks (the first ones of the epoch's permutation) and count what was masked."""
    manifest = read_manifest(shards_dir)
    blocks, vocab = ShardReader(shards_dir, manifest), VocabInfo.from_shards_dir(shards_dir)
    ids = epoch_permutation(seed, epoch, len(blocks))[:samples]
    content = enc_masked = dec_masked = enc_spans = dec_spans = source_tokens = 0
    for block_id in ids:
        block = blocks.block(int(block_id))
        sample = mask_sample(block, cfg, vocab, seed=seed, epoch=epoch, index=int(block_id))
        content += len(block) - 2
        enc_masked += int(sample.encoder_mask.sum())
        dec_masked += int(sample.decoder_mask.sum())
        enc_spans += _runs(sample.encoder_mask)
        dec_spans += _runs(sample.decoder_mask)
        source_tokens += len(sample.input_ids)
    return {
        "encoder_mask_ratio": enc_masked / max(content, 1),
        "decoder_mask_ratio": dec_masked / max(content, 1),
        "encoder_mean_span_length": enc_masked / max(enc_spans, 1),
        "decoder_mean_span_length": dec_masked / max(dec_spans, 1),
        "configured": asdict(cfg),
        "counts": {"samples": len(ids), "content_tokens": content, "encoder_masked_tokens": enc_masked,
                   "decoder_masked_tokens": dec_masked, "encoder_spans": enc_spans, "decoder_spans": dec_spans,
                   "encoder_input_tokens": source_tokens, "blocks_in_shards": len(blocks),
                   "tokens_in_shards": manifest["totals"]["tokens"]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.stats",
                                     description="Apply the on-the-fly masking to blocks of a shards folder and print one JSON line: "
                                                 "effective encoder/decoder mask ratios (masked / content tokens, <s> </s> excluded), "
                                                 "mean span lengths in tokens, and counts.")
    parser.add_argument("shards", help="shards folder written by data_pipeline.build")
    parser.add_argument("--samples", type=int, default=10000, help="blocks to mask (default 10000; capped at the number of blocks)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (DataConfig.seed)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose permutation and noise are measured")
    # One flag per MaskingConfig field, generated from the dataclass (a new field cannot be forgotten).
    add_dataclass_flags(parser, MaskingConfig, group=parser.add_argument_group("masking (MaskingConfig)"))
    args = parser.parse_args(argv)
    cfg = dataclass_from_flags(MaskingConfig, args)
    print(json.dumps(measure(args.shards, cfg, args.samples, args.seed, args.epoch)))


if __name__ == "__main__":
    main()
