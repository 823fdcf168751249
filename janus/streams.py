"""Vectorised construction of the JANUS decoder streams and their self-attention mask.

One decoder batch holds up to two "halves" stacked along the batch dimension:

* AR half (``B`` rows): ``[content (N) | query (N)]``. Content slot ``i`` holds the
  shift-right token (``start`` at slot 0, ``t_{i-1}`` after it); query slot ``i`` is a
  ``<mask>`` that predicts ``t_i``.
* NAR/AUX half (``B`` rows): ``[target with masks, in place (N) | true tokens (M) | queries (M)]``.
  The first block is the CMLM input (unmasked tokens kept, masked ones replaced by
  ``<mask>``); the true-token and query blocks hold the masked positions packed left to
  right (``M`` = most masked tokens of any sample). Attention does not depend on order
  once positions are explicit, so keeping the first block in place is equivalent to the
  paper's re-ordering and lets NAR outputs line up with ``labels`` for free.

Position convention ("true positions", identical to HF BART's decoder): with labels
``t_0..t_{N-1}``, the start token sits at position 0 and token ``t_i`` at position
``i + 1`` wherever it appears (content stream, NAR block, true-token block); every
``<mask>``/query that stands for ``t_i`` also sits at position ``i + 1``.

Every token gets three integer attributes (segment, order index ``k``, position); each
rule of docs/attention.md is then an elementwise comparison of row attributes against column
attributes, giving one boolean mask ``[R, 1, L, L]`` (True = may attend) for all layers
and heads. No Python loop over samples.

Key spans: no token ever attends a query slot (AR queries, AUX queries), so keys/values are
needed only for a prefix of each half: the N content slots of the AR half and the N + M
(CMLM block + true tokens; N without AUX) slots of the NAR/AUX half. ``key_spans`` records
``(first row, end row, keys)`` per half; the decoder projects keys/values and attends only
over those prefixes (same outputs for every real row, fewer FLOPs). Pad rows may attend every
column, so their softmax stays finite over any key prefix; no real row ever attends a pad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Segment ids.
UNMASKED, MASK_SLOT, TRUE_SLOT, QUERY, AR_CONTENT, AR_QUERY, PAD = range(7)


@dataclass
class DecoderStreams:
    tokens: torch.Tensor  # [R, L] token ids fed to the decoder
    positions: torch.Tensor  # [R, L] positions (before BART's offset of 2)
    segments: torch.Tensor  # [R, L] segment ids (for inspection and tests)
    self_mask: torch.Tensor  # [R, 1, L, L] bool, True = may attend
    out_rows: torch.Tensor  # [R, K] rows whose last-layer output is needed
    batch_size: int  # B
    has_ar: bool  # AR half present (rows [0, B))
    has_nar: bool  # NAR logits wanted (NAR half, out_rows[:, :M])
    has_aux: bool  # AUX logits wanted (NAR half, out_rows[:, aux_offset: aux_offset + M])
    num_masked_max: int  # M
    aux_offset: int
    masked_order: torch.Tensor  # [B, M] label index of the k-th masked token of each sample
    masked_valid: torch.Tensor  # [B, M] k < m_b
    target_valid: torch.Tensor  # [B, N] labels != pad
    key_spans: tuple[tuple[int, int, int], ...] = ()  # (row start, row end, key prefix) per half; () = all keys

    @property
    def nar_half(self) -> slice:
        start = self.batch_size if self.has_ar else 0
        return slice(start, start + self.batch_size)

    def to(self, device: torch.device) -> "DecoderStreams":
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return DecoderStreams(**moved)


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def attention_mask_from_attributes(seg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention table of docs/attention.md (plus the AR causal rules) as one broadcast comparison."""
    rs, cs = seg[:, :, None], seg[:, None, :]
    rk, ck = k[:, :, None], k[:, None, :]
    row_real = rs != PAD
    row_ctx = (rs == UNMASKED) | (rs == MASK_SLOT)
    row_true, row_query = rs == TRUE_SLOT, rs == QUERY
    allow = (cs == UNMASKED) & row_real
    allow |= (cs == MASK_SLOT) & (row_ctx | (row_true & (ck > rk)) | (row_query & (ck >= rk)))
    allow |= (cs == TRUE_SLOT) & ((row_true & (ck <= rk)) | (row_query & (ck < rk)))
    allow |= (cs == AR_CONTENT) & ((rs == AR_CONTENT) | (rs == AR_QUERY)) & (ck <= rk)
    # Pad rows attend every column, so their softmax stays finite over any key prefix (see
    # ``key_spans``); no real row attends a pad column.
    allow |= ~row_real
    return allow.unsqueeze(1)


def build_streams(
    labels: torch.Tensor,
    decoder_mask: torch.Tensor | None,
    *,
    pad_id: int,
    mask_id: int,
    start_id: int,
    ar: bool = True,
    nar: bool = True,
    aux: bool = True,
    num_masked_max: int | None = None,
) -> DecoderStreams:
    """Lay out the decoder input for the requested patterns.

    ``num_masked_max`` (M) may be given to avoid reading ``decoder_mask.sum`` back to the
    host; it must be at least the largest per-sample masked count.
    """
    if not (ar or nar or aux):
        raise ValueError("build_streams: at least one of ar/nar/aux must be requested")
    B, N = labels.shape
    device = labels.device
    valid = labels.ne(pad_id)
    need_nar_half = nar or aux
    if need_nar_half and decoder_mask is None:
        raise ValueError("decoder_mask is required for the NAR and AUX patterns")
    dm = decoder_mask.bool() & valid if need_nar_half else torch.zeros_like(valid)
    if num_masked_max is None:
        M = int(dm.sum(1).max()) if need_nar_half else 0
    else:
        M = num_masked_max
    ar_idx = torch.arange(N, device=device).expand(B, N)
    kk = torch.arange(M, device=device).expand(B, M)
    # Masked label indices, left to right (stable sort puts masked positions first).
    order = torch.sort((~dm).to(torch.uint8), dim=1, stable=True).indices[:, :M]
    masked_valid = kk < dm.sum(1, keepdim=True)

    parts = []  # (tokens, positions, segments, k, out_rows)
    key_spans = []
    if ar:
        key_spans.append((0, B, N))  # content slots only: nobody attends the queries
        shifted = torch.cat([torch.full((B, 1), start_id, dtype=labels.dtype, device=device), labels[:, :-1]], 1)
        tok = torch.cat([torch.where(valid, shifted, pad_id), torch.where(valid, mask_id, pad_id)], 1)
        pos = torch.cat([ar_idx, ar_idx + 1], 1)
        seg = torch.cat([torch.where(valid, AR_CONTENT, PAD), torch.where(valid, AR_QUERY, PAD)], 1)
        parts.append((tok, pos, seg, torch.cat([ar_idx, ar_idx], 1), ar_idx + N))
    aux_offset = M if nar else 0
    if need_nar_half:
        start = B if ar else 0
        key_spans.append((start, start + B, N + (M if aux else 0)))  # the CMLM block (+ true tokens)
        tok = [torch.where(dm, mask_id, labels)]
        pos = [ar_idx + 1]
        seg = [torch.where(valid, torch.where(dm, MASK_SLOT, UNMASKED), PAD)]
        k = [torch.where(dm, dm.cumsum(1) - 1, -1)]
        rows = [order] if nar else []
        if aux:
            true_tok = torch.where(masked_valid, labels.gather(1, order), pad_id)
            tok += [true_tok, torch.where(masked_valid, mask_id, pad_id)]
            pos += [order + 1, order + 1]
            seg += [torch.where(masked_valid, TRUE_SLOT, PAD), torch.where(masked_valid, QUERY, PAD)]
            k += [kk, kk]
            rows.append(kk + N + M)
        parts.append((torch.cat(tok, 1), torch.cat(pos, 1), torch.cat(seg, 1), torch.cat(k, 1), torch.cat(rows, 1)))

    L = max(p[0].shape[1] for p in parts)
    K = max(p[4].shape[1] for p in parts)
    tokens = torch.cat([_pad_to(p[0], L, pad_id) for p in parts])
    positions = torch.cat([_pad_to(p[1], L, 0) for p in parts])
    segments = torch.cat([_pad_to(p[2], L, PAD) for p in parts])
    order_k = torch.cat([_pad_to(p[3], L, -1) for p in parts])
    out_rows = torch.cat([_pad_to(p[4], K, 0) for p in parts])
    return DecoderStreams(
        tokens=tokens,
        positions=positions,
        segments=segments,
        self_mask=attention_mask_from_attributes(segments, order_k),
        out_rows=out_rows,
        batch_size=B,
        has_ar=ar,
        has_nar=nar,
        has_aux=aux,
        num_masked_max=M,
        aux_offset=aux_offset,
        masked_order=order,
        masked_valid=masked_valid,
        target_valid=valid,
        key_spans=tuple(key_spans),
    )
