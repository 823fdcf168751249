"""Per-sample noise: BART text infilling for the encoder, one-for-one span masking for the decoder.

Every random choice comes from Generators seeded with (seed, epoch, index, stream), so a sample's
noise is a pure function of those numbers: resuming, the number of DataLoader workers and the world
size cannot change it. Spans are placed without overlap, so the effective ratios equal the
configured ones (the reference code lets spans overlap and count zero-length spans, and drifts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocab import VocabInfo

PRESETS = ("paper", "reference")
# Stream tags must be non-zero: SeedSequence ignores trailing zeros, and [seed, epoch] seeds the permutation.
_ENCODER_STREAM, _DECODER_STREAM = 1, 2
_REFERENCE_ENCODER_SHARE = 0.5  # reference preset: each span goes to the encoder on a fair coin flip


@dataclass(frozen=True)
class MaskingConfig:
    """`paper` (default): encoder and decoder get *different* spans (JANUS §3.3, Fig. 3).
    `reference`: the released code's variant: one span sample at `encoder_ratio`/`encoder_lambda`,
    each span coin-flipped between encoder-collapsed and decoder-only, the decoder masks all spans;
    decoder_ratio/decoder_lambda/permute_sentences are not used there (spans are shared, so the
    encoder keeps the original sentence order)."""

    preset: str = field(default="paper", metadata={
        "help": "paper: separate encoder/decoder spans | reference: shared spans, coin-flipped", "choices": PRESETS})
    encoder_ratio: float = field(default=0.3, metadata={"help": "share of block tokens hidden from the encoder"})
    encoder_lambda: float = field(default=3.0, metadata={"help": "Poisson mean encoder span length (BART: 3)"})
    decoder_ratio: float = field(default=0.5, metadata={
        "help": "share of block tokens replaced by <mask> in the decoder input"})
    decoder_lambda: float = field(default=2.0, metadata={"help": "Poisson mean decoder span length (paper: 2)"})
    random_token_prob: float = field(default=0.1, metadata={
        "help": "a collapsed encoder span becomes a random token instead of <mask>"})
    permute_sentences: bool = field(default=True, metadata={"help": "shuffle sentence order in the encoder input (BART)"})
    whole_word: bool = field(default=True, metadata={
        "help": "encoder spans cover whole words (BART); false: tokens. Decoder spans are token-level"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        for name in ("encoder_ratio", "decoder_ratio", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("encoder_lambda", "decoder_lambda"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class MaskedSample:
    input_ids: np.ndarray  # int64 encoder input: <s> noised content </s>
    decoder_mask: np.ndarray  # bool, aligned with the block (labels); never True on <s>/</s>
    encoder_mask: np.ndarray  # bool over the content tokens in encoder order (for statistics)


def mask_sample(block: np.ndarray, cfg: MaskingConfig, vocab: VocabInfo, *, seed: int, epoch: int, index: int) -> MaskedSample:
    """Noise one block `<s> t_1 .. t_n </s>`; a pure function of its arguments."""
    content = np.asarray(block[1:-1], dtype=np.int64)
    enc_rng = np.random.default_rng([seed, epoch, index, _ENCODER_STREAM])
    if cfg.preset == "reference":
        unit_len = _unit_lengths(content, vocab, cfg.whole_word)
        starts, lengths = _sample_spans(enc_rng, len(unit_len), cfg.encoder_ratio, cfg.encoder_lambda)
        to_encoder = enc_rng.random(len(starts)) < _REFERENCE_ENCODER_SHARE
        dec_units = _runs_to_mask(len(unit_len), starts, lengths)
        enc_units = _runs_to_mask(len(unit_len), starts[to_encoder], lengths[to_encoder])
        enc_mask, dec_mask = np.repeat(enc_units, unit_len), np.repeat(dec_units, unit_len)
    else:
        if cfg.permute_sentences:
            content = _permute_sentences(enc_rng, content, vocab)
        unit_len = _unit_lengths(content, vocab, cfg.whole_word)
        starts, lengths = _sample_spans(enc_rng, len(unit_len), cfg.encoder_ratio, cfg.encoder_lambda)
        enc_mask = np.repeat(_runs_to_mask(len(unit_len), starts, lengths), unit_len)
        dec_rng = np.random.default_rng([seed, epoch, index, _DECODER_STREAM])
        dec_mask = span_mask(dec_rng, len(content), cfg.decoder_ratio, cfg.decoder_lambda)
    input_ids = _collapse(enc_rng, content, enc_mask, cfg.random_token_prob, vocab)
    decoder_mask = np.zeros(len(content) + 2, dtype=bool)
    decoder_mask[1:-1] = dec_mask
    return MaskedSample(input_ids=input_ids, decoder_mask=decoder_mask, encoder_mask=enc_mask)


def span_mask(rng: np.random.Generator, n: int, ratio: float, lam: float) -> np.ndarray:
    """Bool [n]: Poisson(lam) spans (>= 1) covering round(ratio * n) positions (rounded stochastically),
    non-overlapping and non-adjacent -- the decoder masking of pretraining."""
    return _runs_to_mask(n, *_sample_spans(rng, n, ratio, lam))


def _unit_lengths(content: np.ndarray, vocab: VocabInfo, whole_word: bool) -> np.ndarray:
    """Length in tokens of each masking unit (a word, or a single token)."""
    if not whole_word or len(content) == 0:
        return np.ones(len(content), dtype=np.int64)
    is_start = vocab.word_start[content]
    is_start[0] = True  # the block's first token starts a unit even without a leading space
    starts = np.flatnonzero(is_start)
    lengths = np.empty_like(starts)
    lengths[:-1] = starts[1:] - starts[:-1]  # slicing, not np.diff: this runs per sample
    lengths[-1] = len(content) - starts[-1]
    return lengths


def _sample_spans(rng: np.random.Generator, n: int, ratio: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping, non-adjacent spans over n units covering exactly round(ratio * n) units.

    The budget is rounded stochastically so the expected ratio is exact even for short blocks;
    lengths ~ Poisson(lam) conditioned on >= 1 (a zero-length span would hide nothing), the last
    one trimmed to the budget; spans go into distinct gaps between the unmasked units, uniformly.
    """
    budget = int(np.floor(ratio * n + rng.random()))
    if budget <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    draws, total = [], 0
    while total < budget:
        draw = rng.poisson(lam, size=int(budget / lam) + 4)
        draw = draw[draw > 0]
        draws.append(draw)
        total += int(draw.sum())
    lengths = np.concatenate(draws)
    cum = lengths.cumsum()
    k = int(np.searchsorted(cum, budget)) + 1
    lengths = lengths[:k]
    lengths[-1] -= cum[k - 1] - budget
    free = n - budget
    if k > free + 1:  # more spans than gaps: fold the surplus into one span
        lengths = np.append(lengths[:free], lengths[free:].sum())
        k = free + 1
    gaps = np.sort(rng.permutation(free + 1)[:k])
    starts = gaps + lengths.cumsum() - lengths
    return starts, lengths


def _runs_to_mask(n: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    delta = np.zeros(n + 1, dtype=np.int32)
    delta[starts] += 1
    delta[starts + lengths] -= 1
    return delta[:-1].cumsum() > 0


def _permute_sentences(rng: np.random.Generator, content: np.ndarray, vocab: VocabInfo) -> np.ndarray:
    """Shuffle sentences; a run of sentence-end tokens (e.g. `.` then `\"`) closes one sentence."""
    is_end = vocab.sentence_end[content]
    bounds = np.concatenate(([0], np.flatnonzero(is_end[:-1] & ~is_end[1:]) + 1, [len(content)]))
    if len(bounds) < 3:
        return content
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    order = rng.permutation(len(starts))
    lengths = lengths[order]
    new_starts = lengths.cumsum() - lengths
    gather = np.repeat(starts[order] - new_starts, lengths) + np.arange(len(content))
    return content[gather]


def _collapse(rng: np.random.Generator, content: np.ndarray, mask: np.ndarray, random_prob: float, vocab: VocabInfo) -> np.ndarray:
    """Each masked span becomes one token: <mask>, or with `random_prob` a random regular token."""
    span_start = mask.copy()
    span_start[1:] &= ~mask[:-1]
    out = content.copy()
    n_spans = int(span_start.sum())
    fill = np.full(n_spans, vocab.mask_id, dtype=np.int64)
    use_random = rng.random(n_spans) < random_prob
    fill[use_random] = rng.integers(vocab.first_regular_id, vocab.mask_id, size=int(use_random.sum()))
    out[span_start] = fill
    kept = out[~mask | span_start]
    return np.concatenate(([vocab.bos_id], kept, [vocab.eos_id]))
