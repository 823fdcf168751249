"""JANUS training objectives (paper eq. 1-5), the released code's weights, and ablation presets.

Every term is reported on its own. Cross-entropies are label-smoothed
(``(1 - eps) * nll + eps * mean_v(-log p_v)``, torch's definition); KL terms are computed in
fp32 over the masked positions, with no stop-gradient on either side.
``kl_x_y`` is the weight of KL(P_x || P_y).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# Vocabulary-loss chunking defaults (see ObjectiveConfig).
DEFAULT_CHUNK_ROWS = 1024
CHUNK_MIN_VOCAB = 1024

KL_TERMS = ("kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar", "kl_ar_nar", "kl_nar_ar")
NLL_TERMS = ("ar", "nar", "aux")
_ZERO = {"ar": 0.0, "nar": 0.0, "aux": 0.0, **{k: 0.0 for k in KL_TERMS}}

# The values every preset starts from (paper eq. 5 with label smoothing 0.1, per-term means).
BASE_DEFAULTS: dict = {"ar": 1.0, "nar": 1.0, "aux": 1.0, "kl_ar_aux": 1.0, "kl_aux_ar": 1.0, "kl_nar_aux": 1.0,
                       "kl_aux_nar": 1.0, "kl_ar_nar": 0.0, "kl_nar_ar": 0.0, "length": 0.1,
                       "label_smoothing": 0.1, "reduction": "mean"}

# Each preset lists the values it sets; the rest come from BASE_DEFAULTS.
PRESETS: dict[str, dict] = {
    # Paper eq. 5: L = L_AR + L_NAR + L_AUX + the four AR/NAR <-> AUX KL terms.
    "paper": {},
    # The released code, translation: AR + 1*KL(AR,NAR) + 3*KL(AR,AUX) + 0.5*(NAR+AUX)
    # + 0.1*length + 1*KL(NAR,AUX), with KL(x,y) = (KL(x||y) + KL(y||x)) / 2.
    "released": {"ar": 1.0, "nar": 0.5, "aux": 0.5, "kl_ar_nar": 0.5, "kl_nar_ar": 0.5, "kl_ar_aux": 1.5,
                 "kl_aux_ar": 1.5, "kl_nar_aux": 0.5, "kl_aux_nar": 0.5, "length": 0.1},
    # The released code, pretraining: no smoothing, token sums,
    # 0.5*(AR+NAR+AUX) + 0.5*(KL(NAR,AUX) + KL(AR,AUX)).
    "released_pretrain": {**_ZERO, "ar": 0.5, "nar": 0.5, "aux": 0.5, "kl_ar_aux": 0.25, "kl_aux_ar": 0.25,
                          "kl_nar_aux": 0.25, "kl_aux_nar": 0.25, "label_smoothing": 0.0, "reduction": "sum"},
    # Paper Table 6 rows.
    "ar": {**_ZERO, "ar": 1.0},
    "cmlm": {**_ZERO, "nar": 1.0},
    "aux": {**_ZERO, "aux": 1.0},
    "ar+nar": {**_ZERO, "ar": 1.0, "nar": 1.0},
    "ar+nar+kl": {**_ZERO, "ar": 1.0, "nar": 1.0, "kl_ar_nar": 1.0, "kl_nar_ar": 1.0},
}
# Table 6's "full" row is the paper objective itself: ``janus`` is an alias of ``paper``
# (the very same entry, so the two can never drift apart).
PRESET_ALIASES: dict[str, str] = {"janus": "paper"}
for _alias, _target in PRESET_ALIASES.items():
    PRESETS[_alias] = PRESETS[_target]

# Fields a preset may fill (everything but the preset name and the loss-computation knobs).
PRESET_FIELDS = tuple(BASE_DEFAULTS)

_FROM_PRESET = "unset = from the preset"


def _weight(help_text: str):
    return field(default=None, metadata={"help": f"{help_text} ({_FROM_PRESET})"})


@dataclass
class ObjectiveConfig:
    """Weights, smoothing and reduction of the JANUS objective.

    ``preset`` fills every field the caller leaves unset (``None``) from ``PRESETS[preset]``,
    then from ``BASE_DEFAULTS``; explicitly given fields win. This happens in
    ``__post_init__``, so it holds for Python callers (``ObjectiveConfig(preset="cmlm")``),
    config files and ``--objective.preset`` alike, and after construction every field holds
    a concrete value (``to_dict()`` shows the resolved weights). ``dataclasses.replace`` copies
    the resolved values, so changing only ``preset`` there does not re-expand it: build a new
    ``ObjectiveConfig(preset=...)`` instead.

    ``loss_chunk_rows`` bounds the vocabulary-sized work: the lm_head projection, log-softmax,
    the label-smoothed NLL terms and the KL terms are computed over at most that many logit
    rows at a time (AR, NAR and AUX rows of one masked position always share a chunk), and
    no ``[rows, vocab]`` tensor outlives its chunk. ``0`` = the unchunked reference
    computation (every row at once, plain autograd). Vocabularies smaller than
    ``loss_chunk_min_vocab`` always use the unchunked path (it is faster there and its
    tensors are small); ``0`` disables that switch.
    """

    preset: str = field(default="paper", metadata={"help": f"one of {sorted(PRESETS)}"})
    ar: float | None = _weight("weight of the AR cross-entropy")
    nar: float | None = _weight("weight of the NAR cross-entropy")
    aux: float | None = _weight("weight of the AUX cross-entropy")
    kl_ar_aux: float | None = _weight("weight of KL(AR||AUX)")
    kl_aux_ar: float | None = _weight("weight of KL(AUX||AR)")
    kl_nar_aux: float | None = _weight("weight of KL(NAR||AUX)")
    kl_aux_nar: float | None = _weight("weight of KL(AUX||NAR)")
    kl_ar_nar: float | None = _weight("weight of KL(AR||NAR)")
    kl_nar_ar: float | None = _weight("weight of KL(NAR||AR)")
    # Used only when the model has a length head and targets are given.
    length: float | None = _weight("weight of the length-head cross-entropy")
    label_smoothing: float | None = _weight("label smoothing of the cross-entropies")
    # "mean": each term averaged over its tokens; "sum": summed over them.
    reduction: str | None = _weight("mean (each term averaged over its tokens) or sum")
    loss_chunk_rows: int = field(default=DEFAULT_CHUNK_ROWS, metadata={
        "help": "logit rows per chunk of the vocabulary losses (0 = unchunked)"})
    loss_chunk_min_vocab: int = field(default=CHUNK_MIN_VOCAB, metadata={
        "help": "vocabularies below this size use the unchunked losses (0 = always chunk)"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown objective preset {self.preset!r}; choose from {sorted(PRESETS)}")
        preset = PRESETS[self.preset]
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, preset.get(name, BASE_DEFAULTS[name]))
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"objective reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        weights = {name: getattr(self, name) for name in (*_ZERO, "length")}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"objective weights must be >= 0: {weights}")
        if not any(getattr(self, k) > 0 for k in _ZERO):
            raise ValueError("objective has no positive weight")
        if self.loss_chunk_rows < 0 or self.loss_chunk_min_vocab < 0:
            raise ValueError(f"loss_chunk_rows and loss_chunk_min_vocab must be >= 0, got "
                             f"{self.loss_chunk_rows}, {self.loss_chunk_min_vocab}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ObjectiveConfig":
        """``ObjectiveConfig(preset=name, **overrides)`` (kept for existing callers)."""
        if name not in PRESETS:
            raise ValueError(f"unknown objective preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**overrides, "preset": name})

    def weight(self, term: str) -> float:
        return getattr(self, term)

    def patterns(self) -> tuple[str, ...]:
        """The decoder patterns this objective needs."""
        active = [k for k in _ZERO if getattr(self, k) > 0]
        return tuple(p for p in ("ar", "nar", "aux") if any(p in term.split("_") for term in active))

    def to_dict(self) -> dict:
        return asdict(self)


def _smoothed_nll(logp: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if eps == 0.0:
        return nll
    return (1.0 - eps) * nll - eps * logp.mean(-1)


def janus_losses(out, labels: torch.Tensor, cfg: ObjectiveConfig,
                 length_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms for one batch given a ``JanusOutput``; ``total`` is the weighted sum."""
    valid, order, mvalid = out.target_valid, out.masked_order, out.masked_valid
    n_tok, n_masked = valid.sum(), mvalid.sum()
    if cfg.reduction == "mean":
        def reduce(x, count):
            return x.sum() / count.clamp(min=1)
    else:
        def reduce(x, count):
            return x.sum()

    def log_probs(hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(out.logits_fn(hidden).float(), dim=-1)

    eps = cfg.label_smoothing
    masked_targets = labels.gather(1, order)[mvalid]
    logp: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    if out.ar_hidden is not None:
        ar_all = log_probs(out.ar_hidden[valid])
        losses["ar"] = reduce(_smoothed_nll(ar_all, labels[valid], eps), n_tok)
        # Row of each masked position inside the compact AR rows (valid positions, row-major).
        compact_index = (valid.flatten().cumsum(0) - 1).view_as(valid)
        logp["ar"] = ar_all[compact_index.gather(1, order)[mvalid]]
    for name, hidden in (("nar", out.nar_hidden), ("aux", out.aux_hidden)):
        if hidden is not None:
            logp[name] = log_probs(hidden[mvalid])
            losses[name] = reduce(_smoothed_nll(logp[name], masked_targets, eps), n_masked)
    # KL(x||y) = sum p_x (lp_x - lp_y) and KL(y||x) = -sum p_y (lp_x - lp_y): one difference
    # per pair and one exp per distribution serve both directions (vocab-sized tensors dominate).
    probs: dict[str, torch.Tensor] = {}
    for x, y in (("ar", "aux"), ("nar", "aux"), ("ar", "nar")):
        wanted = [t for t in (f"kl_{x}_{y}", f"kl_{y}_{x}") if cfg.weight(t) > 0]
        if not wanted or x not in logp or y not in logp:
            continue
        diff = logp[x] - logp[y]
        for term in wanted:
            p, sign = (x, 1.0) if term == f"kl_{x}_{y}" else (y, -1.0)
            if p not in probs:
                probs[p] = logp[p].exp()
            losses[term] = reduce(sign * (probs[p] * diff).sum(-1), n_masked)
    total = sum(cfg.weight(k) * v for k, v in losses.items())
    if length_targets is not None and out.length_logits is not None and cfg.length > 0:
        losses["length"] = F.cross_entropy(out.length_logits.float(), length_targets,
                                           reduction="mean" if cfg.reduction == "mean" else "sum")
        total = total + cfg.length * losses["length"]
    losses["total"] = total
    losses["n_tokens"] = n_tok
    losses["n_masked"] = n_masked
    return losses
