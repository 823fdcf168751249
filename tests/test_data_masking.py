"""Span masking: purity, effective ratios, structure of encoder input and decoder mask."""
import math

import numpy as np
import pytest

from data_pipeline.masking import MaskingConfig, mask_sample
from data_pipeline.vocab import VocabInfo

VOCAB = 5000
BLOCK = 512


@pytest.fixture(scope="module")
def vocab() -> VocabInfo:
    rng = np.random.default_rng(123)
    word_start = rng.random(VOCAB) < 0.65
    sentence_end = np.zeros(VOCAB, dtype=bool)
    sentence_end[rng.choice(np.arange(4, VOCAB - 1), 60, replace=False)] = True
    return VocabInfo(VOCAB, 0, 1, 2, 3, VOCAB - 1, word_start, sentence_end)


def _block(rng: np.random.Generator, n: int = BLOCK) -> np.ndarray:
    return np.concatenate(([0], rng.integers(4, VOCAB - 1, n - 2), [2]))


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the True runs."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts, ends - starts


def test_pure_function_of_seed_epoch_index(vocab):
    block = _block(np.random.default_rng(0))
    cfg = MaskingConfig()
    a = mask_sample(block, cfg, vocab, seed=5, epoch=2, index=77)
    b = mask_sample(block.copy(), cfg, vocab, seed=5, epoch=2, index=77)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.decoder_mask, b.decoder_mask)
    for other in ({"seed": 6, "epoch": 2, "index": 77}, {"seed": 5, "epoch": 3, "index": 77}, {"seed": 5, "epoch": 2, "index": 78}):
        c = mask_sample(block, cfg, vocab, **other)
        assert not np.array_equal(a.decoder_mask, c.decoder_mask), other
        assert not np.array_equal(a.input_ids, c.input_ids), other


def test_decoder_spans_are_independent_of_encoder_settings(vocab):
    block = _block(np.random.default_rng(1))
    a = mask_sample(block, MaskingConfig(), vocab, seed=0, epoch=0, index=3)
    b = mask_sample(block, MaskingConfig(encoder_ratio=0.1, permute_sentences=False), vocab, seed=0, epoch=0, index=3)
    assert np.array_equal(a.decoder_mask, b.decoder_mask)


@pytest.mark.parametrize("preset, enc_target, dec_target", [("paper", 0.3, 0.5), ("reference", 0.15, 0.3)])
def test_effective_ratios_over_10k_samples(vocab, preset, enc_target, dec_target):
    rng = np.random.default_rng(7)
    base = _block(rng)
    cfg = MaskingConfig(preset=preset)
    enc = dec = 0
    n = 10_000
    for i in range(n):
        # Cheap variety: rotate one random block instead of drawing 5M tokens.
        block = np.concatenate(([0], np.roll(base[1:-1], i * 37), [2]))
        sample = mask_sample(block, cfg, vocab, seed=1, epoch=0, index=i)
        enc += int(sample.encoder_mask.sum())
        dec += int(sample.decoder_mask.sum())
    content = n * (BLOCK - 2)
    assert abs(enc / content - enc_target) < 0.01, enc / content
    assert abs(dec / content - dec_target) < 0.01, dec / content


def test_decoder_spans_follow_truncated_poisson_and_never_touch_specials(vocab):
    rng = np.random.default_rng(2)
    lengths = []
    for i in range(400):
        sample = mask_sample(_block(rng), MaskingConfig(decoder_lambda=2.0), vocab, seed=0, epoch=0, index=i)
        assert not sample.decoder_mask[0] and not sample.decoder_mask[-1]
        lengths.append(_runs(sample.decoder_mask)[1])
    lengths = np.concatenate(lengths)
    truncated_mean = 2.0 / (1 - math.exp(-2.0))  # E[X | X >= 1] for Poisson(2)
    assert lengths.min() >= 1
    assert abs(lengths.mean() - truncated_mean) < 0.1, lengths.mean()


def test_encoder_collapses_each_span_to_one_token(vocab):
    rng = np.random.default_rng(3)
    cfg = MaskingConfig(permute_sentences=False, random_token_prob=0.0)
    for i in range(50):
        block = _block(rng, 200)
        sample = mask_sample(block, cfg, vocab, seed=0, epoch=0, index=i)
        content, mask = block[1:-1], sample.encoder_mask
        starts, _ = _runs(mask)
        expected = content.copy()
        expected[starts] = vocab.mask_id
        expected = expected[~mask | np.isin(np.arange(len(mask)), starts)]
        assert np.array_equal(sample.input_ids, np.concatenate(([0], expected, [2])))
        assert (sample.input_ids == vocab.mask_id).sum() == len(starts)


def test_whole_word_spans_start_and_end_on_word_boundaries(vocab):
    rng = np.random.default_rng(4)
    for i in range(50):
        block = _block(rng, 300)
        sample = mask_sample(block, MaskingConfig(permute_sentences=False), vocab, seed=0, epoch=0, index=i)
        content = block[1:-1]
        starts, lengths = _runs(sample.encoder_mask)
        ends = starts + lengths
        assert vocab.word_start[content[starts[starts > 0]]].all()
        assert vocab.word_start[content[ends[ends < len(content)]]].all()


def test_random_token_replacement_rate(vocab):
    rng = np.random.default_rng(5)
    cfg = MaskingConfig(random_token_prob=0.5, permute_sentences=False)
    spans = masks = 0
    for i in range(200):
        sample = mask_sample(_block(rng), cfg, vocab, seed=0, epoch=0, index=i)
        spans += len(_runs(sample.encoder_mask)[0])
        masks += int((sample.input_ids == vocab.mask_id).sum())
        assert sample.input_ids[1:-1].min() >= vocab.first_regular_id
    assert abs(masks / spans - 0.5) < 0.05


def test_sentence_permutation_reorders_whole_sentences(vocab):
    ends = np.flatnonzero(vocab.sentence_end)
    regular = np.flatnonzero(~vocab.sentence_end[: VOCAB - 1])[4:]
    rng = np.random.default_rng(6)
    sentences = [np.append(rng.choice(regular, rng.integers(3, 12)), rng.choice(ends)) for _ in range(8)]
    block = np.concatenate(([0], *sentences, [2]))
    cfg = MaskingConfig(encoder_ratio=0.0, random_token_prob=0.0)
    orders = set()
    for i in range(20):
        out = mask_sample(block, cfg, vocab, seed=0, epoch=0, index=i).input_ids[1:-1]
        pieces, pos = [], 0
        while pos < len(out):  # split the output back into sentences
            stop = pos + int(np.argmax(vocab.sentence_end[out[pos:]])) + 1
            pieces.append(tuple(out[pos:stop]))
            pos = stop
        assert sorted(pieces) == sorted(tuple(s) for s in sentences)
        orders.add(tuple(pieces))
    assert len(orders) > 10


def test_reference_preset_decoder_masks_every_encoder_span(vocab):
    rng = np.random.default_rng(8)
    for i in range(100):
        sample = mask_sample(_block(rng), MaskingConfig(preset="reference"), vocab, seed=0, epoch=0, index=i)
        decoder = sample.decoder_mask[1:-1]
        assert not (sample.encoder_mask & ~decoder).any()
        assert sample.encoder_mask.sum() < decoder.sum() or decoder.sum() == 0


def test_short_blocks_and_extreme_ratios(vocab):
    rng = np.random.default_rng(9)
    for ratio in (0.0, 0.95, 1.0):
        cfg = MaskingConfig(encoder_ratio=ratio, decoder_ratio=ratio)
        for i, n in enumerate((3, 4, 10, 40)):
            block = _block(rng, n)
            sample = mask_sample(block, cfg, vocab, seed=0, epoch=0, index=i)
            assert sample.input_ids[0] == 0 and sample.input_ids[-1] == 2
            assert sample.decoder_mask.shape == block.shape
            if ratio == 1.0:
                assert sample.decoder_mask[1:-1].all() and len(sample.input_ids) == 3
            if ratio == 0.0:
                assert not sample.decoder_mask.any()


@pytest.mark.parametrize("bad", [{"preset": "fairseq"}, {"encoder_ratio": 1.5}, {"decoder_lambda": 0.0}, {"random_token_prob": -0.1}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        MaskingConfig(**bad)
