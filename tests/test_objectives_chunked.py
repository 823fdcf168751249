"""ObjectiveConfig presets (filled inside the config class) and the chunked vocabulary losses."""
import argparse
import dataclasses

import pytest

from janus.config import add_config_arguments, config_from_args
from janus.objectives import BASE_DEFAULTS, PRESET_ALIASES, PRESET_FIELDS, PRESETS, ObjectiveConfig


def _expected(preset: str) -> dict:
    return {name: PRESETS[preset].get(name, BASE_DEFAULTS[name]) for name in PRESET_FIELDS}


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_fills_every_unset_field(preset):
    cfg = ObjectiveConfig(preset=preset)
    got = {name: getattr(cfg, name) for name in PRESET_FIELDS}
    assert got == _expected(preset)
    assert all(v is not None for k, v in cfg.to_dict().items() if k != "loss_chunk_rows")  # None: by device
    assert ObjectiveConfig.from_preset(preset) == cfg


def test_cmlm_preset_no_longer_keeps_the_paper_weights():
    cfg = ObjectiveConfig(preset="cmlm")
    assert (cfg.ar, cfg.nar, cfg.aux, cfg.kl_ar_aux) == (0.0, 1.0, 0.0, 0.0)
    assert cfg.patterns() == ("nar",)
    pretrain = ObjectiveConfig(preset="released_pretrain").to_dict()
    assert pretrain["reduction"] == "sum" and pretrain["label_smoothing"] == 0.0 and pretrain["kl_ar_aux"] == 0.25


def test_explicit_fields_override_the_preset():
    cfg = ObjectiveConfig(preset="cmlm", ar=0.5, label_smoothing=0.0, reduction="sum")
    assert (cfg.ar, cfg.nar, cfg.aux, cfg.label_smoothing, cfg.reduction) == (0.5, 1.0, 0.0, 0.0, "sum")
    assert cfg.patterns() == ("ar", "nar")
    # An explicit value equal to the base default still wins over the preset.
    assert ObjectiveConfig(preset="ar", nar=1.0).nar == 1.0
    assert ObjectiveConfig.from_preset("released", kl_ar_aux=0.0).kl_ar_aux == 0.0
    with pytest.raises(ValueError, match="no positive weight"):
        ObjectiveConfig(preset="cmlm", nar=0.0)
    with pytest.raises(ValueError, match="unknown objective preset"):
        ObjectiveConfig(preset="nope")


def test_janus_is_an_alias_of_paper():
    assert PRESET_ALIASES["janus"] == "paper" and PRESETS["janus"] is PRESETS["paper"]
    a, b = ObjectiveConfig(preset="janus").to_dict(), ObjectiveConfig(preset="paper").to_dict()
    assert a.pop("preset") == "janus" and b.pop("preset") == "paper" and a == b


def test_resolved_dict_round_trips():
    cfg = ObjectiveConfig(preset="released_pretrain", ar=2.0)
    assert ObjectiveConfig(**cfg.to_dict()) == cfg
    # replace() copies resolved values (documented): the preset alone does not re-expand.
    assert dataclasses.replace(cfg, preset="cmlm").ar == 2.0


@dataclasses.dataclass
class _Cli:
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)


def _cli(argv, **kw):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cli)
    return config_from_args(_Cli, parser.parse_args(argv), **kw).objective


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_flag_on_a_cli_without_hooks(preset):
    cfg = _cli(["--objective.preset", preset])
    assert {n: getattr(cfg, n) for n in PRESET_FIELDS} == _expected(preset)


def test_cli_flags_override_the_preset():
    cfg = _cli(["--objective.preset", "cmlm", "--objective.aux", "0.25", "--objective.reduction", "sum"])
    assert (cfg.nar, cfg.aux, cfg.ar, cfg.reduction) == (1.0, 0.25, 0.0, "sum")
    assert _cli([]).to_dict() == ObjectiveConfig().to_dict()


def test_existing_defaults_fn_hooks_still_work():
    from finetune.nmt import nmt_defaults
    from finetune.train import mode_defaults

    def hooked(hook, preset=None, extra=()):
        argv = ["--objective.preset", preset] if preset else []
        return _cli([*argv, *extra], defaults_fn=lambda values: {"objective": hook(values)["objective"]})

    assert hooked(mode_defaults, "cmlm").to_dict() == ObjectiveConfig(preset="cmlm").to_dict()
    assert hooked(nmt_defaults, "aux", ["--objective.kl_ar_aux", "0.5"]).to_dict() == \
        ObjectiveConfig(preset="aux", kl_ar_aux=0.5).to_dict()
    assert hooked(nmt_defaults).to_dict() == ObjectiveConfig(preset="paper").to_dict()


# ----------------------------------------------------------------------------- chunked losses
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from janus.model import JanusBart  # noqa: E402
from janus.objectives import chunk_rows_for, janus_losses, use_chunked  # noqa: E402

from conftest import tiny_bart_config  # noqa: E402

PAD = 1
ZERO_GRAD = ".k_proj.bias"  # keys' bias: softmax-invariant, its true gradient is exactly 0 (fp32 noise only)


def _model(dtype=torch.float32, vocab=64, length_classes=16, seed=0, d_model=32):
    """A tiny BART whose distributions differ clearly between patterns (BART's 0.02 init
    gives near-uniform outputs and KL terms ~1e-7, which would test nothing)."""
    torch.manual_seed(seed)
    config = tiny_bart_config(vocab_size=vocab, d_model=d_model, dropout=0.0, attention_dropout=0.0)
    model = JanusBart(config, length_classes=length_classes).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
        model.final_logits_bias.normal_(0.0, 1.0)
    return model


def _batch(vocab, padded=True, B=3, S=8, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab - 1, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    y = torch.randint(4, vocab - 1, (B, N), generator=g)
    if padded:
        am[0, S - 3:] = 0
        x = torch.where(am.bool(), x, PAD)
        y[1, N - 4:] = PAD
        y[2, N - 1:] = PAD
    dm = (torch.rand(B, N, generator=g) < 0.5) & y.ne(PAD)
    dm[0, 0] = True
    lengths = y.ne(PAD).sum(1)
    return x, am, y, dm, lengths


def _host_counts(y, dm, extra_m=0):
    valid = y.ne(PAD)
    m = dm & valid
    return {"n_tokens": int(valid.sum()), "n_masked": int(m.sum()), "num_masked_max": int(m.sum(1).max()) + extra_m}


def _run(model, batch, objective, *, host_counts=None, loss_fn=None):
    x, am, y, dm, lengths = batch
    model.zero_grad(set_to_none=True)
    out = model(x, am, y, dm, objective=objective, length_targets=lengths, host_counts=host_counts)
    loss = out.loss if loss_fn is None else loss_fn(out.losses)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.losses.items()}, grads


def _assert_same(ref, got, rtol, atol_frac):
    (lr, gr), (lg, gg) = ref, got
    assert lr.keys() == lg.keys()
    for k in lr:
        torch.testing.assert_close(lg[k], lr[k], rtol=rtol, atol=rtol * 1e-3, msg=f"loss {k}")
    assert gr.keys() == gg.keys()
    for k in gr:
        if k.endswith(ZERO_GRAD):
            continue
        scale = float(gr[k].abs().max())
        torch.testing.assert_close(gg[k], gr[k], rtol=rtol, atol=atol_frac * scale + 1e-12, msg=f"grad {k}")


def _objectives(preset, **kw):
    unchunked = ObjectiveConfig(preset=preset, loss_chunk_rows=0, **kw)
    chunked = ObjectiveConfig(preset=preset, loss_chunk_rows=4, loss_chunk_min_vocab=0, **kw)
    return unchunked, chunked


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_chunked_equals_unchunked_fp32(preset, padded, smoothing, reduction):
    model = _model()
    batch = _batch(model.config.vocab_size, padded=padded)
    unchunked, chunked = _objectives(preset, label_smoothing=smoothing, reduction=reduction)
    ref = _run(model, batch, unchunked)
    got = _run(model, batch, chunked)
    _assert_same(ref, got, rtol=1e-5, atol_frac=1e-5)
    assert "length" in ref[0]  # the length loss is part of both and unaffected
    torch.testing.assert_close(got[0]["length"], ref[0]["length"], rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["paper", "released", "released_pretrain", "ar+nar+kl"])
def test_chunked_equals_unchunked_fp64_exactly(preset):
    model = _model(torch.float64)
    batch = _batch(model.config.vocab_size)
    unchunked, chunked = _objectives(preset)
    _assert_same(_run(model, batch, unchunked), _run(model, batch, chunked), rtol=1e-10, atol_frac=1e-10)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 1000])
def test_chunk_size_does_not_change_the_result(rows):
    model = _model()
    batch = _batch(model.config.vocab_size)
    ref = _run(model, batch, ObjectiveConfig(preset="released", loss_chunk_rows=0))
    got = _run(model, batch, ObjectiveConfig(preset="released", loss_chunk_rows=rows, loss_chunk_min_vocab=0))
    _assert_same(ref, got, rtol=1e-5, atol_frac=1e-5)


def test_backward_through_individual_terms_and_twice():
    """The fast path serves ``total``; any other combination of terms recomputes exactly,
    and so does a second backward of a retained graph."""
    model = _model()
    batch = _batch(model.config.vocab_size)
    unchunked, chunked = _objectives("released")

    def mix(losses):
        return 0.3 * losses["ar"] + 2.0 * losses["kl_ar_aux"] - 0.7 * losses["kl_nar_aux"] + losses["total"]

    _assert_same(_run(model, batch, unchunked, loss_fn=mix), _run(model, batch, chunked, loss_fn=mix),
                 rtol=1e-5, atol_frac=1e-5)
    x, am, y, dm, lengths = batch
    grads = []
    for objective in (unchunked, chunked):
        model.zero_grad(set_to_none=True)
        loss = model(x, am, y, dm, objective=objective, length_targets=lengths).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append(model.model.shared.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * float(grads[0].abs().max()))


def test_tied_lm_head_gets_the_vocabulary_gradient():
    """lm_head.weight is BART's shared embedding: the chunked loss's weight gradient must add
    to the embedding gradient of the same parameter (checked against an untied copy)."""
    model = _model()
    assert model.lm_head.weight is model.model.shared.weight
    batch = _batch(model.config.vocab_size)
    _, chunked = _objectives("paper")
    _, grads = _run(model, batch, chunked)
    # The same model with an untied output projection: embedding and head grads separately.
    untied = _model()
    untied.lm_head.weight = torch.nn.Parameter(untied.model.shared.weight.detach().clone())
    _, g2 = _run(untied, batch, chunked)
    assert "lm_head.weight" in g2 and float(g2["lm_head.weight"].abs().max()) > 0
    torch.testing.assert_close(grads["model.shared.weight"], g2["model.shared.weight"] + g2["lm_head.weight"],
                               rtol=1e-5, atol=1e-6)


def test_host_counts_give_the_same_losses_and_grads():
    model = _model()
    batch = _batch(model.config.vocab_size)
    _, _, y, dm, _ = batch
    for objective in _objectives("paper"):
        ref = _run(model, batch, objective)
        # num_masked_max may be any upper bound of the per-sample masked counts.
        for extra in (0, 3):
            _assert_same(ref, _run(model, batch, objective, host_counts=_host_counts(y, dm, extra)),
                         rtol=1e-5, atol_frac=1e-5)
    ar_only = ObjectiveConfig(preset="ar", loss_chunk_min_vocab=0, loss_chunk_rows=4)
    ref = _run(model, batch, ar_only)
    got = _run(model, batch, ar_only, host_counts=_host_counts(y, dm))
    _assert_same(ref, got, rtol=1e-5, atol_frac=1e-5)
    assert float(got[0]["n_masked"]) == 0.0  # no NAR/AUX pattern ran


def _sync_guard():
    try:
        from guards import no_host_sync
        return no_host_sync
    except ImportError:  # a local equivalent if the shared guard is not there
        import contextlib

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                bool_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) \
                    and any(torch.is_tensor(t) and t.dtype == torch.bool for t in args[1])
                if name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_index:
                    raise RuntimeError(f"host sync: aten.{name}")
                return func(*args, **(kwargs or {}))

        @contextlib.contextmanager
        def guard():
            with _Mode():
                yield
        return guard


@pytest.mark.parametrize("chunk_rows", [0, 4])
@pytest.mark.parametrize("preset", ["paper", "ar", "cmlm", "aux", "ar+nar+kl", "released_pretrain"])
def test_forward_losses_backward_run_sync_free_with_host_counts(preset, chunk_rows):
    no_host_sync = _sync_guard()
    model = _model().train()  # dropout paths too
    model.config.dropout = 0.1
    batch = _batch(model.config.vocab_size)
    x, am, y, dm, lengths = batch
    objective = ObjectiveConfig(preset=preset, loss_chunk_rows=chunk_rows, loss_chunk_min_vocab=0)
    counts = _host_counts(y, dm)
    try:  # every tensor factory on the path names its device (a CPU tensor on a GPU run would crash)
        from guards import strict_device
    except ImportError:
        import contextlib
        strict_device = contextlib.nullcontext
    with no_host_sync(), strict_device():
        out = model(x, am, y, dm, objective=objective, length_targets=lengths, host_counts=counts)
        out.loss.backward()
    if {"nar", "aux"} & set(objective.patterns()):
        # Without the counts the NAR/AUX streams read M back once: the guard sees it (it can fail).
        with pytest.raises(Exception, match="sync"):
            with no_host_sync():
                model(x, am, y, dm, objective=objective, length_targets=lengths)
    else:  # the AR pattern needs no host count at all (the encoder takes the mask as is)
        with no_host_sync():
            model(x, am, y, dm, objective=objective, length_targets=lengths)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16(mode):
    model = _model()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    batch = _batch(model.config.vocab_size)
    results = []
    for objective in _objectives("paper"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            results.append(_run(model, batch, objective))
    (lu, gu), (lc, gc) = results
    for k in ("ar", "nar", "aux", "kl_ar_aux", "kl_aux_nar", "total"):
        assert lc[k].dtype == torch.float32  # log-softmax in fp32
        torch.testing.assert_close(lc[k], lu[k], rtol=2e-2, atol=1e-3, msg=k)
    for k in gu:
        if k.endswith(ZERO_GRAD):
            continue
        assert gc[k].dtype == gu[k].dtype
        a, b = gc[k].float().flatten(), gu[k].float().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, k


class _VocabRows(TorchDispatchMode):
    """Largest number of rows of any [..., vocab] tensor an op produces (the transposed
    [d_model, vocab] weight aside)."""

    def __init__(self, vocab, d_model):
        super().__init__()
        self.vocab, self.d_model, self.rows = vocab, d_model, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.d_model, self.vocab):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_vocabulary_tensor_larger_than_a_chunk():
    vocab = 211  # a size no other dimension of the model has
    model = _model(vocab=vocab)
    batch = _batch(vocab, B=4, N=12)
    x, am, y, dm, lengths = batch
    n_tok = int(y.ne(PAD).sum())
    seen = {}
    for rows in (0, 6):
        objective = ObjectiveConfig(preset="paper", loss_chunk_rows=rows, loss_chunk_min_vocab=0)
        with _VocabRows(vocab, model.config.d_model) as probe:
            model(x, am, y, dm, objective=objective, length_targets=lengths).loss.backward()
        seen[rows] = probe.rows
    assert seen[0] >= n_tok  # the reference makes [all AR rows, vocab] tensors (and NAR/AUX ones)
    assert seen[6] <= 6  # chunks of 6 rows: AR, NAR and AUX rows of 2 masked positions


def test_default_is_chunked_with_a_small_vocabulary_switch(monkeypatch):
    default = ObjectiveConfig()
    assert default.loss_chunk_rows is None  # by device: fewer, larger chunks on a GPU
    assert chunk_rows_for(default, "cpu") == 256 and chunk_rows_for(default, torch.device("cuda", 1)) == 2048
    assert chunk_rows_for(ObjectiveConfig(loss_chunk_rows=64), "cuda") == 64
    assert use_chunked(default, 50265) and not use_chunked(default, 64)
    assert not use_chunked(ObjectiveConfig(loss_chunk_rows=0), 50265)
    assert use_chunked(ObjectiveConfig(loss_chunk_min_vocab=0), 64)
    # The switch decides the path janus_losses takes.
    import janus.objectives as objectives
    calls = []
    real = objectives._chunked_sums
    monkeypatch.setattr(objectives, "_chunked_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    x, am, y, dm, lengths = _batch(model.config.vocab_size)
    model(x, am, y, dm, objective=ObjectiveConfig())
    assert not calls
    model(x, am, y, dm, objective=ObjectiveConfig(loss_chunk_min_vocab=0))
    assert calls
    # The device's chunk size reaches the chunk loop.
    sizes = []
    real_pass = objectives._group_pass
    monkeypatch.setattr(objectives, "_group_pass", lambda spec, *a, **k: sizes.append(spec.chunk_rows) or real_pass(
        spec, *a, **k))
    model(x, am, y, dm, objective=ObjectiveConfig(loss_chunk_min_vocab=0))
    assert set(sizes) == {256}


def test_losses_without_a_vocab_head_use_the_reference_path():
    model = _model()
    x, am, y, dm, _ = _batch(model.config.vocab_size)
    objective = ObjectiveConfig(loss_chunk_min_vocab=0)
    out = model(x, am, y, dm, objective=objective)
    ref = dict(out.losses)
    out.vocab_head = None
    again = janus_losses(out, y, objective)
    for k in ref:
        torch.testing.assert_close(again[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero3_training_chunked_equals_unchunked(tmp_path):
    """Under DeepSpeed ZeRO-3 (2 CPU ranks) the lm_head weight is partitioned outside module
    forwards; the chunked losses use it inside ``lm_head``'s forward. Same losses at every
    step as the unchunked path (so the same gradients)."""
    import json

    from e2e import build_shards, read_metrics, torchrun

    ds = json.load(open("ds_configs/zero3_fp32_cpu.json"))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny embedding
    ds_path = tmp_path / "zero3.json"
    ds_path.write_text(json.dumps(ds))
    (tmp_path / "data").mkdir()
    shards = build_shards(tmp_path / "data")
    runs = {}
    for name, flags in (("chunked", ["--objective.loss_chunk_rows", "16", "--objective.loss_chunk_min_vocab", "0"]),
                        ("unchunked", ["--objective.loss_chunk_rows", "0"])):
        save = tmp_path / name
        torchrun("pretrain/train.py", ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                                       "--run.save_dir", str(save), "--run.deepspeed_config",
                                       str(ds_path), "--run.max_steps", "4", "--run.save_every",
                                       "100", "--run.log_every", "1", "--optim.lr", "2e-3", "--optim.warmup_steps",
                                       "1", *flags])
        runs[name] = read_metrics(save)
    assert sorted(runs["chunked"]) == list(range(1, 5))
    for step, metrics in runs["unchunked"].items():
        for key in ("loss/ar", "loss/nar", "loss/aux", "loss/kl_ar_aux", "loss/kl_aux_nar", "loss/total"):
            assert runs["chunked"][step][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), (step, key)
