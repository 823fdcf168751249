"""JANUS training objectives (paper eq. 1-5), the released code's weights, and ablation presets.

Every term is reported on its own. Cross-entropies are label-smoothed
(``(1 - eps) * nll + eps * mean_v(-log p_v)``, torch's definition); KL terms are computed in
fp32 over the masked positions, with no stop-gradient on either side.
``kl_x_y`` is the weight of KL(P_x || P_y).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

KL_TERMS = ("kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar", "kl_ar_nar", "kl_nar_ar")
_ZERO = {"ar": 0.0, "nar": 0.0, "aux": 0.0, **{k: 0.0 for k in KL_TERMS}}

# Each preset lists the weights it sets; the rest come from the dataclass defaults.
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
    "janus": {},
}


@dataclass
class ObjectiveConfig:
    preset: str = "paper"
    ar: float = 1.0
    nar: float = 1.0
    aux: float = 1.0
    kl_ar_aux: float = 1.0
    kl_aux_ar: float = 1.0
    kl_nar_aux: float = 1.0
    kl_aux_nar: float = 1.0
    kl_ar_nar: float = 0.0
    kl_nar_ar: float = 0.0
    length: float = 0.1  # used only when the model has a length head and targets are given
    label_smoothing: float = 0.1
    reduction: str = "mean"  # "mean": each term averaged over its tokens; "sum": summed over them

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown objective preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"objective reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        weights = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _ZERO or f.name == "length"}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"objective weights must be >= 0: {weights}")
        if not any(getattr(self, k) > 0 for k in _ZERO):
            raise ValueError("objective has no positive weight")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ObjectiveConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown objective preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

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
