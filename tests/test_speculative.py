"""Self-speculative decoding (janus.speculative): token-identical to greedy AR decoding."""
import pytest
import torch

from janus import speculative
from janus.decoding import ARStepper, BeamConfig, _ban_repeated_ngrams, beam_search
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig
from janus.speculative import SpecConfig, SpecGuard, _ban_ngrams_windowed, _Verifier, speculative_decode

from conftest import tiny_bart_config

PAD, EOS, BOS = 1, 2, 0


def random_model(seed=0, vocab=40, d=32, scale=1.0, length_classes=30, dtype=torch.float32):
    torch.manual_seed(seed)
    model = JanusBart(tiny_bart_config(vocab_size=vocab, d_model=d, scale_embedding=True),
                      length_classes=length_classes).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)  # > 1: sharper, less repetitive outputs, poorer drafts
    return model


def sources(vocab, B=4, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab - 1, (B, S), generator=g)
    am = (torch.arange(S) < torch.randint(3, S + 1, (B,), generator=g)[:, None]).long()
    return torch.where(am.bool(), x, PAD), am


def greedy_alone(model, x, am, cfg: SpecConfig) -> torch.Tensor:
    """beam_search(beam=1) on each source by itself (unpadded)."""
    beam = BeamConfig(beam=1, max_len=cfg.max_len, min_len=cfg.min_len, no_repeat_ngram=cfg.no_repeat_ngram)
    rows = []
    for b in range(x.shape[0]):
        keep = am[b].bool()
        rows.append(beam_search(model, x[b][keep][None], am[b][keep][None], beam)[0])
    return torch.cat(rows)


def assert_lossless(model, x, am, cfg, batched=True):
    """Equal to greedy on every source alone; with ``batched`` also to greedy on the whole batch
    (which itself can differ from per-source greedy at sub-1e-6 near-ties)."""
    tokens, scores, stats = speculative_decode(model, x, am, cfg)
    expected = greedy_alone(model, x, am, cfg)
    assert torch.equal(tokens, expected), (tokens, expected)
    if batched:
        ref = beam_search(model, x, am, BeamConfig(beam=1, max_len=cfg.max_len, min_len=cfg.min_len,
                                                   no_repeat_ngram=cfg.no_repeat_ngram))
        assert torch.equal(tokens, ref[0])
        torch.testing.assert_close(scores, ref[1], atol=1e-4, rtol=1e-4)  # mean log-prob, as beam search's
    assert stats["replay_disagreements"] == 0 and stats["lossless"]
    assert stats["tokens"] == int(tokens.ne(PAD).sum())
    return stats


CONFIGS = [dict(), dict(no_repeat_ngram=2), dict(no_repeat_ngram=1, max_len=12), dict(min_len=6), dict(window=2),
           dict(adaptive=False), dict(draft_length="window", window=5), dict(max_len=1), dict(max_len=2)]


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lossless_on_random_models(seed, scale):
    model = random_model(seed, scale=scale)
    x, am = sources(40, seed=seed)
    for kw in CONFIGS:
        assert_lossless(model, x, am, SpecConfig(**{"max_len": 20, **kw}))


def test_batch_one_and_batch_agree_with_rows_accepting_different_counts():
    model = random_model(3, scale=3.0)
    x, am = sources(40, B=6, seed=7)
    cfg = SpecConfig(max_len=24)
    tokens, _, stats = speculative_decode(model, x, am, cfg)
    for b in range(6):
        keep = am[b].bool()
        alone, _, st = speculative_decode(model, x[b][keep][None], am[b][keep][None], cfg)
        assert torch.equal(alone[0], tokens[b])
    assert stats["verifications"] > stats["verify_passes"]  # rows shared passes
    assert_lossless(model, x, am, cfg)


def test_every_token_through_the_exact_replay_is_still_greedy():
    """tie_margin = inf certifies nothing but forced tokens (the only finite choice, e.g. </s> at
    max_len): every other token comes from the incremental replay."""
    model = random_model(1, scale=3.0)
    x, am = sources(40, seed=1)
    tokens, *_ = speculative_decode(model, x, am, SpecConfig(max_len=16))
    forced = int((tokens[:, -1] == EOS).sum())  # outputs that ran to max_len end in a forced </s>
    stats = assert_lossless(model, x, am, SpecConfig(max_len=16, tie_margin=float("inf")))
    assert stats["replays"] == stats["tokens"] - forced


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_near_ties_are_replayed_not_guessed(seed):
    """Two output ids whose logits differ by ~1e-7 (the size of the one-pass vs incremental float32
    discrepancy) and dominate every step: the verifier cannot certify either and defers to the exact
    replay, so the output stays greedy's. (With tie_margin=0 the one-pass choice would be trusted;
    on this machine seed 1 then differs from greedy.)"""
    model = random_model(seed, vocab=40, scale=2.0)
    with torch.no_grad():
        w = model.model.shared.weight
        w[8] = w[7] + 1e-7 * torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed))
        model.final_logits_bias[0, 7] = model.final_logits_bias[0, 8] = 4.0
    x, am = sources(40, seed=seed)
    stats = assert_lossless(model, x, am, SpecConfig(max_len=12), batched=False)
    assert stats["replays"] >= stats["tokens"] // 2


def test_one_pass_verifier_is_within_the_tie_margin_of_incremental_steps():
    """The certified margin (1e-4 in float32) must dwarf the one-pass vs incremental discrepancy."""
    for d, seed in ((32, 0), (64, 1)):
        model = random_model(seed, vocab=64, d=d, scale=3.0)
        x, am = sources(64, B=3, S=12, seed=seed)
        y = torch.randint(4, 63, (3, 20), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            enc = model.encode(x, am)
            stepper = ARStepper(model, enc, am)
            prev, ref = torch.full((3,), 2), []
            for t in range(20):
                ref.append(stepper.step(prev))
                prev = y[:, t]
            ref = torch.stack(ref, 1)
            content = torch.cat([torch.full((3, 1), 2), y], 1)
            for chunk in (1, 3, 20):
                v = _Verifier(model, model.cross_kv(enc), model.cross_mask(am), 3, 20 + chunk + 2)
                got, L = [], 0
                while L < 20:
                    n = min(chunk, 20 - L)
                    got.append(torch.log_softmax(model.logits(v.run(content[:, L:L + n], torch.full((3,), L))).float(), -1))
                    L += n
                assert (torch.cat(got, 1) - ref).abs().max() < SpecConfig().margin_for(torch.float32) / 10


@pytest.mark.parametrize("n", [1, 2, 3])
def test_windowed_ngram_bans_equal_the_sequential_ones(n):
    g = torch.Generator().manual_seed(n)
    seq = torch.randint(4, 9, (3, 14), generator=g)  # small alphabet: many repeats
    t = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [9, 10, 11, 12]])
    lp = torch.randn(3, 4, 12, generator=g)
    got = _ban_ngrams_windowed(lp.clone(), seq, t, n)
    for r in range(3):
        for i in range(4):
            k = int(t[r, i])
            expected = _ban_repeated_ngrams(lp[r, i][None].clone(), seq[r, :k][None], n)[0]
            assert torch.equal(got[r, i], expected)
    assert torch.isinf(got).any()


def train_copy_model(steps=150, seed=0):
    """A tiny JANUS model trained briefly (AR + NAR + AUX + KL + length head) to copy its source:
    its NAR drafts are good."""
    torch.manual_seed(seed)
    V, maxn = 24, 12
    model = JanusBart(tiny_bart_config(vocab_size=V, d_model=48), length_classes=maxn + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    objective = ObjectiveConfig.from_preset("paper", label_smoothing=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, am, y, dm, lt = copy_batch(32, V, maxn, g)
        out = model(x, am, y, dm, objective=objective, length_targets=lt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def copy_batch(B, V, maxn, g):
    n = torch.randint(3, maxn - 1, (B,), generator=g)
    S = int(n.max())
    x = torch.randint(4, V - 1, (B, S), generator=g)
    am = (torch.arange(S) < n[:, None]).long()
    x = torch.where(am.bool(), x, PAD)
    y = torch.full((B, S + 2), PAD)
    y[:, 0] = BOS
    y[:, 1:S + 1] = x
    y[torch.arange(B), n + 1] = EOS
    valid = y.ne(PAD)
    k = (torch.rand(B, generator=g) * valid.sum(1)).long() + 1
    rank = torch.where(valid, torch.rand(y.shape, generator=g), 2.0).argsort(1).argsort(1)
    return x, am, y, rank < k[:, None], valid.sum(1)


@pytest.fixture(scope="module")
def copy_model():
    return train_copy_model()


def test_trained_model_drafts_well_and_stays_lossless(copy_model):
    g = torch.Generator().manual_seed(99)
    x, am, *_ = copy_batch(16, 24, 12, g)
    stats = assert_lossless(copy_model, x, am, SpecConfig(max_len=14))
    assert stats["accepted_per_verification"] > 3
    assert stats["passes_per_token"] < 0.5  # greedy: 1 decoder pass per token
    assert stats["single_verification_share"] > 0.3
    one = assert_lossless(copy_model, x[:1, :int(am[0].sum())], am[:1, :int(am[0].sum())], SpecConfig(max_len=14))
    assert one["sources"] == 1


def test_relaxed_acceptance_is_marked_and_differs_from_greedy():
    model = random_model(0, scale=8.0)
    x, am = sources(40, seed=0)
    exact = greedy_alone(model, x, am, SpecConfig(max_len=16))
    tokens, _, stats = speculative_decode(model, x, am, SpecConfig(max_len=16, relaxed_topk=40, relaxed_margin=1e9))
    assert not stats["lossless"]
    assert not torch.equal(tokens, exact)  # accepting every draft token is not greedy
    assert ((tokens == EOS).sum(1) == 1).all()  # still well-formed: one </s> per output
    strict, _, st = speculative_decode(model, x, am, SpecConfig(max_len=16, relaxed_topk=1, relaxed_margin=0.0))
    assert torch.equal(strict, exact)  # top-1 within margin 0 is greedy's own choice


def test_adaptive_guard_pauses_drafting_when_drafts_fail(monkeypatch):
    """A drafter that is always wrong: the adaptive guard drafts O(log n) times, the plain loop
    re-drafts every cycle; both stay exact."""
    def wrong_draft(model, toks, L, N, cross, cross_mask, most):
        D = min(int((N - L).max()), most)
        return torch.full((len(L), D), model.mask_token_id - 1), (N - L).clamp(max=D)  # never the AR's pick here
    monkeypatch.setattr(speculative, "_draft", wrong_draft)
    model = random_model(0, vocab=40, scale=3.0)
    with torch.no_grad():
        model.final_logits_bias[0, 38] = -1e4  # id 38 = the wrong drafter's token is never chosen
    x, am = sources(40, B=2, seed=4)
    adaptive = assert_lossless(model, x, am, SpecConfig(max_len=60, min_len=60))
    plain = assert_lossless(model, x, am, SpecConfig(max_len=60, min_len=60, adaptive=False))
    assert plain["draft_passes"] >= 50
    assert adaptive["draft_passes"] <= 5  # cycles 0, 5, 14, 31: pauses of 4, 8, 16, 32
    assert adaptive["verify_passes"] == 60 and adaptive["accepted"] == 0


def test_guard_threshold_follows_the_measured_costs():
    g = SpecGuard(SpecConfig())
    assert g.min_accept() == 2  # nothing timed yet
    g.observe("draft", 0.003, 1)
    g.observe("verify", 0.002, 1)
    assert g.min_accept() == 2  # no greedy-like step timed yet
    g.observe("lean", 0.001, 1)
    assert g.min_accept() == 4  # a draft (3) + a verification (2) cost 5 steps: 4 accepted + the AR's own
    g.observe("lean", 0.004, 4)  # per row: 1 ms again
    assert g.min_accept() == 4 and g.ms["lean"] == pytest.approx(1.0)
    g = SpecGuard(SpecConfig())
    for k, ms in (("draft", 1.0), ("verify", 1.2), ("lean", 1.0)):  # GPU-like: passes cost about a step
        g.observe(k, ms / 1000, 1)
    assert g.min_accept() == 2


def _prefix_drafter(greedy: torch.Tensor, good: int):
    """Drafts greedy's own next ``good`` tokens, then wrong ones (batch 1)."""
    def draft(model, toks, L, N, cross, cross_mask, most):
        D = min(int((N - L).max()), most)
        start = int(L[0])
        d = torch.full((1, D), 38)
        right = greedy[0, start:start + min(good, D)]
        d[0, :len(right)] = right
        return d, (N - L).clamp(max=D)
    return draft


def test_guard_stops_drafting_when_accepted_drafts_do_not_pay_for_themselves(monkeypatch):
    """Drafts that get 2 tokens accepted pay at GPU-like costs but not when a draft pass and a
    verification cost 5 greedy steps (fixed costs here: the wall clock does not decide the test)."""
    model = random_model(0, vocab=40, scale=3.0)
    with torch.no_grad():
        model.final_logits_bias[0, 38] = -1e4  # the drafter's wrong token is never greedy's
    x, am = sources(40, B=1, seed=4)
    cfg = SpecConfig(max_len=60, min_len=60)
    greedy = greedy_alone(model, x, am, cfg)
    monkeypatch.setattr(SpecGuard, "observe", lambda self, kind, seconds, rows: None)
    runs = {}
    for name, costs in (("cheap", {"draft": 1.0, "verify": 1.2, "lean": 1.0}),
                        ("dear", {"draft": 3.0, "verify": 2.0, "lean": 1.0})):
        guard = SpecGuard(cfg)
        guard.ms = dict(costs)
        tokens, _, st = speculative_decode(model, x, am, cfg, drafter=_prefix_drafter(greedy, 2), guard=guard)
        assert torch.equal(tokens, greedy)
        runs[name] = st
    assert runs["cheap"]["guard_min_accept"] == 2 and runs["dear"]["guard_min_accept"] == 4
    assert runs["cheap"]["draft_passes"] >= 10  # 2 accepted per draft: worth drafting again
    assert runs["dear"]["draft_passes"] <= 5  # not worth it: logarithmically rare probes
    assert runs["dear"]["accepted"] > 0


def test_guard_state_carries_over_calls(monkeypatch):
    """After the first drafts of recent sources failed (two in a row), the next source starts in
    the back-off pause instead of paying for a fresh failed draft at once; the output stays greedy's."""
    def wrong_draft(model, toks, L, N, cross, cross_mask, most):
        D = min(int((N - L).max()), most)
        return torch.full((len(L), D), 38), (N - L).clamp(max=D)
    monkeypatch.setattr(speculative, "_draft", wrong_draft)
    model = random_model(0, vocab=40, scale=3.0)
    with torch.no_grad():
        model.final_logits_bias[0, 38] = -1e4
    x, am = sources(40, B=3, seed=4)
    cfg = SpecConfig(max_len=20, min_len=20)
    guard = SpecGuard(cfg)
    first = []
    for i in range(3):
        first.append(speculative_decode(model, x[i:i + 1], am[i:i + 1], cfg, guard=guard))
        if i == 0:  # one source's first draft failed: not yet a pattern
            assert guard.paid >= 0.5
    fresh = speculative_decode(model, x[2:3], am[2:3], cfg)
    for i, (tokens, _, _) in enumerate(first):
        assert torch.equal(tokens, greedy_alone(model, x[i:i + 1], am[i:i + 1], cfg))
    assert first[0][2]["draft_passes"] == first[1][2]["draft_passes"] == 3  # cycles 0, 5, 14
    assert fresh[2]["draft_passes"] == 3
    assert first[2][2]["draft_passes"] < fresh[2]["draft_passes"]  # the third source starts paused
    assert guard.pause > cfg.backoff and guard.paid < 0.5
    # Drafts that pay: a new source drafts at once (one failed probe elsewhere does not pause it).
    monkeypatch.undo()
    good = SpecGuard(cfg)
    good.pause, good.cool = 32, 20
    tokens, _, st = speculative_decode(model, x[:1], am[:1], cfg, drafter=_prefix_drafter(
        greedy_alone(model, x[:1], am[:1], cfg), 60), guard=good)
    assert torch.equal(tokens, greedy_alone(model, x[:1], am[:1], cfg))
    assert good.start() == (0, cfg.backoff, cfg.window) and st["draft_passes"] >= 1 and st["verify_passes"] < 10


def test_models_without_length_head_draft_a_fixed_window():
    model = random_model(1, length_classes=0)
    x, am = sources(40, seed=3)
    for kw in (dict(), dict(draft_length="window", window=4)):
        assert_lossless(model, x, am, SpecConfig(max_len=18, **kw))


def test_float64_and_bfloat16_run():
    model = random_model(2, scale=3.0, dtype=torch.float64)
    x, am = sources(40, seed=2)
    assert_lossless(model, x, am, SpecConfig(max_len=16))
    model = random_model(2, scale=3.0, dtype=torch.bfloat16)
    assert_lossless(model, x, am, SpecConfig(max_len=16), batched=False)  # bf16 near-ties go to the bf16 replay


@pytest.mark.parametrize("kw,match", [
    (dict(window=0), r"SpecConfig.window = 0: must be an integer >= 1"),
    (dict(max_len=0), r"SpecConfig.max_len = 0: must be an integer >= 1"),
    (dict(min_len=30, max_len=20), r"min_len = 30: must be an integer in \[0, max_len = 20\]"),
    (dict(no_repeat_ngram=-1), r"no_repeat_ngram = -1: must be an integer >= 0"),
    (dict(draft_length="all"), r"draft_length = 'all': must be one of"),
    (dict(backoff=0), r"backoff = 0: must be an integer >= 1"),
    (dict(max_backoff=2), r"max_backoff = 2: must be an integer >= backoff = 4"),
    (dict(relaxed_topk=-2), r"relaxed_topk = -2: must be an integer >= 0"),
    (dict(relaxed_margin=-1.0), r"relaxed_margin = -1.0: must be a finite number >= 0"),
    (dict(tie_margin=-1e-3), r"tie_margin = -0.001: must be a number >= 0"),
])
def test_spec_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SpecConfig(**kw)


def test_max_len_beyond_positions_is_refused():
    model = random_model(0)
    x, am = sources(40)
    with pytest.raises(ValueError, match="max_position_embeddings|positions"):
        speculative_decode(model, x, am, SpecConfig(max_len=500))


# ---------------------------------------------------------------- finetune --mode janus (issue 13 §1)
def test_janus_mode_defaults():
    from finetune.train import parse_config

    cfg = parse_config(["--mode", "janus", "--model.init_from", "m", "--data.dir", "d"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.epochs) == (1e-4, 1000, 50.0)  # NAR's: it trains NAR too
    assert cfg.objective.preset == "paper" and cfg.objective.patterns() == ("ar", "nar", "aux")
    cfg = parse_config(["--mode", "janus", "--model.init_from", "m", "--data.dir", "d", "--objective.preset", "ar+nar",
                        "--optim.lr", "3e-3"])
    assert cfg.objective.preset == "ar+nar" and cfg.objective.aux == 0 and cfg.optim.lr == 3e-3


@pytest.mark.slow
def test_janus_finetune_serves_all_three_decoders(tmp_path):
    """--mode janus trains AR + NAR + AUX + KL + length, evaluates AR beam, mask-predict and
    speculative decoding on dev, exports the best; the export decodes speculatively = greedy."""
    import json
    import subprocess
    import sys

    from e2e import REPO, launch_env, make_base_model, torchrun, write_copy_task

    base = make_base_model(tmp_path / "base")
    task = write_copy_task(tmp_path / "task")
    save = tmp_path / "run"
    torchrun("finetune/train.py", [
        "--task", "xsum", "--mode", "janus", "--model.init_from", str(base), "--data.dir", str(task),
        "--run.save_dir", str(save), "--run.max_steps", "40", "--run.micro_batch_size", "16", "--run.log_every", "5",
        "--run.save_every", "40", "--run.eval_every", "20", "--optim.lr", "3e-3", "--optim.warmup_steps", "5",
        "--eval.samples", "16", "--eval.beam", "2", "--data.max_target_length", "16"], nproc=2)
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    for term in ("loss/ar", "loss/nar", "loss/aux", "loss/kl_ar_aux", "loss/length"):
        assert term in rows[-1], term
    assert rows[-1]["loss/ar"] < rows[0]["loss/ar"] and rows[-1]["loss/nar"] < rows[0]["loss/nar"]
    evals = [json.loads(line) for line in open(save / "eval.jsonl")]
    for key in ("ar_score", "nar_score", "spec_score", "spec_accepted_per_verification", "spec_passes_per_token"):
        assert key in evals[-1], key
    assert evals[-1]["score"] == pytest.approx((evals[-1]["ar_score"] + evals[-1]["nar_score"]
                                                + evals[-1]["spec_score"]) / 3)
    best = save / "best"
    assert JanusBart.from_bart(str(best)).length_head is not None
    outs = {}
    for mode, extra in (("spec", []), ("ar", ["--beam", "1"]), ("nar", ["--iterations", "1"])):
        hyp = tmp_path / f"{mode}.hyp"
        subprocess.run([sys.executable, "-m", "finetune.generate", "--model", str(best), "--src", str(task / "test.src"),
                        "--out", str(hyp), "--mode", mode, "--max-len", "16", "--batch-size", "8", *extra],
                       cwd=REPO, env=launch_env(), capture_output=True, text=True, check=True)
        outs[mode] = hyp.read_text()
    assert outs["spec"] == outs["ar"]


def test_tf32_is_detected_and_switched_off_for_the_decode(monkeypatch):
    """Exactness needs full-precision fp32 matmuls: TF32 in force on CUDA (either torch switch) is
    detected and turned off for the decode, then restored; CPU and half-precision models are left
    alone. The switch is exercised here by pretending the inputs are on CUDA."""
    from janus.speculative import full_fp32_matmuls, tf32_in_force

    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    cuda = torch.device("cuda")
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert not tf32_in_force(cuda, torch.float32)
        torch.set_float32_matmul_precision("high")  # what many training scripts set
        assert tf32_in_force(cuda, torch.float32)
        assert not tf32_in_force(torch.device("cpu"), torch.float32)
        assert not tf32_in_force(cuda, torch.bfloat16)
        with full_fp32_matmuls(True):
            assert not tf32_in_force(cuda, torch.float32)
            assert torch.get_float32_matmul_precision() == "highest"
        assert tf32_in_force(cuda, torch.float32) and torch.get_float32_matmul_precision() == "high"
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
        assert not tf32_in_force(cuda, torch.float32)
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")

        # The decode itself: the switch is used exactly when TF32 is in force.
        seen = []
        monkeypatch.setattr(speculative, "tf32_in_force", lambda device, dtype: True)
        real = speculative.full_fp32_matmuls

        def spy(on):
            seen.append(on)
            return real(on)
        monkeypatch.setattr(speculative, "full_fp32_matmuls", spy)
        model = random_model()
        x, am = sources(40, B=1)
        _, _, stats = speculative_decode(model, x, am, SpecConfig(max_len=8))
        assert seen == [True] and stats["tf32_switched_off"] is True
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])
