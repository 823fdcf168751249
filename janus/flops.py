"""FLOPs of a training step (JANUS and plain HF BART) and accelerator peak rates, for MFU.

Counting convention (PaLM / torchtitan): only matrix multiplications count (projections,
FFN, attention scores and values, the vocabulary projection); one multiply-add = 2 FLOPs;
a training step (forward + backward) = 3 x the forward FLOPs. Layer norms, softmaxes,
embedding lookups and the optimizer are not counted. Attention is counted dense: every
query row against every key of its stream (the kernels compute masked entries too).

Everything is computed from host-side Python ints, so logging MFU never reads the device:

    flops = janus_step_flops(model.config, batch_size=B, src_tokens=..., src_len=S, tgt_len=N,
                             n_tokens=..., n_masked=..., num_masked_max=M, patterns=objective.patterns())
    peak = peak_tflops_for(torch.cuda.get_device_name(), "bf16")      # None if unknown
    mfu = flops / step_seconds / (peak * 1e12 * world_size)

``janus_step_flops(config, batch=cpu_batch, patterns=...)`` derives the sizes from a collated
batch still on the CPU (before ``.to(device)``).
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import torch

# Dense peak TFLOP/s per GPU (datasheet figures without structured sparsity). "fp32" is plain
# fp32 on the CUDA cores (matmuls with TF32 off); "tf32" the tensor cores' TF32 rate. The SXM
# parts are the plain names; PCIe and NVL (H100 NVL, H200 NVL) cards run lower clocks and power.
# A800 / H800 are the export variants of A100 / H100 (same compute, slower interconnect); GH200
# carries an H100-class GPU at SXM rates.
_PEAKS: dict[str, tuple[float, float, float]] = {  # chip: (bf16 = fp16, tf32, fp32)
    "a100": (312.0, 156.0, 19.5), "a800": (312.0, 156.0, 19.5),
    "a100-pcie": (312.0, 156.0, 19.5), "a800-pcie": (312.0, 156.0, 19.5),
    "h100": (989.0, 494.0, 67.0), "h800": (989.0, 494.0, 67.0), "gh200": (989.0, 494.0, 67.0),
    "h100-pcie": (756.0, 378.0, 51.0), "h800-pcie": (756.0, 378.0, 51.0),
    "h100-nvl": (835.0, 418.0, 60.0),
    "h200": (989.0, 494.0, 67.0), "h200-nvl": (835.0, 418.0, 60.0),
}
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    (chip, kind): rates[i] for chip, rates in _PEAKS.items()
    for i, kinds in enumerate((("bf16", "fp16"), ("tf32",), ("fp32",))) for kind in kinds}
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                  "half": "fp16", "torch.float16": "fp16", "tf32": "tf32", "fp32": "fp32", "float32": "fp32",
                  "torch.float32": "fp32"}
# Checked in this order ("gh200" before "h200"; a word boundary keeps "h100" out of "gh100").
_CHIPS = ("gh200", "h200", "h800", "h100", "a800", "a100")


def fp32_matmul_kind() -> str:
    """"tf32" when fp32 matmuls may run on the tensor cores in TF32 here, else "fp32": torch's
    ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` ("high" or
    "medium" allow it; torch's default "highest" does not), and ``NVIDIA_TF32_OVERRIDE=0``, which
    turns TF32 off in the CUDA libraries whatever torch allows."""
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return "fp32"
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "fp32"


def peak_tflops_for(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (as ``torch.cuda.get_device_name()`` spells it,
    e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA GH200 480GB")
    for ``dtype`` ("bf16"/"bfloat16", "fp16"/"float16", "tf32", "fp32": for fp32 runs pass
    ``fp32_matmul_kind()``); None for an unknown device or dtype."""
    kind = _DTYPE_ALIASES.get(str(dtype).lower())
    name = device_name.lower()
    chip = next((c for c in _CHIPS if re.search(rf"\b{c}", name)), None)
    if chip is None or kind is None:
        return None
    for variant in ("nvl", "pcie"):
        if variant in name and f"{chip}-{variant}" in _PEAKS:
            chip = f"{chip}-{variant}"
            break
    return PEAK_TFLOPS.get((chip, kind))


def _dims(config) -> tuple[int, int, int, int, int, int]:
    return (config.d_model, config.encoder_ffn_dim, config.decoder_ffn_dim, config.encoder_layers,
            config.decoder_layers, config.vocab_size)


def _encoder_macs(config, src_tokens: int, src_len: int) -> int:
    """Encoder over ``src_tokens`` non-pad tokens, each attending ``src_len`` keys."""
    D, F_enc, _, L_enc, _, _ = _dims(config)
    per_token = 4 * D * D + 2 * D * F_enc + 2 * src_len * D  # q,k,v,o + FFN + scores/values
    return L_enc * src_tokens * per_token


def _decoder_half_macs(config, rows: int, tokens: int, last_rows: int, keys: int, src_len: int,
                       full_last: bool) -> int:
    """One stream half: ``rows`` samples x ``tokens`` decoder tokens attending the first ``keys``
    tokens of the half (whose keys/values alone are projected: ``DecoderStreams.key_spans``);
    the last layer computes only ``last_rows`` query rows per sample unless ``full_last``."""
    D, _, F_dec, _, L_dec, _ = _dims(config)

    def layer(q_rows: int) -> int:
        kv = 2 * D * D * keys  # self-attention keys/values of the key tokens
        per_row = (2 * D * D  # q, out projections
                   + 2 * keys * D  # self-attention scores + values
                   + 2 * D * D  # cross-attention q, out projections
                   + 2 * src_len * D  # cross-attention scores + values
                   + 2 * D * F_dec)  # FFN
        return rows * (kv + q_rows * per_row)

    last = tokens if full_last else last_rows
    return (L_dec - 1) * layer(tokens) + layer(last)


def _cross_kv_macs(config, batch_size: int, src_len: int) -> int:
    """Cross-attention keys/values: once per source token and decoder layer."""
    D, _, _, _, L_dec, _ = _dims(config)
    return L_dec * batch_size * src_len * 2 * D * D


def janus_step_flops(config, *, batch: dict | None = None, patterns: Iterable[str] = ("ar", "nar", "aux"),
                     batch_size: int | None = None, src_tokens: int | None = None, src_len: int | None = None,
                     tgt_len: int | None = None, n_tokens: int | None = None, n_masked: int | None = None,
                     num_masked_max: int | None = None) -> float:
    """FLOPs of one JANUS training step (forward + backward = 3 x forward matmul FLOPs).

    Arguments (all Python ints, keyword-only):

    - ``config``: the model's ``BartConfig`` (d_model, FFN dims, layer counts, vocab_size).
    - ``patterns``: the decoder patterns that run (``ObjectiveConfig.patterns()``).
    - ``batch_size`` B; ``src_len`` S = padded source length; ``src_tokens`` = non-pad
      source tokens (encoder rows; each attends S keys; cross-attention keys/values are
      projected for all B*S source slots).
    - ``tgt_len`` N = padded target length; ``num_masked_max`` M = masked slots per sample
      (``DecoderStreams.num_masked_max``); ``n_tokens`` = non-pad targets; ``n_masked`` =
      valid masked positions.

    Or ``batch=``: a collated batch on the CPU (``input_ids``, ``attention_mask``, ``labels``,
    ``decoder_mask``; ints ``n_tokens``/``n_masked``/``num_masked_max`` are used if present)
    from which these sizes are read; explicit keyword sizes override it.

    Decoder rows per sample: AR half 2N (content + query stream); NAR/AUX half N + 2M with
    AUX (N with NAR only); self-attention keys/values only where some row attends them (AR: the
    N content slots; NAR/AUX: the N-token block and, with AUX, the M true tokens); the last layer computes
    only the output rows (AR: N queries; NAR: M masked slots; AUX: M queries). Vocabulary
    projection only for rows that produce logits: ``n_tokens`` AR rows, ``n_masked`` NAR and
    ``n_masked`` AUX rows.
    """
    sizes = dict(batch_size=batch_size, src_tokens=src_tokens, src_len=src_len, tgt_len=tgt_len, n_tokens=n_tokens,
                 n_masked=n_masked, num_masked_max=num_masked_max)
    if batch is not None:
        derived = _sizes_from_batch(batch, config.pad_token_id)
        sizes = {k: derived[k] if v is None else v for k, v in sizes.items()}
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise ValueError(f"janus_step_flops: missing {missing} (pass them or batch=)")
    B, S, N, M = sizes["batch_size"], sizes["src_len"], sizes["tgt_len"], sizes["num_masked_max"]
    patterns = set(patterns)
    if not patterns or not patterns <= {"ar", "nar", "aux"}:
        raise ValueError(f"janus_step_flops: patterns must be a non-empty subset of ar/nar/aux, got {patterns}")
    D, V = config.d_model, config.vocab_size
    macs = _encoder_macs(config, sizes["src_tokens"], S) + _cross_kv_macs(config, B, S)
    logit_rows = 0
    if "ar" in patterns:
        macs += _decoder_half_macs(config, B, 2 * N, N, N, S, full_last=False)  # queries attend the N content slots
        logit_rows += sizes["n_tokens"]
    if "nar" in patterns or "aux" in patterns:
        length = N + (2 * M if "aux" in patterns else 0)
        out_rows = M * (("nar" in patterns) + ("aux" in patterns))
        keys = N + (M if "aux" in patterns else 0)  # the CMLM block and the true tokens, never the queries
        macs += _decoder_half_macs(config, B, length, out_rows, keys, S, full_last=False)
        logit_rows += sizes["n_masked"] * (("nar" in patterns) + ("aux" in patterns))
    macs += logit_rows * D * V
    return 3.0 * 2.0 * macs


def bart_step_flops(config, src_tokens: int, tgt_tokens: int, *, batch_size: int = 1, src_len: int | None = None,
                    tgt_len: int | None = None) -> float:
    """FLOPs of one plain HF BART training step (teacher forcing, logits at every decoder
    position): ``src_tokens`` encoder rows, ``tgt_tokens`` decoder rows (and logit rows).
    Attention key lengths are ``src_len`` / ``tgt_len`` (default: tokens / ``batch_size``,
    i.e. no padding). Same convention as ``janus_step_flops``."""
    S = src_len if src_len is not None else -(-src_tokens // batch_size)
    N = tgt_len if tgt_len is not None else -(-tgt_tokens // batch_size)
    D, _, F_dec, _, L_dec, V = _dims(config)
    macs = _encoder_macs(config, src_tokens, S) + _cross_kv_macs(config, batch_size, S)
    per_row = 2 * D * D + 2 * D * D + 2 * N * D + 2 * D * D + 2 * S * D + 2 * D * F_dec  # q,k,v,o; attn; cross; FFN
    macs += L_dec * tgt_tokens * per_row + tgt_tokens * D * V
    return 3.0 * 2.0 * macs


def _sizes_from_batch(batch: dict, pad_id: int) -> dict:
    def host(t):
        if torch.is_tensor(t) and t.device.type != "cpu":
            raise ValueError("janus_step_flops(batch=...) needs the batch on the CPU (reading device tensors "
                             "would synchronise); pass the sizes as ints instead")
        return t

    labels = host(batch["labels"])
    am = host(batch["attention_mask"])
    valid = labels.ne(pad_id)
    out = {"batch_size": int(labels.shape[0]), "src_len": int(am.shape[1]), "src_tokens": int(am.sum()),
           "tgt_len": int(labels.shape[1])}
    dm = batch.get("decoder_mask")
    masked = (host(dm).bool() & valid) if dm is not None else torch.zeros_like(valid)
    out["n_tokens"] = int(batch["n_tokens"]) if "n_tokens" in batch else int(valid.sum())
    out["n_masked"] = int(batch["n_masked"]) if "n_masked" in batch else int(masked.sum())
    out["num_masked_max"] = (int(batch["num_masked_max"]) if "num_masked_max" in batch
                             else int(masked.sum(1).max()) if masked.numel() else 0)
    return out
