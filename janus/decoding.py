"""Decoding with a JanusBart: AR beam search on the query stream, and NAR mask-predict.

AR: each step feeds two tokens per hypothesis: the newest content token (``start`` at
position 0, then the previous output ``y_{t-1}`` at position ``t``) and a query ``<mask>`` at
position ``t + 1`` that predicts ``y_t``. Both attend the cached content keys/values of every
layer (queries are never keys), so incremental decoding computes exactly what the training-time
AR pattern computes on the same prefix. The cross-attention keys/values of the encoder output
are computed once per source and reused by every step and beam.

NAR mask-predict: ``iterations = T`` means **T refinement passes after the first, T + 1
decoder passes in all** (T = 0: a single parallel pass; fairseq's ``max_iter`` counts the
same way). The first pass predicts every slot of an all-``<mask>`` target; after pass ``t``
of ``P = T + 1`` the ``floor(N * (P - t) / P)`` lowest-probability tokens are re-masked and
only those slots are re-predicted (the others keep token and probability). Every length
candidate of every source is decoded in one batch; the candidate with the highest mean token
log-probability wins. Optional pruning (``prune_after = k``): after pass k only the candidates
within ``prune_margin`` of their source's best mean log-prob go on (margin 0: the best only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from janus.model import JanusBart


def _check(cls: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name} = {value!r}: must be {allowed}")


@dataclass
class BeamConfig:
    beam: int = field(default=5, metadata={"help": "AR: beam size (1 = greedy)"})
    max_len: int = field(default=64, metadata={"help": "longest output in generated tokens, <s> and </s> included"})
    min_len: int = field(default=1, metadata={"help": "AR: </s> is banned before this many generated tokens"})
    length_penalty: float = field(default=1.0, metadata={"help": "AR: score = sum log p / len ** length_penalty"})
    no_repeat_ngram: int = field(default=0, metadata={"help": "AR: ban repeating any n-gram of this size (0 = off)"})

    def __post_init__(self):
        c = "BeamConfig"
        _check(c, "beam", self.beam, isinstance(self.beam, int) and self.beam >= 1, "an integer >= 1 (1 = greedy)")
        _check(c, "max_len", self.max_len, isinstance(self.max_len, int) and self.max_len >= 1,
               "an integer >= 1 (generated tokens, </s> included)")
        _check(c, "min_len", self.min_len, isinstance(self.min_len, int) and 0 <= self.min_len <= self.max_len,
               f"an integer in [0, max_len = {self.max_len}]")
        _check(c, "length_penalty", self.length_penalty, math.isfinite(self.length_penalty), "a finite number")
        _check(c, "no_repeat_ngram", self.no_repeat_ngram,
               isinstance(self.no_repeat_ngram, int) and self.no_repeat_ngram >= 0, "an integer >= 0 (0 = off)")


@dataclass
class MaskPredictConfig:
    iterations: int = field(default=0, metadata={
        "help": "NAR: refinement passes after the first parallel pass (T); T + 1 decoder passes in all"})
    length_candidates: int = field(default=5, metadata={"help": "NAR: target lengths decoded per source"})
    length_offsets: bool = field(default=False, metadata={
        "help": "NAR: argmax length +- offsets (fairseq) instead of the top-k lengths"})
    max_len: int = field(default=64, metadata={"help": "longest output in tokens, <s> and </s> included"})
    prune_after: int = field(default=0, metadata={
        "help": "NAR: after this many passes keep only the best length candidates (0 = off)"})
    prune_margin: float = field(default=0.0, metadata={
        "help": "NAR with prune_after: also keep lengths whose mean log-prob is within this of the best"})

    def __post_init__(self):
        c = "MaskPredictConfig"
        _check(c, "iterations", self.iterations, isinstance(self.iterations, int) and self.iterations >= 0,
               "an integer >= 0 (refinement passes after the first; 0 = a single pass)")
        _check(c, "max_len", self.max_len, isinstance(self.max_len, int) and self.max_len >= 2,
               "an integer >= 2 (lengths count <s> and </s>)")
        _check(c, "length_candidates", self.length_candidates,
               isinstance(self.length_candidates, int) and 1 <= self.length_candidates <= self.max_len - 1,
               f"an integer in [1, max_len - 1 = {self.max_len - 1}] (the lengths 2..max_len)")
        _check(c, "prune_after", self.prune_after, isinstance(self.prune_after, int) and self.prune_after >= 0,
               "an integer >= 0 (0 = off)")
        _check(c, "prune_margin", self.prune_margin, self.prune_margin >= 0 and not math.isnan(self.prune_margin),
               "a number >= 0 (inf keeps every candidate)")


class ARStepper:
    """Incremental AR scoring: ``step(prev_tokens)`` -> log-probs of the next target token."""

    def __init__(self, model: JanusBart, encoder_out: torch.Tensor, attention_mask: torch.Tensor, copies: int = 1):
        self.model = model
        self.cross = model.cross_kv(encoder_out)  # shared by the ``copies`` rows of each source
        self.cross_mask = model.cross_mask(attention_mask)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.t = 0

    def step(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        R = prev_tokens.shape[0]
        tokens = torch.stack([prev_tokens, torch.full_like(prev_tokens, m.mask_token_id)], 1)
        positions = torch.tensor([self.t, self.t + 1], device=tokens.device).expand(R, 2)
        h = m.embed_decoder(tokens, positions)
        new_cache = []
        for i, layer in enumerate(m.model.decoder.layers):
            kv: list = []
            past = None if self.cache is None else self.cache[i]
            h = m._layer(layer, h, None, self.cross[i], self.cross_mask, past=past, kv_len=1, new_kv=kv,
                         interleaved=True)
            k, v = kv[0]
            new_cache.append((k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)))
        self.cache = new_cache
        self.t += 1
        return torch.log_softmax(m.logits(h[:, 1]).float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]


def _never_special(logp: torch.Tensor, model: JanusBart) -> torch.Tensor:
    """Generated text never contains <pad> or <mask>."""
    logp[:, [model.config.pad_token_id, model.mask_token_id]] = float("-inf")
    return logp


def _ban_repeated_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that would complete an n-gram already present in the hypothesis."""
    R, t = tokens.shape
    if n <= 0 or t < n - 1 or t == 0:
        return logp
    if n == 1:
        return logp.scatter(1, tokens, float("-inf"))
    if t < n:  # no complete n-gram yet
        return logp
    grams = tokens.unfold(1, n, 1)  # [R, t - n + 1, n]
    suffix = tokens[:, t - n + 1:]  # the last n - 1 tokens
    hit = (grams[:, :, :-1] == suffix[:, None, :]).all(-1)  # [R, G]
    banned = torch.where(hit, grams[:, :, -1], logp.shape[1])  # out-of-range id where no hit
    padded = torch.cat([logp, logp.new_zeros(R, 1)], 1).scatter(1, banned, float("-inf"))
    return padded[:, :-1]


def step_bans(logp: torch.Tensor, t: int, tokens: torch.Tensor, max_len: int, min_len: int, no_repeat_ngram: int,
              eos: int) -> torch.Tensor:
    """The length limits and n-gram bans of AR step ``t`` (0-based) on [R, V] log-probs, given the
    [R, t] tokens generated so far: </s> banned before ``min_len`` tokens, only </s> at the last
    slot, no repeated n-gram. Shared by beam search and the exact replay of speculative decoding."""
    if t + 1 < min_len:
        logp[:, eos] = float("-inf")
    if t == max_len - 1:  # the last slot can only close the hypothesis
        logp = torch.full_like(logp, float("-inf")).index_fill_(1, torch.tensor([eos], device=logp.device), 0.0) + logp
    return _ban_repeated_ngrams(logp, tokens, no_repeat_ngram)


@torch.no_grad()
def beam_search(model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cfg: BeamConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Best hypothesis per source: (tokens [B, max_len] padded with pad, normalised scores [B])."""
    B, K, V = input_ids.shape[0], cfg.beam, model.config.vocab_size
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    dev = input_ids.device
    stepper = ARStepper(model, model.encode(input_ids, attention_mask), attention_mask, copies=K)
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    prev = torch.full((B * K,), model.config.decoder_start_token_id, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, K), float("-inf"), device=dev)
    fin_tokens = torch.full((B, K, cfg.max_len), pad, dtype=torch.long, device=dev)
    batch_offset = (torch.arange(B, device=dev) * K)[:, None]
    for t in range(cfg.max_len):
        logp = step_bans(_never_special(stepper.step(prev), model), t, tokens, cfg.max_len, cfg.min_len,
                         cfg.no_repeat_ngram, eos)
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)
        beam_idx, tok = top_idx // V, top_idx % V
        prefix = tokens.view(B, K, t).gather(1, beam_idx[..., None].expand(-1, -1, t))
        # Hypotheses closed by EOS among the best K candidates join the finished pool.
        done = torch.isfinite(fin_scores[:, -1:])  # sources that already have K finished hypotheses
        is_eos = (tok == eos) & (torch.arange(2 * K, device=dev) < K) & torch.isfinite(top_scores) & ~done
        normed = torch.where(is_eos, top_scores / float(t + 1) ** cfg.length_penalty, float("-inf"))
        seqs = torch.cat([prefix, tok[..., None]], 2)
        seqs = torch.nn.functional.pad(seqs, (0, cfg.max_len - t - 1), value=pad)
        pool_scores = torch.cat([fin_scores, normed], 1)
        pool_tokens = torch.cat([fin_tokens, seqs], 1)
        fin_scores, keep = pool_scores.topk(K, dim=1)
        fin_tokens = pool_tokens.gather(1, keep[..., None].expand(-1, -1, cfg.max_len))
        # The best K open candidates continue.
        open_scores = torch.where(tok == eos, float("-inf"), top_scores)
        scores, sel = open_scores.topk(K, dim=1)
        chosen_beam, prev = beam_idx.gather(1, sel), tok.gather(1, sel).reshape(-1)
        tokens = torch.cat([prefix.gather(1, sel[..., None].expand(-1, -1, t)), prev.view(B, K, 1)], 2).view(B * K, -1)
        stepper.reorder((batch_offset + chosen_beam).reshape(-1))
        if bool(torch.isfinite(fin_scores[:, -1]).all()):  # every source has K finished hypotheses
            break
    return fin_tokens[:, 0], fin_scores[:, 0]


def _bidirectional_mask(valid: torch.Tensor) -> torch.Tensor:
    L = valid.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (valid[:, None, :] | (~valid[:, :, None] & eye)).unsqueeze(1)


@torch.no_grad()
def length_candidates(model: JanusBart, encoder_out: torch.Tensor, attention_mask: torch.Tensor,
                      cfg: MaskPredictConfig) -> torch.Tensor:
    """[B, C] candidate target lengths (>= 2: <s> and </s>) from the length head."""
    logits = model.length_logits(encoder_out, attention_mask).float()
    logits[:, :2] = float("-inf")
    logits[:, cfg.max_len + 1:] = float("-inf")
    C = cfg.length_candidates
    if cfg.length_offsets:
        best = logits.argmax(-1, keepdim=True)
        offsets = torch.arange(C, device=best.device) - (C - 1) // 2
        return (best + offsets).clamp(2, cfg.max_len)
    return logits.topk(C, dim=-1).indices


def remask_count(lengths: torch.Tensor, p: int, passes: int) -> torch.Tensor:
    """Tokens re-masked after pass ``p`` (0-based) of ``passes``: floor(N * (P - t) / P), t = p + 1."""
    return (lengths * (passes - p - 1)) // passes


def _predict_masked(model: JanusBart, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                    masked: torch.Tensor, cross: list, cross_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bidirectional decoder pass: the best token and its log-prob at each masked slot (row-major)."""
    n_masked = masked.sum(1)
    width = int(n_masked.max())
    if width == 0:
        empty = tokens.new_empty(0)
        return empty, empty.float()
    # The last layer runs only the masked slots as queries, padded to the most per row (every
    # slot still supplies keys/values); a stable sort keeps them in position order.
    slots = (~masked).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
    self_mask = _bidirectional_mask(valid)
    last_mask = self_mask.gather(2, slots[:, None, :, None].expand(-1, 1, -1, self_mask.shape[-1]))
    h = model.decoder_layers(model.embed_decoder(tokens, positions), self_mask, cross, cross_mask,
                             last_rows=slots, last_mask=last_mask, interleaved=True)
    h = h[torch.arange(width, device=h.device) < n_masked[:, None]]
    best_lp, best_tok = _never_special(torch.log_softmax(model.logits(h).float(), -1), model).max(-1)
    return best_tok, best_lp


@torch.no_grad()
def mask_predict(model: JanusBart, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: MaskPredictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, L] padded with pad, mean log-prob [B]) of each source's best candidate."""
    mask_id, pad = model.mask_token_id, model.config.pad_token_id
    enc = model.encode(input_ids, attention_mask)
    lengths = length_candidates(model, enc, attention_mask, cfg)  # [B, C]
    B, C = lengths.shape
    lengths = lengths.reshape(-1)
    L = int(lengths.max())
    dev = input_ids.device
    cross = model.cross_kv(enc)  # per source, shared by its C candidates
    cross_mask = model.cross_mask(attention_mask)
    rows = torch.arange(B * C, device=dev)  # which candidates are still decoded
    valid = torch.arange(L, device=dev) < lengths[:, None]
    tokens = torch.where(valid, mask_id, pad)
    logp = torch.zeros(B * C, L, device=dev)
    masked = valid.clone()
    positions = (torch.arange(L, device=dev) + 1).expand(B * C, L)
    alive = torch.ones(B, C, dtype=torch.bool, device=dev)  # candidates that may still win
    passes = cfg.iterations + 1
    for p in range(passes):
        m = masked[rows]
        best_tok, best_lp = _predict_masked(model, tokens[rows], positions[rows], valid[rows], m, cross, cross_mask)
        sub_tok, sub_lp = tokens[rows], logp[rows]
        sub_tok[m], sub_lp[m] = best_tok, best_lp
        tokens[rows], logp[rows] = sub_tok, sub_lp
        if p == passes - 1:
            break
        if cfg.prune_after and p + 1 == cfg.prune_after and C > 1:
            # Every source keeps the same number G of rows (the cross-attention keys/values are
            # shared per source): its G best; those beyond the margin are decoded but cannot win.
            mean = ((logp * valid).sum(1) / lengths).view(B, C)
            alive = mean >= mean.max(1, keepdim=True).values - cfg.prune_margin
            G = int(alive.sum(1).max())
            rows = (mean.argsort(dim=1, descending=True, stable=True)[:, :G]
                    + torch.arange(B, device=dev)[:, None] * C).reshape(-1)
        n = remask_count(lengths[rows], p, passes)
        key = logp[rows].masked_fill(~valid[rows], float("inf"))
        remask = key.argsort(1).argsort(1) < n[:, None]
        masked = torch.zeros_like(masked)
        masked[rows] = remask
        tokens[rows] = torch.where(remask, mask_id, tokens[rows])
    mean = ((logp * valid).sum(1) / lengths).view(B, C).masked_fill(~alive, float("-inf"))
    best = mean.argmax(1)
    pick = best + torch.arange(B, device=dev) * C
    return tokens[pick], mean.gather(1, best[:, None]).squeeze(1)
