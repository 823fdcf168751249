"""Masking + collation throughput on one core: ours vs a fairseq-style reference, side by side.

Ours is the loader's batch path (`data_pipeline.loader.mask_and_collate`: numpy span sampling per
sample, one vectorised scatter per batch field). The reference is BART span masking written as
fairseq's DenoisingDataset does it (per-sample torch ops: sentence permutation loop, Poisson
span lengths from a Categorical, span growth loop, insertion noise) for the encoder, the same
routine with one-for-one replacement for the decoder mask, and fairseq's collate_tokens.
Both run on the same blocks with the same ratios, in alternating rounds so machine noise hits
both alike. Tokens/s counts block (label) tokens. The last line printed is one JSON object.

    python -m benchmarks.data_throughput                     # synthetic 512-token blocks
    python -m benchmarks.data_throughput --shards runs/demo_shards --rounds 5
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one core

import argparse
import json
import math
import time

import numpy as np
import torch

from data_pipeline.loader import mask_and_collate, read_manifest
from data_pipeline.masking import MaskingConfig
from data_pipeline.shards import ShardReader
from data_pipeline.vocab import VocabInfo

GOAL_TOKENS_PER_S, GOAL_SPEEDUP = 1_000_000, 5.0


def synthetic(samples: int, block_size: int, seed: int = 0) -> tuple[list[np.ndarray], VocabInfo]:
    """BART-sized vocabulary, ~70% word-start tokens, a sentence end every ~25 tokens."""
    vocab_size = 50265
    rng = np.random.default_rng(seed)
    word_start = rng.random(vocab_size) < 0.7
    sentence_end = np.zeros(vocab_size, dtype=bool)
    full_stops = np.arange(4, 14)
    sentence_end[full_stops] = True
    vocab = VocabInfo(vocab_size, 0, 1, 2, 3, vocab_size - 1, word_start, sentence_end)
    blocks = []
    for _ in range(samples):
        content = rng.integers(14, vocab_size - 1, block_size - 2)
        ends = rng.random(block_size - 2) < 1 / 25
        content[ends] = rng.choice(full_stops, int(ends.sum()))
        blocks.append(np.concatenate(([0], content, [2])))
    return blocks, vocab


def from_shards(shards: str, samples: int) -> tuple[list[np.ndarray], VocabInfo]:
    reader = ShardReader(shards, read_manifest(shards))
    return [reader.block(i % len(reader)) for i in range(samples)], VocabInfo.from_shards_dir(shards)


class FairseqStyleNoiser:
    """Straight port of fairseq's DenoisingDataset noising (BART), per sample, torch ops."""

    def __init__(self, vocab: VocabInfo, cfg: MaskingConfig) -> None:
        self.cfg, self.vocab = cfg, vocab
        self.mask_idx, self.pad_idx = vocab.mask_id, vocab.pad_id
        self.full_stop = torch.from_numpy(vocab.sentence_end)
        self.mask_whole_word = torch.from_numpy(vocab.word_start.astype(np.uint8))
        self.encoder_spans = self._poisson(cfg.encoder_lambda)
        self.decoder_spans = self._poisson(cfg.decoder_lambda)

    @staticmethod
    def _poisson(lam: float) -> torch.distributions.Categorical:
        ps, lam_k, k_factorial = [], 1.0, 1.0
        for k in range(128):
            ps.append(math.exp(-lam) * lam_k / k_factorial)
            lam_k *= lam
            k_factorial *= k + 1
            if ps[-1] < 1e-7:
                break
        return torch.distributions.Categorical(torch.tensor(ps))

    def __call__(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source = block.clone()
        if self.cfg.permute_sentences:
            source = self.permute_sentences(source)
        source = self.add_whole_word_mask(source, self.cfg.encoder_ratio, self.encoder_spans, True, 1, self.cfg.random_token_prob)
        decoder = self.add_whole_word_mask(block.clone(), self.cfg.decoder_ratio, self.decoder_spans, False, -1, 0.0)
        return source, decoder.eq(self.mask_idx)

    def permute_sentences(self, source: torch.Tensor) -> torch.Tensor:
        full_stops = self.full_stop[source]
        full_stops[-2] = True
        sentence_ends = (full_stops[1:] * ~full_stops[:-1]).nonzero(as_tuple=False) + 2
        result = source.clone()
        num_sentences = sentence_ends.size(0)
        num_to_permute = math.ceil((num_sentences * 2 * 1.0) / 2.0)
        substitutions = torch.randperm(num_sentences)[:num_to_permute]
        ordering = torch.arange(0, num_sentences)
        ordering[substitutions] = substitutions[torch.randperm(num_to_permute)]
        index = 1
        for i in ordering:
            sentence = source[(sentence_ends[i - 1] if i > 0 else 1): sentence_ends[i]]
            result[index: index + sentence.size(0)] = sentence
            index += sentence.size(0)
        return result

    def word_starts(self, source: torch.Tensor, whole_words: bool) -> torch.Tensor:
        is_word_start = self.mask_whole_word.gather(0, source) if whole_words else torch.ones(source.size(), dtype=torch.uint8)
        is_word_start[0] = 0
        is_word_start[-1] = 0
        return is_word_start

    def add_whole_word_mask(self, source: torch.Tensor, p: float, spans: torch.distributions.Categorical,
                            whole_words: bool, replace_length: int, random_ratio: float) -> torch.Tensor:
        is_word_start = self.word_starts(source, whole_words)
        num_to_mask = int(math.ceil(is_word_start.float().sum() * p))
        num_inserts = 0
        if num_to_mask == 0:
            return source
        lengths = spans.sample(sample_shape=(num_to_mask,))
        cum_length = torch.cumsum(lengths, 0)
        while cum_length[-1] < num_to_mask:
            lengths = torch.cat([lengths, spans.sample(sample_shape=(num_to_mask,))], dim=0)
            cum_length = torch.cumsum(lengths, 0)
        i = 0
        while cum_length[i] < num_to_mask:
            i += 1
        lengths[i] = num_to_mask - (0 if i == 0 else cum_length[i - 1])
        num_to_mask = i + 1
        lengths = lengths[:num_to_mask]
        lengths = lengths[lengths > 0]
        num_inserts = num_to_mask - lengths.size(0)
        num_to_mask -= num_inserts
        if num_to_mask == 0:
            return self.add_insertion_noise(source, num_inserts / source.size(0), random_ratio, replace_length)
        word_starts = is_word_start.nonzero(as_tuple=False)
        indices = word_starts[torch.randperm(word_starts.size(0))[:num_to_mask]].squeeze(1)
        mask_random = torch.FloatTensor(num_to_mask).uniform_() < random_ratio
        to_keep = torch.ones(source.size(0), dtype=torch.bool)
        is_word_start[-1] = 255  # spans never run past the end of the block
        source[indices] = self.mask_idx
        source[indices[mask_random]] = torch.randint(1, self.vocab.vocab_size, size=(int(mask_random.sum()),))
        lengths -= 1
        while indices.size(0) > 0:
            lengths -= is_word_start[indices + 1].long()
            uncompleted = lengths >= 0
            indices = indices[uncompleted] + 1
            mask_random = mask_random[uncompleted]
            lengths = lengths[uncompleted]
            if replace_length != -1:
                to_keep[indices] = 0
            else:
                source[indices] = self.mask_idx
                source[indices[mask_random]] = torch.randint(1, self.vocab.vocab_size, size=(int(mask_random.sum()),))
        source = source[to_keep]
        if num_inserts > 0:
            source = self.add_insertion_noise(source, num_inserts / source.size(0), random_ratio, replace_length)
        return source

    def add_insertion_noise(self, tokens: torch.Tensor, p: float, random_ratio: float, replace_length: int) -> torch.Tensor:
        if p == 0.0 or replace_length == -1:  # one-for-one (decoder) masks keep the block length
            return tokens
        num_tokens = len(tokens)
        n = int(math.ceil(num_tokens * p))
        noise_indices = torch.randperm(num_tokens + n - 2)[:n] + 1
        noise_mask = torch.zeros(size=(num_tokens + n,), dtype=torch.bool)
        noise_mask[noise_indices] = 1
        result = torch.LongTensor(n + len(tokens)).fill_(-1)
        num_random = int(math.ceil(n * random_ratio))
        result[noise_indices[num_random:]] = self.mask_idx
        result[noise_indices[:num_random]] = torch.randint(low=1, high=self.vocab.vocab_size, size=(num_random,))
        result[~noise_mask] = tokens
        return result

    def batch(self, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        sources, decoder_masks = zip(*(self(b) for b in blocks))
        input_ids = collate_tokens(sources, self.pad_idx)
        return {"input_ids": input_ids, "attention_mask": input_ids.ne(self.pad_idx).long(),
                "labels": collate_tokens(blocks, self.pad_idx), "decoder_mask": collate_tokens(decoder_masks, False)}


def collate_tokens(values, pad_value) -> torch.Tensor:
    """fairseq.data.data_utils.collate_tokens (right padding)."""
    size = max(v.size(0) for v in values)
    res = values[0].new(len(values), size).fill_(pad_value)
    for i, v in enumerate(values):
        res[i][: len(v)].copy_(v)
    return res


def run(blocks: list[np.ndarray], vocab: VocabInfo, cfg: MaskingConfig, micro_batch: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = [blocks[i:i + micro_batch] for i in range(0, len(blocks) - micro_batch + 1, micro_batch)]
    torch_batches = [[torch.from_numpy(b) for b in batch] for batch in batches]
    keys = [(np.zeros(len(b), np.int64), np.arange(i * micro_batch, i * micro_batch + len(b))) for i, b in enumerate(batches)]
    reference = FairseqStyleNoiser(vocab, cfg)
    max_source = max(len(b) for b in blocks)
    ours_s = ref_s = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for batch, (epochs, indices) in zip(batches, keys):
            mask_and_collate(batch, epochs, indices, cfg, vocab, 0, max_source)
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        for batch in torch_batches:
            reference.batch(batch)
        ref_s += time.perf_counter() - start
    tokens = rounds * sum(len(b) for batch in batches for b in batch)
    ours, ref = tokens / ours_s, tokens / ref_s
    return {"ours_tokens_per_s": round(ours), "reference_tokens_per_s": round(ref), "speedup": round(ours / ref, 2),
            "goal_tokens_per_s": GOAL_TOKENS_PER_S, "goal_speedup": GOAL_SPEEDUP,
            "meets_goals": bool(ours >= GOAL_TOKENS_PER_S and ours / ref >= GOAL_SPEEDUP),
            "tokens_per_round": tokens // rounds, "rounds": rounds, "micro_batch": micro_batch, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="measure on blocks of a built shards folder instead of synthetic blocks")
    parser.add_argument("--samples", type=int, default=512, help="blocks per round (default 512)")
    parser.add_argument("--block-size", type=int, default=512, help="synthetic block length (default 512)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / reference")
    parser.add_argument("--preset", choices=("paper", "reference"), default="paper")
    args = parser.parse_args(argv)
    blocks, vocab = from_shards(args.shards, args.samples) if args.shards else synthetic(args.samples, args.block_size)
    result = run(blocks, vocab, MaskingConfig(preset=args.preset), args.micro_batch, args.rounds)
    result["data"] = args.shards or f"synthetic {args.block_size}-token blocks"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
