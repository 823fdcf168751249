"""The throughput benchmark runs, and its fairseq-style reference does comparable work."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.data_throughput import FairseqStyleNoiser, synthetic
from data_pipeline.masking import MaskingConfig

REPO = Path(__file__).resolve().parents[1]


def test_reference_noiser_masks_at_roughly_the_configured_ratios():
    blocks, vocab = synthetic(64, 256)
    torch.manual_seed(0)
    noiser = FairseqStyleNoiser(vocab, MaskingConfig())
    batch = noiser.batch([torch.from_numpy(b) for b in blocks])
    assert batch["labels"].shape == (64, 256) and batch["decoder_mask"].shape == (64, 256)
    decoder_ratio = batch["decoder_mask"].float().mean().item()
    assert 0.35 < decoder_ratio < 0.6  # fairseq-style spans overlap, so it undershoots 0.5
    assert batch["input_ids"].shape[1] < 256  # encoder spans were collapsed
    assert (batch["input_ids"] == vocab.mask_id).any()


def test_benchmark_prints_json_with_both_numbers():
    result = subprocess.run([sys.executable, "-m", "benchmarks.data_throughput", "--samples", "32", "--rounds", "1", "--block-size", "128"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["ours_tokens_per_s"] > 0 and numbers["reference_tokens_per_s"] > 0
    assert abs(numbers["speedup"] - numbers["ours_tokens_per_s"] / numbers["reference_tokens_per_s"]) < 0.01
