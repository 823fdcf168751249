import itertools
import re

import pytest
import torch

from janus.decoding import ARStepper, BeamConfig, MaskPredictConfig, beam_search, mask_predict, remask_count
from janus.model import JanusBart

from conftest import tiny_bart_config

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
                "--iterations", "0,2", "--dtypes", "float32,bfloat16", "--spec-sources", "2"])
    for timings in (out, out["bfloat16"]):
        for key in ("T0", "T2", "T2_pruned"):
            assert timings[f"nar_{key}_ms"] > 0
            assert timings[f"speedup_{key}"] == timings["ar_beam5_ms"] / timings[f"nar_{key}_ms"]
            # The ceiling is an upper bound on the speedup (with slack for timing noise).
            assert 0 < timings[f"speedup_{key}"] < 2 * timings[f"ceiling_{key}"]
        # More passes cost more FLOPs: a lower ceiling; pruning to one candidate raises it.
        assert timings["ceiling_T2"] < timings["ceiling_T0"]
        assert timings["ceiling_T2_pruned"] > timings["ceiling_T2"]
        # Speculative decoding beside greedy: exact, and the guard caps the failing drafter's passes.
        assert timings["spec_exact"] is True
        assert timings["spec_speedup_vs_greedy"] == timings["ar_greedy_ms"] / timings["spec_ms"]
        assert timings["spec_failing_stats"]["accepted_per_verification"] == 0
        for one in timings["spec_failing_stats"]["per_source"]:  # 6 tokens: drafts at cycles 0 and 5 at most
            assert one["draft_passes"] <= 2 < 6 == one["verify_passes"]
    assert out["device"] == "cpu"


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


# ---------------------------------------------------------------- config validation (issue 11 item 4)
@pytest.mark.parametrize("cls,kw,match", [
    (BeamConfig, dict(beam=0), r"BeamConfig.beam = 0: must be an integer >= 1"),
    (BeamConfig, dict(max_len=0), r"BeamConfig.max_len = 0: must be an integer >= 1"),
    (BeamConfig, dict(min_len=9, max_len=8), r"BeamConfig.min_len = 9: must be an integer in \[0, max_len = 8\]"),
    (BeamConfig, dict(length_penalty=float("nan")), r"length_penalty = nan: must be a finite number"),
    (BeamConfig, dict(no_repeat_ngram=-1), r"no_repeat_ngram = -1: must be an integer >= 0"),
    (MaskPredictConfig, dict(iterations=-1), r"MaskPredictConfig.iterations = -1: must be an integer >= 0"),
    (MaskPredictConfig, dict(max_len=0), r"MaskPredictConfig.max_len = 0: must be an integer >= 2"),
    (MaskPredictConfig, dict(length_candidates=0), r"length_candidates = 0: must be an integer in \[1, max_len - 1 = 63\]"),
    (MaskPredictConfig, dict(length_candidates=5, max_len=4), r"length_candidates = 5: must be an integer in \[1, max_len - 1 = 3\]"),
    (MaskPredictConfig, dict(prune_after=-1), r"prune_after = -1: must be an integer >= 0"),
    (MaskPredictConfig, dict(prune_margin=-0.5), r"prune_margin = -0.5: must be a number >= 0"),
])
def test_decoding_configs_state_the_allowed_range(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_mask_predict_respects_a_small_max_len():
    model = make_model(length_classes=20)
    with torch.no_grad():
        model.length_head.bias[:] = -50.0
        model.length_head.bias[15] = 50.0  # the head wants 15 tokens; max_len caps it
    x, am = sources(40)
    tokens, _ = mask_predict(model, x, am, MaskPredictConfig(max_len=4, length_candidates=2))
    assert tokens.shape[1] <= 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random JANUS model folder with a length head and a real (BART-layout) tokenizer."""
    from data_pipeline.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tiny_model")
    texts = ["the river city of the north", "a new king of the old island", "music and film of the south"] * 20
    tok = train_bpe(texts, 300)
    torch.manual_seed(0)
    model = JanusBart(tiny_bart_config(vocab_size=len(tok)), mask_token_id=tok.mask_token_id, length_classes=20)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "test.src").write_text("the river city\na new king of the old island\nmusic\n")
    return out


def run_generate(model_dir, *extra):
    from finetune.generate import main

    return main(["--model", str(model_dir), "--src", str(model_dir / "test.src"), "--device", "cpu", *extra])


@pytest.mark.parametrize("args,match", [
    (["--mode", "nar", "--iterations", "-1"], r"iterations = -1: must be an integer >= 0"),
    (["--mode", "ar", "--max-len", "0"], r"BeamConfig.max_len = 0: must be an integer >= 1"),
    (["--mode", "nar", "--max-len", "0"], r"MaskPredictConfig.max_len = 0: must be an integer >= 2"),
    (["--mode", "ar", "--beam", "0"], r"beam = 0: must be an integer >= 1"),
    (["--mode", "ar", "--batch-size", "0"], r"--batch-size 0: must be an integer >= 1"),
    (["--mode", "nar", "--length-candidates", "0"], r"length_candidates = 0: must be an integer in"),
    (["--mode", "spec", "--window", "0"], r"SpecConfig.window = 0: must be an integer >= 1"),
    (["--mode", "ar", "--beam", "two"], r"--beam: cannot parse 'two'"),
])
def test_generate_refuses_bad_decoding_options(tiny_model_dir, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        run_generate(tiny_model_dir, *args)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


# ---------------------------------------------------------------- generated flags (issue 12)
def non_default(f, value):
    """A valid value different from the field's default."""
    special = {"draft_length": "window", "max_len": 33, "min_len": 3, "length_candidates": 3, "backoff": 3,
               "max_backoff": 40, "tie_margin": 0.5, "relaxed_margin": 0.25, "prune_margin": 0.3}
    if f.name in special:
        return special[f.name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2
    if isinstance(value, float):
        return value + 0.5
    raise AssertionError(f"no test value for {f.name}")


@pytest.mark.parametrize("mode", ["ar", "nar", "spec"])
def test_every_decoding_field_is_a_flag_that_reaches_the_decoder(tiny_model_dir, monkeypatch, mode):
    """Each field of the mode's config, set on generate's command line, arrives in the config object
    the decoder function is called with (a new field cannot be forgotten: flags are generated)."""
    import dataclasses as dc

    import finetune.generate as gen

    cls = gen.CONFIGS[mode]
    parser = gen.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    received = []

    def spy(name):
        real = {"ar": gen.beam_search, "nar": gen.mask_predict, "spec": gen.speculative_decode}[name]

        def wrapper(model, ids, am, cfg, **kw):
            received.append(cfg)
            return real(model, ids, am, cfg, **kw)
        return wrapper
    monkeypatch.setattr(gen, {"ar": "beam_search", "nar": "mask_predict", "spec": "speculative_decode"}[mode], spy(mode))
    for f in dc.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags and f"--{f.name}" in flags, f"{cls.__name__}.{f.name} has no flag"
        value = non_default(f, getattr(cls(), f.name))
        text = str(value).lower() if isinstance(value, bool) else str(value)
        received.clear()
        extra = ["--max-len", "40"] if f.name == "min_len" else []  # keep min_len <= max_len
        summary = run_generate(tiny_model_dir, "--mode", mode, flag, text, *extra, "--batch-size", "2")
        assert received and all(getattr(c, f.name) == value for c in received), (f.name, received)
        assert summary["config"][f.name] == value


def test_shared_and_aliased_flags_and_help(tiny_model_dir, capsys):
    import finetune.generate as gen

    args = gen.build_parser().parse_args(["--model", "m", "--src", "s", "--mode", "spec", "--max_len", "12",
                                          "--length-offsets", "--no-repeat-ngram", "3"])
    assert gen.decoding_config("spec", args).max_len == 12  # underscore alias
    assert gen.decoding_config("ar", args).max_len == 12  # one --max-len for every config
    assert gen.decoding_config("nar", args).length_offsets is True  # a bare boolean flag means true
    assert gen.decoding_config("nar", gen.build_parser().parse_args(
        ["--model", "m", "--src", "s", "--mode", "nar"])).iterations == 4  # generate's own default
    with pytest.raises(SystemExit):
        gen.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "self-speculative decoding (--mode spec)" in text and "most draft tokens verified" in text
    assert "(default: 32)" in text


def test_dataclass_flags_helper_is_general():
    import argparse
    from dataclasses import dataclass, field

    from janus.config import add_dataclass_flags, dataclass_from_flags

    @dataclass
    class Inner:
        rate: float = 0.5

    @dataclass
    class Outer:
        name: str = field(default="x", metadata={"help": "a name", "choices": ("x", "y")})
        sizes: list = field(default_factory=lambda: [1, 2])
        limit: int | None = None
        inner: Inner = field(default_factory=Inner)

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Outer, prefix="o.")
    cfg = dataclass_from_flags(Outer, p.parse_args(["--o.name", "y", "--o.sizes", "[3]", "--o.limit", "none",
                                                    "--o.inner.rate", "2"]), prefix="o.")
    assert cfg == Outer(name="y", sizes=[3], limit=None, inner=Inner(rate=2.0))
    assert dataclass_from_flags(Outer, p.parse_args([]), prefix="o.") == Outer()
    with pytest.raises(SystemExit):
        p.parse_args(["--o.name", "z"])  # choices
    with pytest.raises(ValueError, match=r"--o.inner.rate: cannot parse 'fast'"):
        dataclass_from_flags(Outer, p.parse_args(["--o.inner.rate", "fast"]), prefix="o.")
    q = argparse.ArgumentParser()
    q.add_argument("--name")
    with pytest.raises(ValueError, match="already used"):
        add_dataclass_flags(q, Outer)


def test_generate_spec_mode_equals_greedy_and_reports_its_statistics(tiny_model_dir, tmp_path):
    spec = run_generate(tiny_model_dir, "--mode", "spec", "--out", str(tmp_path / "spec.hyp"), "--max-len", "12",
                        "--batch-size", "1")
    greedy = run_generate(tiny_model_dir, "--mode", "ar", "--beam", "1", "--out", str(tmp_path / "ar.hyp"),
                          "--max-len", "12")
    assert (tmp_path / "spec.hyp").read_text() == (tmp_path / "ar.hyp").read_text()
    st = spec["speculative"]
    assert st["sources"] == 3 and st["lossless"] and st["passes_per_token"] > 0
    for key in ("accepted_per_verification", "single_verification_share", "tokens_per_verification"):
        assert key in st
    assert st["guard_min_accept"] >= 2 and st["guard_verify_ms_per_row"] > 0  # the guard's measured batch-1 costs
    assert spec["device"] == greedy["device"] == "cpu"


def test_decode_latency_quality_mode_reports_speculative_exactness(tiny_model_dir, tmp_path):
    from benchmarks.decode_latency import main

    ref = tmp_path / "test.tgt"
    ref.write_text("the river\na new king\nmusic\n")
    out = main(["--model", str(tiny_model_dir), "--src", str(tiny_model_dir / "test.src"), "--ref", str(ref),
                "--task", "xsum", "--source-len", "32", "--target-len", "12", "--samples", "2", "--dtypes", "float32",
                "--only", "ar_greedy,spec", "--device", "cpu"])
    spec = out["spec"]
    assert spec["exact_match_with_greedy"] == 1.0 and spec["tokens"] > 0
    split = spec["batch1_interleaved"]
    assert split["speedup_vs_greedy"] == split["greedy_ms"] / split["spec_ms"]
    assert split["ms_total"] >= split["ms_encoder"] + split["ms_verify"] - 1e-6
    assert split["guard_verify_ms_per_row"] > 0 and split["guard_min_accept"] >= 2
    if "guard_lean_ms_per_row" in split:
        assert split["bound_vs_greedy_free_drafts"] == pytest.approx(
            (split["accepted_per_verification"] + 1) * split["guard_lean_ms_per_row"] / split["guard_verify_ms_per_row"])
