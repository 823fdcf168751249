"""Self-speculative decoding: one JANUS model drafts with its NAR pattern and verifies with its AR
query stream; the output is token-identical to greedy AR decoding (``beam_search`` with beam 1).

JANUS trains one set of weights for both patterns, so no second model is needed. A **cycle** is:

1. **Draft** (only when a row has no usable draft left, see below): one CMLM pass of the NAR pattern
   over a canvas ``[accepted prefix y_0..y_{L-1} | <mask> x (N - L)]`` at positions ``1..N``
   (bidirectional over the canvas, exactly a mask-predict refinement pass with the prefix unmasked).
   ``N`` is the length head's most likely target length among those longer than the prefix
   (``draft_length="head"``), or ``L + window`` (``"window"``, and for models without a length
   head). The draft is the best token (never <pad>/<mask>) of the first ``window`` masked slots,
   cut after its first </s>; the last decoder layer and the vocabulary projection run only those.
2. **Verify**: one pass of the AR pattern over ``w + 1`` content tokens (the last accepted token
   and ``w`` draft tokens, at positions ``L..L+w``) and ``w + 1`` queries (positions
   ``L+1..L+w+1``). Content keys/values of the accepted prefix come from a per-row cache (rows hold
   different numbers of tokens: one padded buffer, a causal key mask), as in ``ARStepper``; the new
   content keys/values are written into it, so accepted tokens are never recomputed.
3. **Accept** the longest draft prefix whose tokens equal the AR's greedy choice (same bans as beam
   search: never <pad>/<mask>, </s> only after ``min_len`` and forced at ``max_len``, no repeated
   n-gram computed on the draft-extended prefix), then append the AR's own token at the first
   disagreement (or after a fully accepted draft). Every cycle commits at least one token.

**Re-drafting only as needed.** After a rejection at slot j the draft beyond j is kept (still at
its slots: a substitution error leaves the rest right) and verified next cycle at no drafting cost.
A new draft pass runs only when a row's draft is used up or its first verified token was rejected.

**Adaptive guard** (``adaptive=True``). A fresh draft is verified over the full ``window``; the
stale remainder after a rejection over ``min(window, 2 * accepted)``. A fresh draft **pays** when the
tokens it got accepted saved more than the draft pass and the verification cost: with the measured
per-row costs of a draft pass ``D``, a verification ``V`` and a plain greedy-like step ``G`` (wall
clock, read at the points where the loop synchronises anyway), a fresh draft committing ``a + 1``
tokens pays when ``a + 1 >= (D + V) / G``, i.e. ``a >= max(2, ceil((D + V) / G - 1))`` (2 until a
greedy-like step has been timed). The costs are measured, and this threshold applies, while one
row is decoding (batch 1, or the last row of a batch): in a larger batch a row that stops drafting
still rides along in the others' verification passes, so pausing it saves little, and a fresh draft
there pays from 2 accepted tokens. When a fresh draft does not pay, the row stops drafting for
``backoff`` cycles (plain greedy-like steps: one content token + one query, window 0, through a
lean code path), the pause doubles after each further failure up to ``max_backoff``, and the next
probe drafts and verifies a quarter of the window (at least 2); a fresh draft that pays resets both.
So on a model whose drafts are useless the draft passes become logarithmically rare (cycles 0, 5,
14, 31, 64, ... with the defaults) and the cost tends to plain greedy's. The costs and the back-off
state live in a ``SpecGuard``; passed to successive calls (``finetune.generate`` keeps one per
file, ``benchmarks.decode_latency`` one per timed file), what it learnt on one batch-1 source
carries to the next: while the first drafts of most recent sources paid (a moving average; later
drafts, often short ones at an output's tail, do not count), a new source drafts at once;
otherwise it starts inside the last back-off pause, since on short outputs a fresh start per
source would pay a few failed probes every source. Batches of several rows start fresh.

**Exactness.** Greedy's decision at a slot is the top of ``score + log p`` in float32 (the score
summed sequentially in float32, as the verifier sums it too). But one pass over many positions is
not bit-identical to many incremental steps (BLAS kernels and attention reductions depend on the
number of rows: up to ~3e-6 in log-prob measured at demo and bart-base dims), so a near-tie could
flip. Every token is therefore *certified*: the verifier's top-1 must beat the runner-up by more
than ``tie_margin`` (default 1e-4 in float32, 30x that discrepancy) plus 2 float ulps of
|score| + |log p| (so rounding the score addition cannot make a tie), which makes the incremental
decoder choose the same token. An uncertified slot (a near-tie) is resolved by an **exact
replay**: the incremental ``ARStepper`` on that source alone, teacher-forced through the committed
prefix, whose arithmetic is exactly ``beam_search``'s on that source (the replay's state is kept,
so later near-ties of the row cost only the new steps; a replay at slot t costs t incremental
steps, the price of exactness; near-ties are common only in untrained, flat distributions).
Hence the output equals ``beam_search(beam=1)`` on
every source alone; a batched ``beam_search`` itself agrees with that except at its own
sub-1e-5 near-ties. Tests check this on random models (poor drafts, many replays) and a trained
one (good drafts), at batch 1 and batch > 1.

**Relaxed acceptance** (``relaxed_topk > 0``; NOT lossless): a draft token is also accepted when
it is among the AR's ``relaxed_topk`` best and its log-prob is within ``relaxed_margin`` of the
best (GAD++ style); the AR's own tokens are still certified.

All rows of a batch advance together: every tensor is padded across rows and masked, rows leave
the batch when they finish; there is no Python loop over rows except the rare exact replay.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from janus.decoding import ARStepper, _bidirectional_mask, _check, _never_special, step_bans
from janus.flops import fp32_matmul_kind
from janus.model import JanusBart, _heads, _merge

DRAFT_LENGTHS = ("head", "window")


@dataclass
class SpecConfig:
    window: int = field(default=32, metadata={"help": "speculative: most draft tokens verified in one AR pass"})
    max_len: int = field(default=64, metadata={"help": "longest output in generated tokens, <s> and </s> included"})
    min_len: int = field(default=1, metadata={"help": "AR: </s> is banned before this many generated tokens"})
    no_repeat_ngram: int = field(default=0, metadata={"help": "AR: ban repeating any n-gram of this size (0 = off)"})
    draft_length: str = field(default="head", metadata={
        "help": "speculative: draft canvas length: 'head' (the length head's best length above the prefix) "
                "or 'window' (prefix + window masks)", "choices": DRAFT_LENGTHS})
    adaptive: bool = field(default=True, metadata={
        "help": "speculative: shrink the window after rejections and pause drafting after failed drafts"})
    backoff: int = field(default=4, metadata={"help": "speculative: greedy-only cycles after a failed draft"})
    max_backoff: int = field(default=64, metadata={"help": "speculative: longest pause (the pause doubles)"})
    relaxed_topk: int = field(default=0, metadata={
        "help": "speculative, NOT lossless: also accept a draft token within the AR's top-k (0 = exact)"})
    relaxed_margin: float = field(default=0.0, metadata={
        "help": "speculative, NOT lossless: ... and within this log-prob of the AR's best"})
    tie_margin: float | None = field(default=None, metadata={
        "help": "speculative: log-prob margin a token needs to be certified without an exact replay "
                "(None: 1e-4 in float32, 1e-9 in float64, 0.1 in bfloat16/float16)"})

    def __post_init__(self):
        c = "SpecConfig"
        _check(c, "window", self.window, isinstance(self.window, int) and self.window >= 1, "an integer >= 1")
        _check(c, "max_len", self.max_len, isinstance(self.max_len, int) and self.max_len >= 1,
               "an integer >= 1 (generated tokens, </s> included)")
        _check(c, "min_len", self.min_len, isinstance(self.min_len, int) and 0 <= self.min_len <= self.max_len,
               f"an integer in [0, max_len = {self.max_len}]")
        _check(c, "no_repeat_ngram", self.no_repeat_ngram,
               isinstance(self.no_repeat_ngram, int) and self.no_repeat_ngram >= 0, "an integer >= 0 (0 = off)")
        _check(c, "draft_length", self.draft_length, self.draft_length in DRAFT_LENGTHS, f"one of {DRAFT_LENGTHS}")
        _check(c, "backoff", self.backoff, isinstance(self.backoff, int) and self.backoff >= 1, "an integer >= 1")
        _check(c, "max_backoff", self.max_backoff, isinstance(self.max_backoff, int) and self.max_backoff >= self.backoff,
               f"an integer >= backoff = {self.backoff}")
        _check(c, "relaxed_topk", self.relaxed_topk, isinstance(self.relaxed_topk, int) and self.relaxed_topk >= 0,
               "an integer >= 0 (0 = exact acceptance)")
        _check(c, "relaxed_margin", self.relaxed_margin, self.relaxed_margin >= 0 and math.isfinite(self.relaxed_margin),
               "a finite number >= 0")
        if self.tie_margin is not None:
            _check(c, "tie_margin", self.tie_margin, self.tie_margin >= 0 and not math.isnan(self.tie_margin),
                   "a number >= 0, or None for the dtype's default")

    @property
    def lossless(self) -> bool:
        return self.relaxed_topk == 0

    def margin_for(self, dtype: torch.dtype) -> float:
        if self.tie_margin is not None:
            return self.tie_margin
        return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 0.1)


class SpecGuard:
    """The adaptive guard's memory, kept across ``speculative_decode`` calls: exponential moving
    averages of the measured per-row ms of a draft pass, a verification and a greedy-like step, of
    the share of recent batch-1 sources whose first draft paid, and the back-off state (pause
    length, cycles left in it, probe window) of the last finished row. New rows draft at once
    while most recent first drafts paid; otherwise they start from that back-off state."""

    EMA = 0.3  # weight of the newest measurement

    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg
        self.ms: dict[str, float] = {}
        self.paid = 1.0  # share of recent sources whose first draft paid (optimistic start)
        self.pause, self.cool, self.probe = cfg.backoff, 0, cfg.window

    def start(self) -> tuple[int, int, int]:
        """(cool, pause, probe) for new rows."""
        if self.paid >= 0.5:
            return 0, self.cfg.backoff, self.cfg.window
        return self.cool, self.pause, self.probe

    def outcome(self, paid_share: float) -> None:
        self.paid = (1 - self.EMA) * self.paid + self.EMA * paid_share

    def observe(self, kind: str, seconds: float, rows: int) -> None:
        x = 1000.0 * seconds / max(rows, 1)
        old = self.ms.get(kind)
        self.ms[kind] = x if old is None else (1 - self.EMA) * old + self.EMA * x

    def min_accept(self) -> int:
        """Accepted tokens a fresh draft needs to have paid for itself (2 until all costs are timed)."""
        g, d, v = (self.ms.get(k) for k in ("lean", "draft", "verify"))
        if not (g and d and v):
            return 2
        return max(2, math.ceil((d + v) / g - 1 - 1e-9))

    def state(self) -> dict:
        return {"guard_min_accept": self.min_accept(), "guard_paid_share": self.paid,
                **{f"guard_{k}_ms_per_row": v for k, v in self.ms.items()}}


class _Verifier:
    """AR query-stream passes over several new content tokens per row, on a padded per-row cache of
    content keys/values (row r holds positions ``0..L_r - 1``)."""

    def __init__(self, model: JanusBart, cross: list, cross_mask: torch.Tensor, rows: int, capacity: int):
        self.model = model
        self.cross, self.cross_mask = cross, cross_mask
        H = model.config.decoder_attention_heads
        k0 = cross[0][0]
        shape = (rows, H, capacity, model.config.d_model // H)
        self.k = [k0.new_zeros(shape) for _ in cross]
        self.v = [k0.new_zeros(shape) for _ in cross]

    def keep(self, index: torch.Tensor) -> None:
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        self.cross_mask = self.cross_mask.index_select(0, index)

    def run(self, content: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """``content`` [R, W+1] at positions ``L..L+W``; returns the last-layer states [R, W+1, D] of
        the queries at ``L+1..L+W+1`` (query i sees content positions <= L + i)."""
        m = self.model
        R, n = content.shape
        H = m.config.decoder_attention_heads
        dev = content.device
        offs = torch.arange(n, device=dev)
        thr = L[:, None] + offs  # content slot i sits at position L + i; query i sees keys <= L + i
        limit = m.config.max_position_embeddings - 1
        tokens = torch.cat([content, torch.full_like(content, m.mask_token_id)], 1)
        positions = torch.cat([thr, thr + 1], 1).clamp(max=limit)  # clamped slots are padding only
        keys = int(L.max()) + n
        if R == 1 and n == 1:  # every key is visible: no mask (the plain greedy step)
            mask = None
        else:
            both = torch.cat([thr, thr], 1)
            mask = (torch.arange(keys, device=dev)[None, None, :] <= both[:, :, None]).unsqueeze(1)
        write = thr[:, None, :, None].expand(R, H, n, self.k[0].shape[-1])
        h = m.embed_decoder(tokens, positions)
        layers = m.model.decoder.layers
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            sa = layer.self_attn
            src = h[:, :n]
            self.k[i].scatter_(2, write, _heads(sa.k_proj(src), H))
            self.v[i].scatter_(2, write, _heads(sa.v_proj(src), H))
            x = h[:, n:] if last else h  # the last layer's content rows are never needed
            a = F.scaled_dot_product_attention(_heads(sa.q_proj(x), H), self.k[i][:, :, :keys],
                                               self.v[i][:, :, :keys],
                                               attn_mask=mask[:, :, n:] if last and mask is not None else mask,
                                               scale=sa.scaling)
            x = layer.self_attn_layer_norm(x + sa.out_proj(_merge(a)))
            ca = layer.encoder_attn
            a = F.scaled_dot_product_attention(_heads(ca.q_proj(x), H), *self.cross[i], attn_mask=self.cross_mask,
                                               scale=ca.scaling)
            x = layer.encoder_attn_layer_norm(x + ca.out_proj(_merge(a)))
            h = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
        return h


def _ban_ngrams_windowed(lp: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
    """``_ban_repeated_ngrams`` at every verified slot at once: slot (r, i) has the ``t[r, i]`` tokens
    ``seq[r, :t[r, i]]`` before it. lp [R, S, V], seq [R, T], t [R, S]."""
    if n <= 0:
        return lp
    R, S, V = lp.shape
    T = seq.shape[1]
    if n == 1:  # every token already generated is banned
        seen = torch.arange(T, device=seq.device)[None, None, :] < t[:, :, None]  # [R, S, T]
        banned = torch.where(seen, seq[:, None, :], V)
    else:
        if T < n:
            return lp
        grams = seq.unfold(1, n, 1)  # [R, G, n]: grams[r, g] = seq[r, g:g+n]
        G = grams.shape[1]
        sidx = (t[:, :, None] - n + 1 + torch.arange(n - 1, device=seq.device)).clamp(min=0)  # [R, S, n-1]
        suffix = seq.gather(1, sidx.view(R, -1)).view(R, S, n - 1)
        hit = (grams[:, None, :, :-1] == suffix[:, :, None, :]).all(-1)  # [R, S, G]
        complete = torch.arange(G, device=seq.device)[None, None, :] <= (t[:, :, None] - n)  # gram ends before t
        hit &= complete & (t[:, :, None] >= n)
        banned = torch.where(hit, grams[:, None, :, -1].expand(R, S, G), V)
    padded = torch.cat([lp, lp.new_zeros(R, S, 1)], 2).scatter(2, banned, float("-inf"))
    return padded[..., :V]


def _bans(lp: torch.Tensor, t: torch.Tensor, seq: torch.Tensor, cfg: SpecConfig, not_eos: torch.Tensor,
          ids: tuple[int, int, int]) -> torch.Tensor:
    """Beam search's bans on [R, S, V] log-probs of the slots ``t`` [R, S] (``seq``: the tokens
    before them): never <pad>/<mask>, </s> only from ``min_len`` on and alone at ``max_len``,
    no repeated n-gram. -inf entries only; every other value is left bit-identical."""
    pad, mask_id, eos = ids
    lp[..., [pad, mask_id]] = float("-inf")
    if cfg.min_len > 1:
        lp[..., eos] = lp[..., eos].masked_fill(t + 1 < cfg.min_len, float("-inf"))
    lp = lp.masked_fill((t == cfg.max_len - 1)[..., None] & not_eos, float("-inf"))  # the last slot closes
    return _ban_ngrams_windowed(lp, seq, t, cfg.no_repeat_ngram)


def _certified(lp: torch.Tensor, best_lp: torch.Tensor, best: torch.Tensor, score: torch.Tensor,
               tau: float) -> torch.Tensor:
    """Whether greedy (top of fl(score + log p) in float32, computed incrementally) surely picks
    ``best``: its log-prob lead over the runner-up exceeds tau (which bounds the one-pass vs
    incremental discrepancy twice over) plus 2 ulps of |score| + |log p| (so that rounding the
    score addition cannot make it tie). A slot with a single finite choice (a forced </s>) is certain."""
    eps = torch.finfo(torch.float32).eps
    second = lp.scatter(-1, best[..., None], float("-inf")).max(-1).values
    lead = best_lp - second
    return (lead > tau + 2 * eps * (score.abs() + best_lp.abs())) | (torch.isinf(second) & torch.isfinite(best_lp))


class _Replay:
    """Exact greedy arithmetic for one source: ``beam_search(beam=1)`` on that source alone,
    teacher-forced through committed tokens; resolves near-ties."""

    def __init__(self, model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = input_ids[attention_mask.bool()][None]
        am = torch.ones_like(x)
        self.model = model
        self.stepper = ARStepper(model, model.encode(x, am), am, copies=1)
        self.steps = 0
        self.score = torch.zeros(1, device=x.device)
        self.prev = torch.full((1,), model.config.decoder_start_token_id, dtype=torch.long, device=x.device)
        self.disagreements = 0  # committed tokens greedy would not have chosen (must stay 0)

    def token_at(self, t: int, seq: torch.Tensor, cfg: SpecConfig) -> tuple[int, torch.Tensor]:
        """Greedy's token at slot ``t`` given the committed ``seq[:t]`` (a 1-D tensor) and its score."""
        eos = self.model.config.eos_token_id
        while True:
            k = self.steps
            logp = step_bans(_never_special(self.stepper.step(self.prev), self.model), k, seq[None, :k], cfg.max_len,
                             cfg.min_len, cfg.no_repeat_ngram, eos)
            cand = self.score.view(1, 1) + logp
            top = cand.topk(2, dim=1).indices[0, 0]
            tok = top if k == t else seq[k]
            if k < t and int(tok) != int(top):
                self.disagreements += 1
            self.score = cand[0, tok].view(1)
            self.prev = tok.view(1)
            self.steps += 1
            if k == t:
                return int(tok), self.score.clone()


@torch.no_grad()
def _draft(model: JanusBart, toks: torch.Tensor, L: torch.Tensor, N: torch.Tensor, cross: list,
           cross_mask: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One NAR pass per row over ``[toks[:L] | <mask> x (N - L)]``: (draft [R, D], draft lengths [R])
    for the first ``most`` masked slots."""
    mask_id, pad, eos = model.mask_token_id, model.config.pad_token_id, model.config.eos_token_id
    dev = toks.device
    width = int(N.max())
    D = min(int((N - L).max()), most)
    ar = torch.arange(width, device=dev)
    valid = ar < N[:, None]
    tokens = torch.where(ar < L[:, None], toks[:, :width], mask_id).masked_fill(~valid, pad)
    positions = (ar + 1).expand(len(L), width)
    slots = (L[:, None] + torch.arange(D, device=dev)).clamp(max=width - 1)
    self_mask = _bidirectional_mask(valid)
    last_mask = self_mask.gather(2, slots[:, None, :, None].expand(-1, 1, -1, width))
    h = model.decoder_layers(model.embed_decoder(tokens, positions), self_mask, cross, cross_mask,
                             last_rows=slots, last_mask=last_mask, interleaved=True)
    logits = model.logits(h).float()
    logits[..., [pad, mask_id]] = float("-inf")
    draft = logits.argmax(-1)
    n = (N - L).clamp(max=D)
    is_eos = (draft == eos) & (torch.arange(D, device=dev) < n[:, None])
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, n)  # cut after the first </s>
    return draft, torch.minimum(n, first)


@torch.no_grad()
def tf32_in_force(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float32 matmuls of a model of ``dtype`` on ``device`` may run in TF32 now (CUDA only;
    ``janus.flops.fp32_matmul_kind``)."""
    return torch.device(device).type == "cuda" and dtype == torch.float32 and fp32_matmul_kind() == "tf32"


@contextlib.contextmanager
def full_fp32_matmuls(on: bool):
    """Inside: float32 matmuls and convolutions at full precision (TF32 off), restored on exit."""
    if not on:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]


def speculative_decode(model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       cfg: SpecConfig, **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Greedy AR output by NAR drafting + one-pass AR verification (``_speculative_decode``).

    **TF32.** Exactness rests on the verifier's multi-row passes and greedy's one-row steps agreeing
    to well under ``tie_margin`` (1e-4 in float32; measured up to ~3e-6 at full fp32 precision). With
    TF32 matmuls they differ by ~1e-3 and "identical to greedy" would silently stop holding, so when
    TF32 is in force for a float32 model on CUDA (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision("high"/"medium")``) the decode runs with it switched off
    and the settings are restored afterwards; the output is then greedy's at full fp32 precision,
    and ``stats["tf32_switched_off"]`` says so. bf16/fp16 models use their own, wider margin."""
    dtype = next(model.parameters()).dtype
    switch = tf32_in_force(input_ids.device, dtype)
    with full_fp32_matmuls(switch):
        tokens, lp, stats = _speculative_decode(model, input_ids, attention_mask, cfg, **kw)
    stats["tf32_switched_off"] = switch
    return tokens, lp, stats


def _speculative_decode(model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        cfg: SpecConfig, *, profile: bool = False, drafter=None,
                        guard: SpecGuard | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Greedy AR output by NAR drafting + one-pass AR verification.

    ``profile``: also time the parts (``ms_encoder``, ``ms_draft``, ``ms_verify`` (pass + acceptance
    + bookkeeping), ``ms_replay``, ``ms_total``; synchronising CUDA at each boundary). ``drafter``
    replaces the NAR drafting function (same signature as ``_draft``; benchmarks of the guard).
    ``guard``: a ``SpecGuard`` to learn from and update (pass the same one to the calls over one
    file); None starts from nothing.

    Returns (tokens [B, max_len] padded with pad, mean token log-prob [B], stats). ``stats``:
    ``tokens`` (generated, </s> included), ``draft_passes`` / ``verify_passes`` (decoder calls),
    ``row_passes`` (decoder passes summed over sources), ``passes_per_token`` (row passes per
    generated token; greedy: 1), ``verifications`` (row verifications), ``tokens_per_verification``
    (committed tokens per row verification), ``accepted_per_verification`` (accepted draft tokens per
    row verification that checked a draft), ``single_verification_share`` (sources finished by one
    verification), ``replays`` / ``replay_steps`` (near-ties resolved exactly, incremental steps they
    took), ``lossless``.
    """
    run = _Decode(model, input_ids, attention_mask, cfg, profile, drafter, guard)
    s, st, guard = run.rows, run.st, run.guard
    max_len, eos = cfg.max_len, model.config.eos_token_id
    while len(s.idx):
        R = len(s.idx)
        run.clock.lap("ms_encoder" if run.clock.first else "ms_verify")
        # Guard timings are read where the loop synchronises anyway (the .any()/.max() reads).
        t_top, run.replayed = time.perf_counter(), False
        # 1. Draft the rows that have no usable draft and are not pausing.
        drafted_rows = run.draft_phase()
        # 2. Verify: w draft tokens per row in one AR pass.
        w = torch.minimum(torch.minimum(s.win, s.dlen), max_len - 1 - s.L).clamp(min=0)
        W = int(w.max())
        t_verify = time.perf_counter()
        if drafted_rows and R == 1:
            guard.observe("draft", t_verify - t_top, 1)
        st["verify_passes"] += 1
        st["row_passes"] += R
        st["verifications"] += R
        s.verifications += 1
        if W == 0:  # no row holds a draft: a greedy-like step (one content token, one query)
            run.greedy_step()
        else:
            run.verify_window(w, W, drafted_rows)
        done = (s.last == eos) | (s.L >= max_len)
        any_done = bool(done.any())
        if cfg.adaptive and not run.replayed and R == 1:
            guard.observe("verify" if W else "lean", time.perf_counter() - t_verify, 1)
        if any_done:
            run.finish_rows(done)
    return run.result()


@dataclass
class _Rows:
    """Row state of the rows still decoding (compacted as rows finish)."""

    idx: torch.Tensor  # [R] the source (batch index) of each row
    toks: torch.Tensor  # [R, width] committed tokens, then pad
    L: torch.Tensor  # [R] committed tokens
    last: torch.Tensor  # [R] the last committed token (the decoder start before any)
    score: torch.Tensor  # [R] float32 sum of the committed tokens' log-probs
    draft: torch.Tensor  # [R, width]: draft[r, j] is for slot L + j
    dlen: torch.Tensor  # [R] usable draft tokens
    fresh: torch.Tensor  # [R] the draft was made this cycle
    win: torch.Tensor  # [R] most draft tokens verified
    cool: torch.Tensor  # [R] cycles left in the drafting pause
    pause: torch.Tensor  # [R] length of the next pause
    probe: torch.Tensor  # [R] window of the next fresh draft
    verifications: torch.Tensor  # [R] verifications so far

    @classmethod
    def start(cls, B: int, width: int, window: int, start_token: int, pad: int, guard_start: tuple[int, int, int],
              dev: torch.device) -> _Rows:
        cool0, pause0, probe0 = guard_start
        return cls(idx=torch.arange(B, device=dev),
                   toks=torch.full((B, width), pad, dtype=torch.long, device=dev),
                   L=torch.zeros(B, dtype=torch.long, device=dev),
                   last=torch.full((B,), start_token, dtype=torch.long, device=dev),
                   score=torch.zeros(B, device=dev),
                   draft=torch.full((B, width), pad, dtype=torch.long, device=dev),
                   dlen=torch.zeros(B, dtype=torch.long, device=dev),
                   fresh=torch.zeros(B, dtype=torch.bool, device=dev),
                   win=torch.full((B,), window, dtype=torch.long, device=dev),
                   cool=torch.full((B,), cool0, dtype=torch.long, device=dev),
                   pause=torch.full((B,), pause0, dtype=torch.long, device=dev),
                   probe=torch.full((B,), probe0, dtype=torch.long, device=dev),
                   verifications=torch.zeros(B, dtype=torch.long, device=dev))

    def keep(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (in that order) of every field."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[index])


class _Decode:
    """One ``_speculative_decode`` call: the encoder pass, the verifier, the row state, the statistics
    and a method per phase of a cycle."""

    def __init__(self, model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SpecConfig,
                 profile: bool, drafter, guard: SpecGuard | None):
        B, dev = input_ids.shape[0], input_ids.device
        pad, eos, mask_id = model.config.pad_token_id, model.config.eos_token_id, model.mask_token_id
        max_len, window = cfg.max_len, cfg.window
        if max_len >= model.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} needs decoder positions up to {max_len}, but the model has "
                             f"{model.config.max_position_embeddings}")
        self.model, self.input_ids, self.attention_mask, self.cfg = model, input_ids, attention_mask, cfg
        self.B, self.dev, self.ids = B, dev, (pad, mask_id, eos)
        self.draft_fn = drafter or _draft
        self.clock = _Clock(profile, dev)
        enc = model.encode(input_ids, attention_mask)
        cross = model.cross_kv(enc)
        cross_mask = model.cross_mask(attention_mask)
        self.use_head = cfg.draft_length == "head" and model.length_head is not None
        self.len_logits = model.length_logits(enc, attention_mask).float() if self.use_head else None
        self.tau = cfg.margin_for(enc.dtype)
        self.verifier = _Verifier(model, cross, cross_mask, B, max_len + window + 2)
        self.width = width = max_len + window + 1
        self.out = torch.full((B, max_len), pad, dtype=torch.long, device=dev)
        self.out_score = torch.zeros(B, device=dev)
        self.guard = guard if guard is not None else SpecGuard(cfg)
        # What the guard learnt carries over between batch-1 calls only (see the module docstring).
        guard_start = self.guard.start() if cfg.adaptive and B == 1 else (0, cfg.backoff, window)
        self.rows = _Rows.start(B, width, window, model.config.decoder_start_token_id, pad, guard_start, dev)
        self.first_judged = False  # batch 1: the source's first draft was judged (SpecGuard.outcome)
        self.replayed = False  # this cycle resolved a near-tie by exact replay (its timing is not the guard's)
        self.replays: dict[int, _Replay] = {}
        self.st = {"sources": B, "tokens": 0, "draft_passes": 0, "verify_passes": 0, "row_passes": 0,
                   "verifications": 0, "drafted_verifications": 0, "accepted": 0, "replays": 0, "replay_steps": 0,
                   "single_verification": 0}
        self.ar_slots = torch.arange(width, device=dev)
        self.not_eos = torch.arange(model.config.vocab_size, device=dev) != eos
        self.n_drafted = self.n_accepted = torch.zeros((), dtype=torch.long, device=dev)

    def draft_phase(self) -> int:
        """1. Draft the rows that have no usable draft and are not pausing; returns how many drafted."""
        s, st = self.rows, self.st
        need = (s.dlen == 0) & (s.cool == 0) & (s.L < self.cfg.max_len - 1)
        if not bool(need.any()):
            return 0
        rows = need.nonzero().squeeze(1)
        sub_L = s.L[rows]
        N = self.draft_lengths(rows, sub_L)
        verifier, all_rows = self.verifier, len(rows) == len(s.idx)
        sub_cross = verifier.cross if all_rows else [(k[rows], v[rows]) for k, v in verifier.cross]
        sub_mask = verifier.cross_mask if all_rows else verifier.cross_mask[rows]
        new, new_len = self.draft_fn(self.model, s.toks[rows], sub_L, N, sub_cross, sub_mask, int(s.probe[rows].max()))
        s.draft[rows] = self.ids[0]
        s.draft[rows, :new.shape[1]] = new
        s.dlen[rows] = new_len
        s.fresh[rows] = True
        s.win[rows] = s.probe[rows]
        st["draft_passes"] += 1
        st["row_passes"] += len(rows)
        self.clock.lap("ms_draft")
        return len(rows)

    def draft_lengths(self, rows: torch.Tensor, sub_L: torch.Tensor) -> torch.Tensor:
        """Canvas length N of the drafting ``rows`` (prefixes ``sub_L``): see ``draft_length``."""
        max_len, window = self.cfg.max_len, self.cfg.window
        if not self.use_head:
            return torch.clamp(sub_L + window, max=max_len)
        n_cls = self.len_logits.shape[1]
        lengths = torch.arange(n_cls, device=self.dev)
        allowed = (lengths >= torch.clamp(sub_L + 1, min=2)[:, None]) & (lengths <= max_len)
        ll = self.len_logits[rows].masked_fill(~allowed, float("-inf"))
        return torch.where(allowed.any(1), ll.argmax(1), torch.clamp(sub_L + window, max=max_len))

    def greedy_step(self) -> None:
        """W == 0, the lean path: one content token and one query per row, greedy's next token."""
        s, cfg = self.rows, self.cfg
        h = self.verifier.run(s.last[:, None], s.L)[:, 0]
        lp = torch.log_softmax(self.model.logits(h).float(), dim=-1)  # [R, V]
        lp = _bans(lp[:, None], s.L[:, None], s.toks, cfg, self.not_eos, self.ids)[:, 0]
        best_lp, nxt = lp.max(-1)
        cert = _certified(lp, best_lp, nxt, s.score, self.tau)
        new_score = s.score + best_lp
        if not bool(cert.all()):
            self.clock.lap("ms_verify")
            self.resolve((~cert).nonzero().squeeze(1), s.L, s.toks, nxt, new_score)
            self.clock.lap("ms_replay")
        s.toks.scatter_(1, s.L[:, None], nxt[:, None])
        s.last, s.L, s.score = nxt, s.L + 1, new_score
        if cfg.adaptive:
            s.cool = (s.cool - 1).clamp(min=0)

    def verify_window(self, w: torch.Tensor, W: int, drafted_rows: int) -> None:
        """W > 0: one AR pass over each row's last token and its first ``w`` draft tokens; accept the
        longest agreeing draft prefix, commit it and the AR's token, move the draft on."""
        s, cfg, dev = self.rows, self.cfg, self.dev
        pad, eos = self.ids[0], self.ids[2]
        R = len(s.idx)
        content = torch.cat([s.last[:, None], s.draft[:, :W]], 1)
        lp = torch.log_softmax(self.model.logits(self.verifier.run(content, s.L)).float(), dim=-1)  # [R, W+1, V]
        t = s.L[:, None] + torch.arange(W + 1, device=dev)  # output slot of each query
        seq = s.toks.scatter(1, t[:, :W], s.draft[:, :W]) if cfg.no_repeat_ngram else s.toks
        lp = _bans(lp, t, seq, cfg, self.not_eos, self.ids)
        d = content[:, 1:]
        acc, acc_eos, nxt, nxt_ok, new_score = _accept(lp, d, w, s.score, cfg, self.tau, eos)
        j = torch.arange(W + 1, device=dev)
        if not bool(nxt_ok.all()):  # near-ties: greedy's own arithmetic decides (rare path)
            self.clock.lap("ms_verify")
            committed = s.toks.scatter(1, t[:, :W], torch.where(j[None, :W] < acc[:, None], d, pad))
            self.resolve((~nxt_ok).nonzero().squeeze(1), s.L + acc, committed, nxt, new_score)
            self.clock.lap("ms_replay")
        # 3. Commit ``acc`` draft tokens and (unless the draft closed with </s>) the AR's token.
        n_commit = acc + (~acc_eos).long()
        commit = torch.where(j[None] < acc[:, None], torch.cat([d, d.new_full((R, 1), pad)], 1), nxt[:, None])
        s.toks = s.toks.scatter(1, t, torch.where(j[None] < n_commit[:, None], commit, s.toks.gather(1, t)))
        s.last = commit.gather(1, (n_commit - 1)[:, None]).squeeze(1)
        s.L = s.L + n_commit
        s.score = new_score
        had = w > 0
        self.n_drafted = self.n_drafted + had.sum()
        self.n_accepted = self.n_accepted + acc.sum()
        # The draft moves on by what was committed; it goes stale where the AR disagreed.
        s.dlen = (s.dlen - n_commit).clamp(min=0)
        shift = (self.ar_slots[None] + n_commit[:, None]).clamp(max=self.width - 1)
        s.draft = s.draft.gather(1, shift).masked_fill(self.ar_slots[None] >= s.dlen[:, None], pad)
        failed = had & (acc == 0)
        s.dlen = s.dlen.masked_fill(failed, 0)
        if cfg.adaptive:
            self.adapt(had, acc, w, drafted_rows)
        s.fresh = torch.zeros_like(s.fresh)

    def adapt(self, had: torch.Tensor, acc: torch.Tensor, w: torch.Tensor, drafted_rows: int) -> None:
        """The adaptive guard after a verification: the next window, and the back-off after a fresh
        draft that did not pay (``had``: rows that verified a draft, ``acc`` of their ``w`` accepted)."""
        s, cfg, window = self.rows, self.cfg, self.cfg.window
        full = had & (acc == w)
        s.win = torch.where(full, s.win, torch.where(had, (2 * acc).clamp(min=1, max=window), s.win))
        min_accept = self.guard.min_accept() if len(s.idx) == 1 else 2
        fresh_fail = had & s.fresh & (acc < min_accept)  # saved less than it cost
        if drafted_rows and self.B == 1 and not self.first_judged and bool(had[0]):
            # Only a source's first draft informs how the next source starts: later ones
            # (often short drafts at the tail of an output) say little about it.
            self.guard.outcome(0.0 if bool(fresh_fail[0]) else 1.0)
            self.first_judged = True
        s.cool = torch.where(fresh_fail, s.pause, torch.where(had, s.cool, (s.cool - 1).clamp(min=0)))
        s.pause = torch.where(fresh_fail, (2 * s.pause).clamp(max=cfg.max_backoff),
                              torch.where(had & s.fresh, cfg.backoff, s.pause))
        s.probe = torch.where(fresh_fail, (s.probe // 4).clamp(min=2), torch.where(had & s.fresh, window, s.probe))

    def resolve(self, rows: torch.Tensor, slot: torch.Tensor, committed: torch.Tensor, nxt: torch.Tensor,
                new_score: torch.Tensor) -> None:
        """Greedy's own token (and score) at ``slot`` for the uncertified ``rows``, by exact replay."""
        self.replayed = True
        for r in rows.tolist():
            b = int(self.rows.idx[r])
            rep = self.replays.get(b)
            if rep is None:
                rep = self.replays[b] = _Replay(self.model, self.input_ids[b], self.attention_mask[b])
            before = rep.steps
            tok, s = rep.token_at(int(slot[r]), committed[r], self.cfg)
            self.st["replays"] += 1
            self.st["replay_steps"] += rep.steps - before
            nxt[r] = tok
            new_score[r] = s[0]

    def finish_rows(self, done: torch.Tensor) -> None:
        """The rows that are ``done``: their outputs and statistics; the others are kept."""
        s, st, max_len = self.rows, self.st, self.cfg.max_len
        fin = done.nonzero().squeeze(1)
        if self.cfg.adaptive and self.B == 1:  # the next call's row may start from this back-off state
            f0 = int(fin[0])
            self.guard.pause, self.guard.cool, self.guard.probe = int(s.pause[f0]), int(s.cool[f0]), int(s.probe[f0])
        self.out[s.idx[fin]] = s.toks[fin, :max_len]
        self.out_score[s.idx[fin]] = s.score[fin] / s.L[fin].float()
        st["tokens"] += int(s.L[fin].sum())
        st["single_verification"] += int((s.verifications[fin] == 1).sum())
        keep = (~done).nonzero().squeeze(1)
        s.keep(keep)
        if len(keep):
            self.verifier.keep(keep)
            if self.len_logits is not None:
                self.len_logits = self.len_logits[keep]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(tokens, mean token log-prob, stats) once every row has finished."""
        st, cfg = self.st, self.cfg
        self.clock.lap("ms_verify")
        st.update(self.clock.times, drafted_verifications=int(self.n_drafted), accepted=int(self.n_accepted))
        st.update(lossless=cfg.lossless, replay_disagreements=sum(r.disagreements for r in self.replays.values()))
        return self.out, self.out_score, {**combine_stats([st]), **(self.guard.state() if cfg.adaptive else {})}


def _accept(lp: torch.Tensor, d: torch.Tensor, w: torch.Tensor, score: torch.Tensor, cfg: SpecConfig, tau: float,
            eos: int) -> tuple[torch.Tensor, ...]:
    """Acceptance of the drafts ``d`` [R, W] (``w`` [R] of them verified) given the banned log-probs
    ``lp`` [R, W+1, V] of the verified slots: (accepted draft tokens ``acc``, whether the last
    accepted one is </s>, the AR's token after them, whether it is certified, the score after it)."""
    W = d.shape[1]
    d_lp = lp[:, :W].gather(-1, d[..., None]).squeeze(-1)  # [R, W]
    sums = [score]
    for i in range(W):  # float32 sums in greedy's order: score after slot i
        sums.append(sums[-1] + d_lp[:, i])
    S = torch.stack(sums, 1)  # [R, W+1]: score before each slot if the drafts before it are taken
    best_lp, ar_tok = lp.max(-1)
    cert = _certified(lp, best_lp, ar_tok, S, tau)
    ok = (ar_tok[:, :W] == d) & cert[:, :W]
    if cfg.relaxed_topk:
        better = (lp[:, :W] > d_lp[..., None]).sum(-1)
        ok |= (better < cfg.relaxed_topk) & (d_lp >= best_lp[:, :W] - cfg.relaxed_margin) & torch.isfinite(d_lp)
    ok &= torch.arange(W, device=d.device) < w[:, None]
    acc = ok.long().cumprod(1).sum(1)  # accepted draft tokens per row
    acc_eos = (acc > 0) & (d.gather(1, (acc - 1).clamp(min=0)[:, None]).squeeze(1) == eos)
    nxt = ar_tok.gather(1, acc[:, None]).squeeze(1)
    nxt_ok = cert.gather(1, acc[:, None]).squeeze(1) | acc_eos
    new_score = S.gather(1, acc[:, None]).squeeze(1)  # the score after the accepted drafts, + the AR token's
    new_score = torch.where(acc_eos, new_score, new_score + best_lp.gather(1, acc[:, None]).squeeze(1))
    return acc, acc_eos, nxt, nxt_ok, new_score


class _Clock:
    """Optional wall-clock split of a decode into named parts (CUDA synchronised at each lap)."""

    def __init__(self, on: bool, device: torch.device):
        self.on, self.device, self.first = on, device, True
        self.times: dict[str, float] = {}
        if on:
            self._sync()
            self.t0 = self.t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self.first = False
        if not self.on:
            return
        self._sync()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + 1000 * (now - self.t)
        self.times["ms_total"] = 1000 * (now - self.t0)
        self.t = now


_TIMES = ("ms_encoder", "ms_draft", "ms_verify", "ms_replay", "ms_total")
_COUNTS = ("sources", "tokens", "draft_passes", "verify_passes", "row_passes", "verifications", "drafted_verifications",
           "accepted", "replays", "replay_steps", "single_verification", "replay_disagreements")


def combine_stats(parts: list[dict]) -> dict:
    """The statistics of several ``speculative_decode`` calls (e.g. the batches of a file) as one."""
    total = {k: sum(p[k] for p in parts) for k in _COUNTS}
    for k in _TIMES:
        if any(k in p for p in parts):
            total[k] = sum(p.get(k, 0.0) for p in parts)
    tokens = max(total["tokens"], 1)
    total.update(passes_per_token=total["row_passes"] / tokens,
                 tokens_per_verification=total["tokens"] / max(total["verifications"], 1),
                 accepted_per_verification=total["accepted"] / max(total["drafted_verifications"], 1),
                 single_verification_share=total["single_verification"] / max(total["sources"], 1),
                 lossless=all(p["lossless"] for p in parts))
    if any("tf32_switched_off" in p for p in parts):
        total["tf32_switched_off"] = any(p.get("tf32_switched_off", False) for p in parts)
    return total
