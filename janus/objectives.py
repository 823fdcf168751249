"""JANUS training objectives (paper eq. 1-5), the released code's weights, and ablation presets.

Every term is reported on its own. Cross-entropies are label-smoothed
(``(1 - eps) * nll + eps * mean_v(-log p_v)``, torch's definition); KL terms are computed in
fp32 over the masked positions, with no stop-gradient on either side.
``kl_x_y`` is the weight of KL(P_x || P_y).

The vocabulary part (lm_head projection, log-softmax, NLL and KL terms) runs in chunks of
``ObjectiveConfig.loss_chunk_rows`` logit rows by default (``_ChunkedVocabLoss``); the
unchunked computation (``loss_chunk_rows=0``) is kept as the reference. Rows are gathered
with index tensors, never boolean masks, so with host-side counts (``host_counts``) the
losses need no device -> host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# Vocabulary-loss chunking defaults (see ObjectiveConfig), per device type. CPU, 256 rows: each
# [rows, vocab] fp32 chunk buffer is ~50 MB at BART's 50k vocabulary (a pass holds about three,
# plus one per KL pair's difference at a third of the rows), and the chunk matmuls are as fast per
# FLOP as bigger ones (measured on CPU at bart-base dims, whole JANUS steps: 128/256/512 rows
# within 2 %; JANUS step peak memory 1599 MB at 128 rows, 1665 MB at 256, 2 x 512 tokens).
# GPU, 2048 rows: a chunk costs ~40 kernel launches whatever its size, so at a GPU micro-batch
# (32 x 512 tokens: ~16k AR rows plus ~8k masked row groups) 256-row chunks would be ~100 chunks
# and ~4000 launches per micro-batch, and 256-row matmuls leave a tensor-core GPU mostly idle;
# 2048 rows make ~12 chunks whose buffers are ~0.4 GB each (~1.6 GB for the pass, against ~8 GB
# per [rows, vocab] fp32 tensor unchunked). A reasoned default, not yet timed on a GPU: the GPU
# check (`make gpu-check`) reports the step time to tune it with `--objective.loss_chunk_rows`.
DEFAULT_CHUNK_ROWS = {"cpu": 256, "cuda": 2048}
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
    no ``[rows, vocab]`` tensor outlives its chunk; ``None`` (the default) picks the device's
    default (``DEFAULT_CHUNK_ROWS``: 256 on CPU, 2048 on GPU). ``0`` = the unchunked reference
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
    loss_chunk_rows: int | None = field(default=None, metadata={
        "help": "logit rows per chunk of the vocabulary losses (0 = unchunked; none = by device: "
                f"{', '.join(f'{k} {v}' for k, v in DEFAULT_CHUNK_ROWS.items())})"})
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
        if (self.loss_chunk_rows is not None and self.loss_chunk_rows < 0) or self.loss_chunk_min_vocab < 0:
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


# ============================================================================ row compaction
# Order of the entries of the per-term sum vector used by the chunked path.
TERMS = (*NLL_TERMS, *KL_TERMS)
_TERM_INDEX = {t: i for i, t in enumerate(TERMS)}
_KL_PAIRS = (("ar", "aux"), ("nar", "aux"), ("ar", "nar"))


def first_true_indices(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first ``count`` True entries of a 1-D bool tensor, in order.

    A stable sort of the flags puts the True entries first; slicing to the host-known
    ``count`` replaces boolean-mask indexing (whose output size the host would have to read
    back from the device)."""
    return torch.sort(flags.logical_not().to(torch.uint8), stable=True).indices[:count]


@dataclass
class _Rows:
    """Where the logit rows of a batch are, as flat index tensors (no boolean masks).

    ``valid_idx`` [n_tok]: flat label index (b * N + i) of every non-pad target, row-major;
    ``masked_flat`` [n_masked]: flat index (b * M + k) into the masked-order tensors of every
    valid masked position; ``masked_lab`` [n_masked]: its flat label index."""

    n_tok: int
    n_masked: int
    valid_idx: torch.Tensor
    masked_flat: torch.Tensor
    masked_lab: torch.Tensor


def _compact_rows(out, labels: torch.Tensor, host_counts: dict | None) -> _Rows:
    valid, order, mvalid = out.target_valid, out.masked_order, out.masked_valid
    B, N = valid.shape
    M = order.shape[1]
    has_masked = out.nar_hidden is not None or out.aux_hidden is not None
    if host_counts is not None:
        n_tok, n_masked = int(host_counts["n_tokens"]), int(host_counts["n_masked"])
    else:  # the one device -> host read of this path
        n_tok, n_masked = (int(v) for v in torch.stack([valid.sum(), mvalid.sum()]).tolist())
    if not has_masked:
        n_masked = 0  # no NAR/AUX pattern ran: no masked rows whatever the batch's decoder mask
    valid_idx = first_true_indices(valid.flatten(), n_tok)
    masked_flat = first_true_indices(mvalid.flatten(), n_masked)
    base = torch.arange(B, device=order.device).unsqueeze(1) * N
    masked_lab = (order + base).flatten().index_select(0, masked_flat) if M else masked_flat
    return _Rows(n_tok, n_masked, valid_idx, masked_flat, masked_lab)


def _flat(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1])


# ============================================================================ unchunked reference
def _unchunked_sums(out, labels: torch.Tensor, cfg: ObjectiveConfig, rows: _Rows) -> dict[str, torch.Tensor]:
    """Every term's sum over its rows, all rows at once with plain autograd: the reference
    (and the ``loss_chunk_rows=0`` path). Holds several ``[rows, vocab]`` fp32 tensors."""
    def log_probs(hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(_at_least_fp32(out.logits_fn(hidden)), dim=-1)

    eps = cfg.label_smoothing
    flat_labels = labels.flatten()
    masked_targets = flat_labels.index_select(0, rows.masked_lab)
    logp: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    if out.ar_hidden is not None:
        ar_all = log_probs(_flat(out.ar_hidden).index_select(0, rows.valid_idx))
        sums["ar"] = _smoothed_nll(ar_all, flat_labels.index_select(0, rows.valid_idx), eps).sum()
        if rows.n_masked:
            # Row of each masked position inside the compact AR rows (valid positions, row-major).
            compact_index = out.target_valid.flatten().cumsum(0) - 1
            logp["ar"] = ar_all.index_select(0, compact_index.index_select(0, rows.masked_lab))
    for name, hidden in (("nar", out.nar_hidden), ("aux", out.aux_hidden)):
        if hidden is not None:
            logp[name] = log_probs(_flat(hidden).index_select(0, rows.masked_flat))
            sums[name] = _smoothed_nll(logp[name], masked_targets, eps).sum()
    # KL(x||y) = sum p_x (lp_x - lp_y) and KL(y||x) = -sum p_y (lp_x - lp_y): one difference
    # per pair and one exp per distribution serve both directions.
    probs: dict[str, torch.Tensor] = {}
    for x, y in _KL_PAIRS:
        wanted = [t for t in (f"kl_{x}_{y}", f"kl_{y}_{x}") if cfg.weight(t) > 0]
        if not wanted or not _has(out, x) or not _has(out, y):
            continue
        if x not in logp:  # AR present but no masked rows in this batch
            sums.update({t: logp[y].sum() * 0.0 for t in wanted})
            continue
        diff = logp[x] - logp[y]
        for term in wanted:
            p, sign = (x, 1.0) if term == f"kl_{x}_{y}" else (y, -1.0)
            if p not in probs:
                probs[p] = logp[p].exp()
            sums[term] = sign * (probs[p] * diff).sum()
    return sums


def _has(out, pattern: str) -> bool:
    return getattr(out, f"{pattern}_hidden") is not None


# ============================================================================ chunked
@dataclass(frozen=True)
class _ChunkSpec:
    """Host-side description of one chunked vocabulary pass."""

    patterns: tuple[str, ...]  # patterns of each masked position's row group, in row order
    kl_terms: tuple[tuple[str, str, str], ...]  # (term, x, y) for the active KL(x||y)
    eps: float
    chunk_rows: int
    compute_dtype: torch.dtype
    autocast: bool  # logits as autocast would make them (bf16 matmul, fp32 bias add)


def _logits(spec: _ChunkSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            ws: "_Workspace | None" = None) -> torch.Tensor:
    """fp32 logits of rows ``x`` (already in the compute dtype); ``weight`` in the compute dtype.
    Full-precision logits are written into the workspace's reused buffer."""
    if spec.autocast:
        z = _at_least_fp32(torch.mm(x, weight.t()))
        return z if bias is None else z.add_(bias.to(z.dtype))
    if ws is not None and weight.dtype in (torch.float32, torch.float64):
        out = ws.get("z", (x.shape[0], weight.shape[0]), weight)
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias.to(weight.dtype), x, weight.t(), out=out)
    z = F.linear(x, weight, None if bias is None else bias.to(weight.dtype))
    return _at_least_fp32(z)


class _Workspace:
    """Scratch buffers of one chunked pass, reused chunk after chunk. Without it every chunk
    allocates several fresh ``[rows, vocab]`` tensors; a CPU allocator hands large blocks back to
    the system on free (glibc: above 32 MB), so each would be page-faulted in again (measured:
    ~5x the cost of the arithmetic on them). The CUDA caching allocator reuses blocks anyway."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` view of buffer ``name`` with ``like``'s dtype and device (grown when needed)."""
        n = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
            b = self._bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax runs in fp32 (bf16/fp16 logits are upcast; fp64 ones stay fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _group_pass(spec: _ChunkSpec, patterns: tuple[str, ...], kl_terms, x: torch.Tensor, t: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None, coef: dict | None, sums: dict | None,
                ws: _Workspace):
    """One chunk: ``x`` [P, g, D] rows (compute dtype) of P patterns x g positions, targets
    ``t`` [g]. Adds each term's sum over the chunk to ``sums`` and, given ``coef`` (term ->
    multiplier, python float or 0-dim tensor), returns the gradient of ``sum_term coef *
    term_sum`` w.r.t. the chunk's logits, [P, g, V] (fp32; None without ``coef``)."""
    P, g, D = x.shape
    z = _logits(spec, x.reshape(P * g, D), weight, bias, ws)
    lp = torch.log_softmax(z, dim=-1, out=ws.get("lp", tuple(z.shape), z)).view(P, g, -1)
    V = lp.shape[-1]
    eps = spec.eps
    if sums is not None:
        row = -lp.gather(-1, t.view(1, g, 1).expand(P, g, 1)).squeeze(-1)  # [P, g] nll
        if eps:
            row = (1.0 - eps) * row - eps * lp.mean(-1)
        for j, name in enumerate(patterns):
            sums[name].append(row[j].sum())
    col = {name: j for j, name in enumerate(patterns)}
    # KL(a||b) = sum p_a (lp_a - lp_b) = sign * sum p_a * diff[pair]: one difference per pair
    # serves both directions (and the gradients below).
    diffs: dict[tuple[str, str], torch.Tensor] = {}
    signed: dict[str, tuple[tuple[str, str], float]] = {}
    for term, a, b in kl_terms:
        key, sign = ((a, b), 1.0) if (a, b) in _KL_PAIRS else ((b, a), -1.0)
        if key not in diffs:
            diffs[key] = torch.sub(lp[col[key[0]]], lp[col[key[1]]], out=ws.get(f"diff{len(diffs)}", (g, V), lp))
        signed[term] = (key, sign)
    p = lp.exp_()  # in place: the differences above are separate tensors
    del lp
    tmp = ws.get("z", (g, V), p)  # the logits are spent: their buffer holds products, then the gradient
    kl_rows: dict[str, torch.Tensor] = {}
    for term, a, b in kl_terms:
        key, sign = signed[term]
        kl_rows[term] = torch.mul(p[col[a]], diffs[key], out=tmp).sum(-1)
        if sign < 0:
            kl_rows[term] = -kl_rows[term]
        if sums is not None:
            sums[term].append(kl_rows[term].sum())
    if coef is None:
        return None
    # d nll_smoothed / d z = p - q with q = (1 - eps) onehot(t) + eps / V;
    # d KL(a||b) / d z_a = p_a * (lp_a - lp_b - KL(a||b));  d KL(a||b) / d z_b = p_b - p_a. So
    # grad_n = p_n * (sum_b c_nb (lp_n - lp_b) + c_n + sum_a c_an - sum_b c_nb KL_nb) - sum_a c_an p_a - c_n q.
    grad = ws.get("z", tuple(p.shape), p) if kl_terms else p  # NLL only: p itself becomes the gradient
    for j, name in enumerate(patterns):
        out_kl = [term for term, a, _ in kl_terms if a == name]
        in_kl = [(term, col[a]) for term, a, b in kl_terms if b == name]
        c_nll = coef[name]
        gj = grad[j]
        shift = c_nll + sum(coef[term] for term, _ in in_kl)
        if out_kl:
            shift = shift - sum(coef[term] * kl_rows[term] for term in out_kl)
            for i, term in enumerate(out_kl):  # sum_b c_nb (lp_n - lp_b), from the pair differences
                key, sign = signed[term]
                if i == 0:
                    torch.mul(diffs[key], coef[term] * sign, out=gj)
                else:
                    _axpy(gj, diffs[key], coef[term], sign)
            gj.add_(shift.unsqueeze(-1)).mul_(p[j])
        elif grad is p:
            gj.mul_(shift)
        else:
            torch.mul(p[j], shift, out=gj)
        for term, k in in_kl:
            _axpy(gj, p[k], coef[term], -1.0)
        if isinstance(c_nll, float) and c_nll == 0.0:
            continue
        if eps:
            gj.sub_(c_nll * (eps / V))
        hot = c_nll * -(1.0 - eps)
        src = (torch.full((g, 1), hot, dtype=grad.dtype, device=grad.device) if isinstance(hot, float)
               else hot.to(grad.dtype).reshape(1, 1).expand(g, 1).contiguous())
        gj.scatter_add_(-1, t.view(g, 1), src)
    return grad


def _axpy(out: torch.Tensor, x: torch.Tensor, c, sign: float) -> None:
    """out += sign * c * x for a python-float or 0-dim-tensor c, without a temporary."""
    if isinstance(c, float):
        if c:
            out.add_(x, alpha=sign * c)
    else:
        out.addcmul_(x, c.to(out.dtype), value=sign)


class _VocabPass:
    """The chunk loop over masked row groups then AR-only rows; accumulates term sums and,
    given coefficients, the gradients w.r.t. hidden rows, weight and bias."""

    def __init__(self, spec: _ChunkSpec, weight, bias, h_groups, t_groups, h_single, t_single):
        self.spec, self.weight, self.bias = spec, weight, bias
        self.h_groups, self.t_groups, self.h_single, self.t_single = h_groups, t_groups, h_single, t_single

    def run(self, coef: dict | None, want_sums: bool, grad_bias: bool):
        """(term sums or None, gradients or None, scale). The gradients are those of ``sum_t coef_t
        * term_t`` multiplied by ``scale`` (see ``_grad_scale``; 1.0 without coefficients)."""
        spec, cd = self.spec, self.spec.compute_dtype
        acc = torch.promote_types(cd, torch.float32)  # accumulators (fp32, or fp64 for fp64 models)
        device = self.weight.device
        w = self.weight.to(cd)
        sums = {t: [] for t in TERMS} if want_sums else None
        grads, scale = None, 1.0
        if coef is not None:
            scale = _grad_scale(coef, cd)
            if not (isinstance(scale, float) and scale == 1.0):
                coef = {t: c * scale for t, c in coef.items()}
            grads = {"groups": torch.empty_like(self.h_groups), "single": torch.empty_like(self.h_single),
                     "weight": None,  # the first chunk writes it (no zero fill of a [vocab, d_model] tensor)
                     "bias": (torch.zeros(self.weight.shape[0], dtype=acc, device=device)
                              if grad_bias else None)}
        parts = [("groups", self.h_groups, self.t_groups, spec.patterns, spec.kl_terms),
                 ("single", self.h_single, self.t_single, ("ar",), ())]
        ws = _Workspace()
        for key, h, t, patterns, kl_terms in parts:
            if h.shape[0] == 0:
                continue
            P = len(patterns)
            step = max(1, spec.chunk_rows // P)
            for s in range(0, h.shape[0], step):
                hc = h[s:s + step]  # [g, P, D]
                x = hc.transpose(0, 1).to(cd).contiguous()  # [P, g, D]: one pattern's rows contiguous
                grad_z = _group_pass(spec, patterns, kl_terms, x, t[s:s + step], w, self.bias, coef, sums, ws)
                if grad_z is None:
                    continue
                gz = grad_z.view(-1, grad_z.shape[-1])
                gzc = gz.to(cd)
                xf = x.view(-1, x.shape[-1])
                grads[key][s:s + step] = torch.mm(gzc, w).view(x.shape).transpose(0, 1).to(hc.dtype)
                if grads["weight"] is None:
                    grads["weight"] = torch.mm(gzc.t(), xf).to(acc)
                elif cd == acc:
                    grads["weight"].addmm_(gzc.t(), xf)
                else:
                    grads["weight"].add_(torch.mm(gzc.t(), xf))
                if grads["bias"] is not None:
                    grads["bias"].add_(gz.sum(0))
                del grad_z, gz, gzc
        if grads is not None and grads["weight"] is None:  # no rows at all
            grads["weight"] = torch.zeros(self.weight.shape, dtype=acc, device=device)
        if sums is not None:
            zero = torch.zeros((), dtype=acc, device=device)
            sums = torch.stack([torch.stack(v).sum() if v else zero for v in sums.values()])
        return sums, grads, scale


class _ChunkedVocabLoss(torch.autograd.Function):
    """Vocabulary losses in chunks. Outputs (term sums [len(TERMS)], weighted total).

    The forward already computes, chunk by chunk, the gradient of the weighted total (the
    training objective) w.r.t. the hidden rows, the lm_head weight and the logits bias: the
    logits are computed once, and the first backward through ``total`` only scales those
    gradients (in place; they are then released). A backward through the individual term
    sums, or a second backward (``retain_graph=True``), recomputes the logits chunk by chunk.
    No ``[rows, vocab]`` tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, weight, bias, h_groups, h_single, t_groups, t_single, spec, total_coef):
        ctx.set_materialize_grads(False)
        vp = _VocabPass(spec, weight, bias, h_groups, t_groups, h_single, t_single)
        grad_bias = bias is not None and ctx.needs_input_grad[1]
        sums, grads, scale = vp.run(total_coef, want_sums=True, grad_bias=grad_bias)
        ctx.spec, ctx.grad_bias, ctx.total_coef = spec, grad_bias, total_coef
        # Kept on ctx (not saved tensors): they are scaled in place and dropped by the first backward.
        ctx.precomputed = (grads, scale)
        ctx.save_for_backward(weight, bias, h_groups, h_single, t_groups, t_single)
        return sums, _weighted(sums, total_coef)

    @staticmethod
    def backward(ctx, grad_sums, grad_total):
        weight, bias, h_groups, h_single, t_groups, t_single = ctx.saved_tensors
        out = dict.fromkeys(("groups", "single", "weight", "bias"))
        coef = None  # coefficients of a recomputation, if one is needed
        if grad_total is not None:
            pre, ctx.precomputed = ctx.precomputed, None
            if pre is not None:
                grads, scale = pre
                factor = grad_total / scale
                for key in out:
                    g = grads[key]
                    out[key] = None if g is None else _rescaled(g, factor)
            else:
                coef = {t: grad_total * c for t, c in ctx.total_coef.items()}
        if grad_sums is not None:
            per_term = {t: grad_sums[i] for i, t in enumerate(TERMS)}
            coef = per_term if coef is None else {t: v + coef[t] if t in coef else v for t, v in per_term.items()}
        if coef is not None:
            vp = _VocabPass(ctx.spec, weight, bias, h_groups, t_groups, h_single, t_single)
            _, grads, scale = vp.run(coef, want_sums=False, grad_bias=ctx.grad_bias)
            for key, g in grads.items():
                if g is not None:
                    g = _rescaled(g, 1.0 / scale)
                    out[key] = g if out[key] is None else out[key] + g
        g_w = None if out["weight"] is None else out["weight"].to(weight.dtype)
        g_b = None if out["bias"] is None or bias is None else out["bias"].to(bias.dtype)
        return g_w, g_b, out["groups"], out["single"], None, None, None, None


def _grad_scale(coef: dict, compute_dtype: torch.dtype):
    """A power of two by which the chunk loop multiplies the coefficients (and so every gradient
    it makes) before the logits' gradient is rounded to fp16, undone in fp32 afterwards.

    The logits' gradient of ``sum_t coef_t * term_t`` is bounded by about ``sum_t |coef_t|`` per
    entry (times ``1 + |lp_a - lp_b|`` for KL terms). With mean reduction the coefficients are
    ~1/rows, so unscaled its entries fall into fp16's subnormals (below 6.1e-5) and lose their
    digits, and a loss scale applied afterwards (DeepSpeed's fp16 engine: 2^16, not even
    representable in fp16) cannot bring them back. Scaled so that ``sum |coef|`` lies in
    [16, 32), the entries keep fp16's full precision and stay far below its maximum (65504).
    1 for every other dtype (bf16 has fp32's range; fp32/fp64 need nothing). A python float for
    python-float coefficients; a 0-dim tensor, computed on the device, for tensor ones."""
    if compute_dtype != torch.float16:
        return 1.0
    values = list(coef.values())
    if all(isinstance(c, float) for c in values):
        total = sum(abs(c) for c in values)
        return 2.0 ** (4 - math.floor(math.log2(total))) if total > 0 else 1.0
    total = sum((c.abs().float() if torch.is_tensor(c) else abs(c)) for c in values)
    return torch.exp2(4.0 - torch.floor(torch.log2(total.clamp_min(2.0 ** -100))))


def _rescaled(g: torch.Tensor, factor) -> torch.Tensor:
    """``g * factor`` (a python float or 0-dim tensor); half-precision ``g`` is multiplied in fp32
    and rounded once (``factor`` itself may not be representable in fp16: 2^16 is not). In place
    for fp32/fp64 ``g``."""
    if isinstance(factor, float) and factor == 1.0:
        return g
    if g.dtype in (torch.float16, torch.bfloat16):
        return g.float().mul_(factor).to(g.dtype)
    return g.mul_(factor.to(g.dtype) if torch.is_tensor(factor) else factor)


def _weighted(sums: torch.Tensor, coef: dict[str, float]) -> torch.Tensor:
    return sum((sums[_TERM_INDEX[t]] * c for t, c in coef.items() if c), sums.new_zeros(()))


def _chunked_sums(out, labels: torch.Tensor, cfg: ObjectiveConfig, rows: _Rows,
                  total_coef: dict[str, float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Term sums and the weighted total (sum_t coef_t * sum_t) via the chunked pass."""
    patterns = tuple(p for p in NLL_TERMS if _has(out, p))
    # Row groups of the masked positions hold every pattern that predicts them (the AR row
    # too when another pattern runs); AR rows of the other positions are single rows.
    group_patterns = patterns if rows.n_masked and patterns != ("ar",) else ()
    kl_terms = tuple((t, x, y) for t in KL_TERMS for x, y in [t[3:].split("_")]
                     if cfg.weight(t) > 0 and x in group_patterns and y in group_patterns)
    flat_labels = labels.flatten()
    ref = next(h for h in (out.ar_hidden, out.nar_hidden, out.aux_hidden) if h is not None)
    D = ref.shape[-1]
    hid = {"ar": out.ar_hidden, "nar": out.nar_hidden, "aux": out.aux_hidden}
    # Masked positions: AR row at the label index, NAR/AUX rows at the masked-order index.
    cols = []
    for p in group_patterns:
        idx = rows.masked_lab if p == "ar" else rows.masked_flat
        cols.append(_flat(hid[p]).index_select(0, idx))
    h_groups = torch.stack(cols, 1) if cols else ref.new_zeros(0, 1, D)
    t_groups = flat_labels.index_select(0, rows.masked_lab)
    if "ar" in patterns:
        if "ar" in group_patterns:  # AR rows of unmasked valid positions
            is_masked = torch.zeros(flat_labels.shape[0], dtype=torch.bool, device=labels.device)
            is_masked.index_fill_(0, rows.masked_lab, True)
            single_idx = first_true_indices(out.target_valid.flatten() & ~is_masked, rows.n_tok - rows.n_masked)
        else:
            single_idx = rows.valid_idx
        h_single = _flat(out.ar_hidden).index_select(0, single_idx).unsqueeze(1)  # [U, 1, D]
        t_single = flat_labels.index_select(0, single_idx)
    else:
        h_single, t_single = ref.new_zeros(0, 1, D), flat_labels[:0]
    bias = out.logits_bias
    device_type = ref.device.type
    autocast = torch.is_autocast_enabled(device_type)
    cd = torch.get_autocast_dtype(device_type) if autocast else ref.dtype
    # Terms of patterns that did not run stay out of the objective.
    total_coef = {t: c for t, c in total_coef.items() if t in patterns or any(t == k[0] for k in kl_terms)}

    def run(weight: torch.Tensor):  # inside the lm_head module's forward, where ZeRO-3 has gathered it
        spec = _ChunkSpec(patterns=group_patterns, kl_terms=kl_terms, eps=float(cfg.label_smoothing),
                          chunk_rows=chunk_rows_for(cfg, weight.device), compute_dtype=cd, autocast=autocast and cd != weight.dtype)
        with torch.autocast(device_type, enabled=False):
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (weight, bias, h_groups, h_single)):
                return _ChunkedVocabLoss.apply(weight, bias, h_groups, h_single, t_groups, t_single, spec, total_coef)
            sums, _, _ = _VocabPass(spec, weight, bias, h_groups, t_groups, h_single, t_single).run(
                None, want_sums=True, grad_bias=False)
            return sums, _weighted(sums, total_coef)

    sums, total = out.vocab_head(None, vocab_loss=run)
    active = [*patterns, *(k[0] for k in kl_terms)]
    # KL terms whose patterns ran but that have no masked rows in this batch are zero.
    active += [t for t in KL_TERMS if t not in active and cfg.weight(t) > 0
               and all(_has(out, p) for p in t[3:].split("_"))]
    return {t: sums[_TERM_INDEX[t]] for t in active}, total


def chunk_rows_for(cfg: ObjectiveConfig, device: torch.device | str) -> int:
    """Logit rows per chunk: ``cfg.loss_chunk_rows``, or the device type's default when None
    (``DEFAULT_CHUNK_ROWS``; other accelerators take the GPU's)."""
    if cfg.loss_chunk_rows is not None:
        return cfg.loss_chunk_rows
    kind = torch.device(device).type
    return DEFAULT_CHUNK_ROWS["cpu" if kind == "cpu" else "cuda"]


def use_chunked(cfg: ObjectiveConfig, vocab_size: int) -> bool:
    """Whether ``janus_losses`` takes the chunked path for this vocabulary size."""
    return cfg.loss_chunk_rows != 0 and vocab_size >= cfg.loss_chunk_min_vocab


def janus_losses(out, labels: torch.Tensor, cfg: ObjectiveConfig, length_targets: torch.Tensor | None = None,
                 host_counts: dict | None = None) -> dict[str, torch.Tensor]:
    """Loss terms for one batch given a ``JanusOutput``; ``total`` is the weighted sum.

    ``host_counts`` (optional): ``{"n_tokens": int, "n_masked": int, ...}`` computed on the
    host (data collator): the number of non-pad targets and of valid masked target positions
    (``decoder_mask & labels != pad``) in the batch. With it the losses run without any
    device -> host synchronisation (rows are compacted with index tensors sliced to these
    counts); they must be exact. Without it the counts are read back from the device once.

    The vocabulary part is chunked (``cfg.loss_chunk_rows`` rows at a time, see
    ``ObjectiveConfig``) when the output carries the lm_head module (``vocab_head``, whose
    ``forward(None, vocab_loss=fn)`` calls ``fn(weight)``) and the vocabulary is large
    enough; otherwise the unchunked reference computation runs.
    """
    rows = _compact_rows(out, labels, host_counts)
    mean = cfg.reduction == "mean"
    counts = {"ar": rows.n_tok, "nar": rows.n_masked, "aux": rows.n_masked, **{k: rows.n_masked for k in KL_TERMS}}
    scale = {t: (1.0 / max(counts[t], 1) if mean else 1.0) for t in TERMS}
    ref = next((h for h in (out.ar_hidden, out.nar_hidden, out.aux_hidden) if h is not None), None)
    if ref is None:
        raise ValueError("janus_losses: the output has no pattern hidden states")
    head = getattr(out, "vocab_head", None)
    if head is not None and use_chunked(cfg, head.out_features):
        total_coef = {t: float(cfg.weight(t)) * scale[t] for t in TERMS}
        sums, total = _chunked_sums(out, labels, cfg, rows, total_coef)
        losses = {t: v * scale[t] for t, v in sums.items()}
    else:
        sums = _unchunked_sums(out, labels, cfg, rows)
        losses = {t: v * scale[t] for t, v in sums.items()}
        total = sum(cfg.weight(k) * v for k, v in losses.items())
    if length_targets is not None and out.length_logits is not None and cfg.length > 0:
        losses["length"] = F.cross_entropy(out.length_logits.float(), length_targets,
                                           reduction="mean" if mean else "sum")
        total = total + cfg.length * losses["length"]
    losses["total"] = total
    losses["n_tokens"] = out.target_valid.sum()
    losses["n_masked"] = out.masked_valid.sum()
    return losses
