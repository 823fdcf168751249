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
    assert all(v is not None for v in cfg.to_dict().values())
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
