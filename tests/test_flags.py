"""Every documented option reaches what it controls.

For each training entry point every leaf field of its typed configuration is a flag; here
each flag is given, alone, a value different from its default, and the resolved run
configuration (what ``main`` trains with) must hold exactly that value -- nested fields,
presets and per-mode defaults included. Then one pretraining run per objective preset must
log exactly that preset's loss terms (the flag reaches the loss, not only the config).
"""
import dataclasses
import json
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from janus.config import _leaf_fields  # noqa: E402
from janus.objectives import KL_TERMS, PRESETS, ObjectiveConfig  # noqa: E402

from e2e import build_shards  # noqa: E402

# Fields whose values are constrained: a valid non-default choice for each.
CHOICES = {
    "task": "squadqg", "mode": "nar", "system": "mtnat", "objective.preset": "cmlm", "objective.reduction": "sum",
    "optim.schedule": "inverse_sqrt", "model.arch": "tiny", "data.masking": "span", "mtnat.lambda_schedule": "fixed",
    "run.resume": "none", "run.deepspeed_config": "ds_configs/zero1_fp32_cpu.json", "data.masking.preset": "reference",
    "data.verify": "always", "nmt:eval.iterations": "2,3", "eval.split": "valid", "model.bart": {"d_model": 32},
    "optim.betas": [0.8, 0.9], "objective.label_smoothing": 0.25, "eval.protocol": "modern", "run.profile_steps": "2-3",
}


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _value_for(entry, name, tp, default):
    for key in (f"{entry}:{name}", name):
        if key in CHOICES:
            return CHOICES[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else tp
    if base is bool:
        return not default
    if base is int:
        return (default or 0) + 3
    if base is float:
        return 0.37 if default != 0.37 else 0.41
    if typing.get_origin(base) is list:
        return [5]
    return "some/path"  # free strings: folders, names


def _get(cfg, name):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _flag_text(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


ENTRY_POINTS = {
    "pretrain": ("pretrain.train", "PretrainConfig", ["--data.shards_dir", "some/shards"]),
    "finetune": ("finetune.train", "FinetuneConfig", ["--model.init_from", "some/model", "--data.dir", "some/task"]),
    "nmt": ("finetune.nmt", "NMTConfig", ["--data.dir", "some/data"]),
}


def _cases():
    import importlib

    for entry, (module, cls_name, required) in ENTRY_POINTS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        for name, tp, f in _leaf_fields(cls):
            yield pytest.param(entry, name, _value_for(entry, name, tp, _default(f)), id=f"{entry}:{name}")


@pytest.mark.parametrize("entry,name,value", list(_cases()))
def test_every_flag_reaches_the_resolved_config(entry, name, value):
    import importlib

    module, _, required = ENTRY_POINTS[entry]
    parse = importlib.import_module(module).parse_config
    flags = dict(zip(required[::2], required[1::2])) | {f"--{name}": _flag_text(value)}
    cfg = parse([x for pair in flags.items() for x in pair])
    assert _get(cfg, name) == value, f"--{name} {value!r} resolved to {_get(cfg, name)!r}"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_objective_preset_fills_its_weights_and_explicit_fields_win(entry, preset):
    import importlib

    module, _, required = ENTRY_POINTS[entry]
    parse = importlib.import_module(module).parse_config
    extra = ["--system", "mtnat"] if entry == "nmt" and preset == "cmlm" else []
    cfg = parse([*required, *extra, "--objective.preset", preset])
    want = ObjectiveConfig.from_preset(preset)
    assert dataclasses.asdict(cfg.objective) == dataclasses.asdict(want)
    cfg = parse([*required, "--objective.preset", preset, "--objective.kl_ar_nar", "0.7"])
    assert cfg.objective.kl_ar_nar == 0.7
    assert cfg.objective.ar == want.ar and cfg.objective.label_smoothing == want.label_smoothing


def test_per_mode_defaults_and_explicit_values():
    from finetune.train import MODE_DEFAULTS, parse_config

    base = ["--model.init_from", "m", "--data.dir", "d"]
    for mode, d in MODE_DEFAULTS.items():
        cfg = parse_config([*base, "--mode", mode])
        assert cfg.optim.lr == d["optim"]["lr"] and cfg.optim.warmup_steps == d["optim"]["warmup_steps"]
        assert cfg.objective.preset == d["objective"] and cfg.epochs == d["epochs"]
        assert dataclasses.asdict(cfg.objective) == dataclasses.asdict(ObjectiveConfig.from_preset(d["objective"]))
        cfg = parse_config([*base, "--mode", mode, "--optim.lr", "0.005", "--objective.preset", "paper"])
        assert cfg.optim.lr == 0.005 and cfg.objective.preset == "paper" and cfg.objective.aux == 1.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("flags_shards"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pretraining_logs_exactly_the_presets_loss_terms(shards, tmp_path, preset):
    import pretrain.train as entry

    save = tmp_path / "run"
    entry.main(["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards), "--run.save_dir",
                str(save), "--run.max_steps", "1", "--run.log_every", "1", "--run.tensorboard", "false",
                "--objective.preset", preset])
    row = json.loads((save / "metrics.jsonl").read_text().splitlines()[-1])
    logged = {k[5:] for k in row if k.startswith("loss/")} - {"total"}
    want = ObjectiveConfig.from_preset(preset)
    expected = {t for t in ("ar", "nar", "aux", *KL_TERMS) if getattr(want, t) > 0}
    assert logged == expected
    config = json.loads((save / "config.json").read_text())
    assert config["objective"] == dataclasses.asdict(want)
