import itertools

import pytest
import torch

from conftest import tiny_bart_config
from janus.decoding import ARStepper, BeamConfig, MaskPredictConfig, beam_search, mask_predict, remask_count
from janus.model import JanusBart

PAD, EOS = 1, 2


def make_model(vocab=40, length_classes=0, seed=0):
    torch.manual_seed(seed)
    return JanusBart(tiny_bart_config(vocab_size=vocab, scale_embedding=True), length_classes=length_classes).double().eval()


def sources(vocab, B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab - 1, (B, S), generator=g)
    am = (torch.arange(S) < torch.randint(3, S + 1, (B,), generator=g)[:, None]).long()
    return torch.where(am.bool(), x, PAD), am


def full_ar_logprobs(model, x, am, y):
    with torch.no_grad():
        return model(x, am, y, patterns=("ar",)).ar_logits.log_softmax(-1)


def test_incremental_decoding_equals_full_forward():
    model = make_model()
    x, am = sources(40)
    y = torch.randint(4, 39, (3, 8), generator=torch.Generator().manual_seed(1))
    full = full_ar_logprobs(model, x, am, y)
    stepper = ARStepper(model, model.encode(x, am), am)
    prev = torch.full((3,), model.config.decoder_start_token_id)
    with torch.no_grad():
        for t in range(y.shape[1]):
            lp = stepper.step(prev)
            torch.testing.assert_close(lp, full[:, t].float(), rtol=1e-5, atol=1e-5)
            prev = y[:, t]


def sequence_score(model, x, am, seq, alpha):
    lp = full_ar_logprobs(model, x, am, seq[None])[0]
    return float(lp.gather(-1, seq[:, None]).sum()) / len(seq) ** alpha


def test_exhaustive_beam_finds_the_best_sequence_and_scores_match():
    vocab, max_len = 6, 3
    model = make_model(vocab=vocab)
    x, am = sources(vocab, B=2, S=5)
    tokens, scores = beam_search(model, x, am, BeamConfig(beam=vocab ** (max_len - 1), max_len=max_len,
                                                          length_penalty=1.0))
    for b in range(2):
        best = max(
            (sequence_score(model, x[b:b + 1], am[b:b + 1], torch.tensor([*body, EOS]), 1.0)
             for n in range(max_len) for body in itertools.product([t for t in range(vocab) if t not in (EOS, PAD, vocab - 1)], repeat=n)))
        assert scores[b].item() == pytest.approx(best, abs=1e-6)
        seq = tokens[b][tokens[b] != PAD]
        assert seq[-1] == EOS
        assert sequence_score(model, x[b:b + 1], am[b:b + 1], seq, 1.0) == pytest.approx(scores[b].item(), abs=1e-6)


def test_beam_one_is_greedy_and_no_repeat_ngram_holds():
    model = make_model()
    x, am = sources(40)
    tokens, _ = beam_search(model, x, am, BeamConfig(beam=1, max_len=10))
    for b in range(3):
        seq = tokens[b][tokens[b] != PAD]
        lp = full_ar_logprobs(model, x[b:b + 1], am[b:b + 1], seq[None])[0]
        lp[:, [PAD, model.mask_token_id]] = float("-inf")  # never generated
        assert torch.equal(lp.argmax(-1)[:-1], seq[:-1])
    tokens, _ = beam_search(model, x, am, BeamConfig(beam=4, max_len=20, min_len=20, no_repeat_ngram=2))
    for b in range(3):
        seq = tokens[b][tokens[b] != PAD].tolist()
        assert len(seq) == 20
        grams = list(zip(seq, seq[1:]))
        assert len(grams) == len(set(grams))


def test_mask_predict_single_pass_equals_the_nar_pattern():
    model = make_model(length_classes=20)
    with torch.no_grad():
        model.length_head.bias[:] = -50.0
        model.length_head.bias[7] = 50.0  # force length 7
    x, am = sources(40)
    tokens, _ = mask_predict(model, x, am, MaskPredictConfig(iterations=0, length_candidates=1, max_len=19))
    assert tokens.shape == (3, 7)
    labels = torch.full((3, 7), 5)  # any non-pad target; every position is masked
    with torch.no_grad():
        nar = model(x, am, labels, torch.ones(3, 7, dtype=torch.bool), patterns=("nar",)).nar_logits
    nar[..., [PAD, model.mask_token_id]] = float("-inf")
    assert torch.equal(tokens, nar.argmax(-1))


def test_mask_predict_iterations_and_pruning_run():
    model = make_model(length_classes=20)
    x, am = sources(40)
    for cfg in (MaskPredictConfig(iterations=4, max_len=19), MaskPredictConfig(iterations=4, max_len=19, prune_after=1),
                MaskPredictConfig(iterations=2, max_len=19, length_offsets=True)):
        tokens, score = mask_predict(model, x, am, cfg)
        assert tokens.shape[0] == 3 and torch.isfinite(score).all()
        assert (tokens != model.mask_token_id).all()


def test_remask_schedule():
    n = torch.tensor([10, 7])
    assert remask_count(n, 0, 2).tolist() == [5, 3]  # T = 1: half re-masked once
    assert [remask_count(n, p, 5)[0].item() for p in range(4)] == [8, 6, 4, 2]


def test_mask_predict_refinement_matches_a_manual_two_pass_decode():
    """T = 1 by hand with the training-time NAR pattern: pass 1 predicts everything, the
    floor(N/2) least confident tokens are re-masked and re-predicted with the rest visible."""
    model = make_model(length_classes=20, seed=3)
    with torch.no_grad():
        model.length_head.bias[:] = -50.0
        model.length_head.bias[9] = 50.0
        for p in model.parameters():  # a sharper random model, so predictions differ by position and context
            p.mul_(6.0)
    x, am = sources(40, seed=5)
    tokens, _ = mask_predict(model, x, am, MaskPredictConfig(iterations=1, length_candidates=1, max_len=19))

    def nar(labels, dm):
        with torch.no_grad():
            lp = model(x, am, labels, dm, patterns=("nar",)).nar_logits.log_softmax(-1)
        lp[..., [PAD, model.mask_token_id]] = float("-inf")
        return lp.max(-1)

    everything = torch.ones(3, 9, dtype=torch.bool)
    lp0, tok0 = nar(torch.full((3, 9), 5), everything)
    remask = lp0.argsort(1).argsort(1) < 9 // 2
    lp1, tok1 = nar(tok0, remask)
    expected = torch.where(remask, tok1, tok0)
    assert torch.equal(tokens, expected)
    assert not torch.equal(tok0, expected)  # the second pass changed something


def test_decode_latency_benchmark_reports_speedups_and_ceilings():
    from benchmarks.decode_latency import main

    out = main(["--dims", "small", "--source-len", "24", "--target-len", "6", "--samples", "1",
                "--iterations", "0,2", "--dtypes", "float32,bfloat16"])
    for timings in (out, out["bfloat16"]):
        for key in ("T0", "T2", "T2_pruned"):
            assert timings[f"nar_{key}_ms"] > 0
            assert timings[f"speedup_{key}"] == timings["ar_beam5_ms"] / timings[f"nar_{key}_ms"]
            # The ceiling is an upper bound on the speedup (with slack for timing noise).
            assert 0 < timings[f"speedup_{key}"] < 2 * timings[f"ceiling_{key}"]
        # More passes cost more FLOPs: a lower ceiling; pruning to one candidate raises it.
        assert timings["ceiling_T2"] < timings["ceiling_T0"]
        assert timings["ceiling_T2_pruned"] > timings["ceiling_T2"]


def test_bfloat16_decoding_scores_track_float32():
    """``generate --dtype bfloat16``: same search, bf16 weights/activations, fp32 log-softmax."""
    model = make_model(vocab=60, length_classes=20, seed=2).float()
    x, am = sources(60, seed=4)
    cfgs = (MaskPredictConfig(iterations=2, max_len=12), BeamConfig(beam=3, max_len=8))
    ref = [mask_predict(model, x, am, cfgs[0])[1], beam_search(model, x, am, cfgs[1])[1]]
    model = model.to(torch.bfloat16)
    got = [mask_predict(model, x, am, cfgs[0])[1], beam_search(model, x, am, cfgs[1])[1]]
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=0.1, rtol=0.05)


def test_pruning_keeps_the_first_pass_winner_and_an_infinite_margin_keeps_all():
    model = make_model(length_classes=20, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper: candidates differ clearly
    x, am = sources(40, B=4, seed=2)
    full = mask_predict(model, x, am, MaskPredictConfig(iterations=3, max_len=19))
    keep_all = mask_predict(model, x, am, MaskPredictConfig(iterations=3, max_len=19, prune_after=1,
                                                             prune_margin=float("inf")))
    assert torch.equal(full[0], keep_all[0]) and torch.equal(full[1], keep_all[1])
    first_pass = mask_predict(model, x, am, MaskPredictConfig(iterations=0, max_len=19))[0]
    pruned = mask_predict(model, x, am, MaskPredictConfig(iterations=3, max_len=19, prune_after=1))[0]
    assert torch.equal(pruned.ne(PAD).sum(1), first_pass.ne(PAD).sum(1))


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.2, 0.5, float("inf")])
def test_margin_pruning_decodes_each_source_as_if_alone(margin):
    """Sources keep different numbers of candidates within the margin; the batch pads them to a
    common count, which must not change any source's result."""
    model = make_model(length_classes=20, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    x, am = sources(40, B=5, seed=3)
    cfg = MaskPredictConfig(iterations=3, max_len=19, prune_after=1, prune_margin=margin)
    tokens, scores = mask_predict(model, x, am, cfg)
    for b in range(5):
        n = int(am[b].sum())
        alone_tokens, alone_score = mask_predict(model, x[b:b + 1, :n], am[b:b + 1, :n], cfg)
        L = alone_tokens.shape[1]
        assert torch.equal(tokens[b, :L], alone_tokens[0]) and (tokens[b, L:] == PAD).all()
        torch.testing.assert_close(scores[b], alone_score[0])
