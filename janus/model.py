"""BART-JANUS: a BART encoder-decoder whose decoder runs the AR, NAR and AUX patterns.

The parameters are exactly BART's (``model.*``, ``final_logits_bias``, tied ``lm_head``),
so a ``facebook/bart-base`` folder loads with no missing or unexpected keys; the only
JANUS-only parameters are those of the optional length head (``length_head.*``).
Encoder and decoder reuse HF's layer modules but run their own forward (HF's function):
both streams of both patterns share one SDPA call per layer with a boolean mask, the last
decoder layer computes only the rows whose outputs are used, and the activation memory kept
for backward is trimmed (``janus.layers``: 1-byte dropout masks, FFN activation recomputed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BartConfig, BartForConditionalGeneration, BartModel

from janus.layers import dropout, lean_bart
from janus.objectives import ObjectiveConfig, janus_losses
from janus.streams import DecoderStreams, build_streams

JANUS_CONFIG_FILE = "janus_config.json"
JANUS_EXTRAS_FILE = "janus_extras.pt"


@dataclass
class JanusOutput:
    """Decoder outputs, kept as hidden states so logits are computed only where needed.

    ``ar_hidden`` [B, N, D] covers every target slot; ``nar_hidden``/``aux_hidden`` [B, M, D]
    cover the masked positions in left-to-right order (``masked_order`` maps them back to
    label positions, ``masked_valid`` says which are real). The ``*_logits`` properties give
    ``[B, N, V]`` aligned to ``labels`` (zeros where a pattern makes no prediction).
    """

    ar_hidden: torch.Tensor | None
    nar_hidden: torch.Tensor | None
    aux_hidden: torch.Tensor | None
    masked_order: torch.Tensor
    masked_valid: torch.Tensor
    target_valid: torch.Tensor
    encoder_last_hidden_state: torch.Tensor
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    length_logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    # The output projection (a ``VocabHead``) and ``final_logits_bias``: with them the losses
    # compute logits chunk by chunk instead of through ``logits_fn`` (janus.objectives).
    vocab_head: "VocabHead | None" = None
    logits_bias: torch.Tensor | None = None

    def _at_labels(self, hidden: torch.Tensor | None) -> torch.Tensor | None:
        if hidden is None:
            return None
        compact = self.logits_fn(hidden) * self.masked_valid.unsqueeze(-1)
        B, N = self.target_valid.shape
        full = compact.new_zeros(B, N, compact.shape[-1])
        return full.scatter_add(1, self.masked_order.unsqueeze(-1).expand_as(compact), compact)

    @property
    def ar_logits(self) -> torch.Tensor | None:
        return None if self.ar_hidden is None else self.logits_fn(self.ar_hidden)

    @property
    def nar_logits(self) -> torch.Tensor | None:
        return self._at_labels(self.nar_hidden)

    @property
    def aux_logits(self) -> torch.Tensor | None:
        return self._at_labels(self.aux_hidden)


class VocabHead(nn.Linear):
    """BART's tied output projection (``lm_head``). Called with hidden states it is the plain
    ``nn.Linear``; ``head(None, vocab_loss=fn)`` returns ``fn(self.weight)``, so the chunked
    vocabulary losses use the weight inside this module's forward (where ZeRO-3 gathers it)."""

    def forward(self, hidden: torch.Tensor | None, vocab_loss: Callable | None = None):
        if vocab_loss is None:
            return super().forward(hidden)
        return vocab_loss(self.weight)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    R, L, D = x.shape
    return x.view(R, L, num_heads, D // num_heads).transpose(1, 2)


def _shared_source_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: float,
                             scale: float, interleaved: bool) -> torch.Tensor:
    """Cross-attention of R = G*B query rows to B sources without copying keys/values: the
    G rows of a source are folded into its sequence dimension (rows attend independently)."""
    R, H, L, d = q.shape
    B = k.shape[0]
    G = R // B
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    q = q.view(B, G, H, L, d).transpose(1, 2) if interleaved else q.view(G, B, H, L, d).permute(1, 2, 0, 3, 4)
    a = F.scaled_dot_product_attention(q.reshape(B, H, G * L, d), k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    a = a.view(B, H, G, L, d)
    a = a.transpose(1, 2) if interleaved else a.permute(2, 0, 1, 3, 4)
    return a.reshape(R, H, L, d)


def _merge(x: torch.Tensor) -> torch.Tensor:
    R, H, L, d = x.shape
    return x.transpose(1, 2).reshape(R, L, H * d)


class JanusBart(nn.Module):
    def __init__(self, config: BartConfig, *, mask_token_id: int | None = None, length_classes: int = 0,
                 bart: BartModel | None = None, final_logits_bias: torch.Tensor | None = None,
                 lean_activations: bool = True):
        """``lean_activations`` (default on): keep less for backward (``janus.layers``: FFN
        activation recomputed, LayerNorms keep their output, 1-byte dropout masks on the CPU);
        same parameters, values and gradients. Off: HF's plain modules (a reference)."""
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config = config
        self.model = bart if bart is not None else BartModel(config)
        self.lean_activations = lean_activations
        if lean_activations:
            lean_bart(self.model)
        bias = final_logits_bias if final_logits_bias is not None else torch.zeros(1, config.vocab_size)
        self.register_buffer("final_logits_bias", bias.detach().clone())
        self.lm_head = VocabHead(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.shared.weight
        # BART's <mask> is the last id of the vocabulary.
        self.mask_token_id = config.vocab_size - 1 if mask_token_id is None else mask_token_id
        self.length_classes = length_classes
        self.length_head = nn.Linear(config.d_model, length_classes) if length_classes > 0 else None
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ building / saving
    @classmethod
    def from_bart(cls, path: str, *, mask_token_id: int | None = None, length_classes: int = 0,
                  **hf_kwargs) -> "JanusBart":
        """Load a local HF BART folder (e.g. facebook/bart-base) and wrap it.

        Raises if the checkpoint has unexpected keys or lacks BART parameters; the
        JANUS-only parameters that start fresh are in ``model.janus_only_keys``.
        """
        hf, info = BartForConditionalGeneration.from_pretrained(path, output_loading_info=True, **hf_kwargs)
        missing = [k for k in info.get("missing_keys", []) if k != "final_logits_bias"]
        unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith(".version")]
        if missing or unexpected:
            raise ValueError(f"{path}: not a BART checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})")
        model = cls(hf.config, mask_token_id=mask_token_id, length_classes=length_classes,
                    bart=hf.model, final_logits_bias=hf.final_logits_bias)
        extras = os.path.join(path, JANUS_EXTRAS_FILE)
        if os.path.exists(extras):
            model._load_extras(path)
        return model

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "JanusBart":
        return cls.from_bart(path, **kw)

    @property
    def janus_only_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("length_head.")]

    def janus_config(self) -> dict:
        return {"mask_token_id": self.mask_token_id, "length_classes": self.length_classes}

    def _load_extras(self, path: str) -> None:
        with open(os.path.join(path, JANUS_CONFIG_FILE)) as f:
            meta = json.load(f)
        self.mask_token_id = meta["mask_token_id"]
        if meta["length_classes"] > 0:
            if self.length_classes != meta["length_classes"]:
                self.length_classes = meta["length_classes"]
                self.length_head = nn.Linear(self.config.d_model, self.length_classes)
            state = torch.load(os.path.join(path, JANUS_EXTRAS_FILE), map_location="cpu", weights_only=True)
            self.length_head.load_state_dict({k.removeprefix("length_head."): v for k, v in state.items()})

    def full_state(self) -> dict[str, torch.Tensor]:
        """Parameters (every tied name) and buffers as plain tensors. Unlike ``state_dict()``, this
        sees full weights inside ``deepspeed.zero.GatheredParameters`` under ZeRO-3."""
        state = {k: p.detach().clone() for k, p in self.named_parameters(remove_duplicate=False)}
        state.update({k: b.detach().clone() for k, b in self.named_buffers()})
        return state

    def to_hf(self) -> BartForConditionalGeneration:
        """A ``BartForConditionalGeneration`` holding copies of this model's BART weights."""
        hf = BartForConditionalGeneration(self.config)
        bart_state = {k: v for k, v in self.full_state().items() if not k.startswith("length_head.")}
        missing, unexpected = hf.load_state_dict(bart_state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        return hf

    def save_pretrained(self, path: str) -> None:
        """HF folder loadable by ``BartForConditionalGeneration.from_pretrained`` + JANUS extras."""
        os.makedirs(path, exist_ok=True)
        self.to_hf().save_pretrained(path)
        with open(os.path.join(path, JANUS_CONFIG_FILE), "w") as f:
            json.dump(self.janus_config(), f, indent=2)
        if self.length_head is not None:
            state = {k: v.cpu() for k, v in self.full_state().items() if k.startswith("length_head.")}
            torch.save(state, os.path.join(path, JANUS_EXTRAS_FILE))

    # ------------------------------------------------------------------ encoder side
    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout of the training forward (``janus.layers.dropout``; plain ``F.dropout`` without
        lean activations)."""
        return dropout(x, p, self.training, self.lean_activations)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """HF BART's encoder function on its modules, run by this class: a 2-D or 4-D boolean
        mask goes to SDPA as is (no host-side padding check), dropout keeps 1-byte masks
        (``janus.layers``), fp16 overflow is clamped without a host sync, and
        ``gradient_checkpointing`` covers the encoder layers too."""
        enc = self.model.encoder
        mask = attention_mask.bool() if attention_mask.dim() == 4 else self.cross_mask(attention_mask)
        h = enc.layernorm_embedding(enc.embed_tokens(input_ids) + enc.embed_positions(input_ids))
        h = self._drop(h, enc.dropout)
        for layer in enc.layers:
            if self.training and enc.layerdrop > 0.0 and torch.rand([]) < enc.layerdrop:
                continue  # LayerDrop, as HF's encoder
            if self.gradient_checkpointing and self.training:
                h = checkpoint(self._encoder_layer, layer, h, mask, use_reentrant=False)
            else:
                h = self._encoder_layer(layer, h, mask)
        return h

    def _encoder_layer(self, layer, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One post-LN BART encoder layer (HF's ``BartEncoderLayer`` function)."""
        H, sa = self.config.encoder_attention_heads, layer.self_attn
        a = F.scaled_dot_product_attention(_heads(sa.q_proj(h), H), _heads(sa.k_proj(h), H), _heads(sa.v_proj(h), H),
                                           attn_mask=mask, dropout_p=sa.dropout if self.training else 0.0, scale=sa.scaling)
        h = layer.self_attn_layer_norm(h + self._drop(sa.out_proj(_merge(a)), layer.dropout))
        f = layer.fc2(self._drop(layer.activation_fn(layer.fc1(h)), layer.activation_dropout))
        h = layer.final_layer_norm(h + self._drop(f, layer.dropout))
        if h.dtype == torch.float16:  # HF clamps an overflowed fp16 layer output; same values, no sync
            big = torch.finfo(torch.float16).max - 1000
            h = h.clamp(-big, big)
        return h

    def length_logits(self, encoder_out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Length head: mean of the non-pad encoder states -> logits over lengths 0..L_max."""
        if self.length_head is None:
            raise ValueError("this model has no length head (length_classes=0)")
        w = attention_mask.to(encoder_out.dtype).unsqueeze(-1)
        pooled = (encoder_out * w).sum(1) / w.sum(1).clamp(min=1)
        return self.length_head(pooled)

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values, computed once and reusable across decoder calls."""
        H = self.config.decoder_attention_heads
        return [(_heads(layer.encoder_attn.k_proj(encoder_out), H), _heads(layer.encoder_attn.v_proj(encoder_out), H))
                for layer in self.model.decoder.layers]

    # ------------------------------------------------------------------ decoder side
    def embed_decoder(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        pos = dec.embed_positions(tokens, position_ids=positions).squeeze(0)
        h = dec.layernorm_embedding(dec.embed_tokens(tokens) + pos)
        return self._drop(h, self.config.dropout)

    def _layer(self, layer, h: torch.Tensor, self_mask: torch.Tensor | None, cross: tuple[torch.Tensor, torch.Tensor],
               cross_mask: torch.Tensor, rows: torch.Tensor | None = None,
               past: tuple[torch.Tensor, torch.Tensor] | None = None, kv_len: int | None = None,
               new_kv: list | None = None, interleaved: bool = False,
               key_spans: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
        """One post-LN BART decoder layer. ``rows`` limits the computed rows (keys/values
        still come from every token); ``kv_len`` takes keys/values from the first ``kv_len``
        tokens only (the content stream during incremental decoding); ``past`` prepends cached
        self-attention keys/values, and the new ones are appended to ``new_kv`` when given.
        Cross-attention keys/values are per source; several decoder rows per source (pattern
        halves, beams, length candidates) share them, laid out ``interleaved`` (row = b*G + g)
        or blocked (row = g*B + b). ``key_spans`` ((row start, row end, keys), ..., covering all
        rows): each row range attends only its first ``keys`` tokens, whose keys/values alone
        are projected (``DecoderStreams.key_spans``)."""
        H = self.config.decoder_attention_heads
        drop, attn_drop = self.config.dropout, self.config.attention_dropout if self.training else 0.0
        sa = layer.self_attn
        x = h if rows is None else h.gather(1, rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        q = _heads(sa.q_proj(x), H)
        if key_spans:
            srcs = [(r0, r1, n, h[r0:r1, :n].contiguous()) for r0, r1, n in key_spans]  # one copy for k and v
            a = torch.cat([F.scaled_dot_product_attention(
                q[r0:r1], _heads(sa.k_proj(src), H), _heads(sa.v_proj(src), H),
                attn_mask=self_mask[r0:r1, :, :, :n], dropout_p=attn_drop, scale=sa.scaling)
                for r0, r1, n, src in srcs])
        else:
            src = h if kv_len is None else h[:, :kv_len]
            k, v = _heads(sa.k_proj(src), H), _heads(sa.v_proj(src), H)
            if new_kv is not None:
                new_kv.append((k, v))
            if past is not None:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, dropout_p=attn_drop, scale=sa.scaling)
        x = layer.self_attn_layer_norm(x + self._drop(sa.out_proj(_merge(a)), drop))
        ca = layer.encoder_attn
        a = _shared_source_attention(_heads(ca.q_proj(x), H), *cross, cross_mask, attn_drop, ca.scaling, interleaved)
        x = layer.encoder_attn_layer_norm(x + self._drop(ca.out_proj(_merge(a)), drop))
        f = layer.fc2(self._drop(layer.activation_fn(layer.fc1(x)), layer.activation_dropout))
        return layer.final_layer_norm(x + self._drop(f, drop))

    def run_decoder(self, streams: DecoderStreams, encoder_out: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """All decoder layers over the streams; returns last-layer states at ``out_rows``."""
        h = self.embed_decoder(streams.tokens, streams.positions)
        row_mask = streams.self_mask.gather(
            2, streams.out_rows[:, None, :, None].expand(-1, 1, -1, streams.self_mask.shape[-1]))
        return self.decoder_layers(h, streams.self_mask, self.cross_kv(encoder_out), self.cross_mask(attention_mask),
                                   last_rows=streams.out_rows, last_mask=row_mask, key_spans=streams.key_spans)

    @staticmethod
    def cross_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask.bool()[:, None, None, :]

    def decoder_layers(self, h: torch.Tensor, self_mask: torch.Tensor | None, cross: list, cross_mask: torch.Tensor,
                       last_rows: torch.Tensor | None = None, last_mask: torch.Tensor | None = None,
                       interleaved: bool = False, key_spans: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
        """The decoder stack; the last layer may compute only ``last_rows`` (with ``last_mask``);
        ``key_spans``: see ``_layer``."""
        layers = self.model.decoder.layers
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1 and last_rows is not None
            args = (layer, h, last_mask if last else self_mask, cross[i], cross_mask, last_rows if last else None,
                    None, None, None, interleaved, key_spans)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                h = self._layer(*args)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) + self.final_logits_bias.to(hidden.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                decoder_mask: torch.Tensor | None = None, *, objective: ObjectiveConfig | None = None,
                streams: DecoderStreams | None = None,
                patterns: tuple[str, ...] | None = None, length_targets: torch.Tensor | None = None,
                encoder_out: torch.Tensor | None = None, host_counts: dict | None = None) -> JanusOutput:
        """One encoder pass, one decoder pass for every requested pattern.

        ``objective`` (a ``janus.objectives.ObjectiveConfig``) decides which patterns run and
        adds ``losses``/``loss`` to the output; without it all three patterns run (or
        ``patterns``). ``streams`` may be prebuilt (e.g. in data-loader workers) with
        ``build_streams``. ``encoder_out`` may be given when the caller already ran the encoder
        (e.g. a second decoder on the same encoder pass).

        ``host_counts``: optional host-side ints of this batch (computed on the CPU, e.g. by the
        collator): ``n_tokens`` (non-pad targets), ``n_masked`` (valid masked target positions,
        ``decoder_mask & labels != pad``) and ``num_masked_max`` (largest masked count of any
        sample, or any larger bound). With them forward and losses run without a device -> host
        synchronisation; without them the counts are read back from the device.
        """
        if patterns is None:
            patterns = objective.patterns() if objective is not None else ("ar", "nar", "aux")
        if streams is None:
            streams = build_streams(labels, decoder_mask, pad_id=self.config.pad_token_id, mask_id=self.mask_token_id,
                                    start_id=self.config.decoder_start_token_id,
                                    ar="ar" in patterns, nar="nar" in patterns, aux="aux" in patterns,
                                    num_masked_max=None if host_counts is None else int(host_counts["num_masked_max"]))
        if labels.shape[1] >= self.config.max_position_embeddings:
            raise ValueError(f"target length {labels.shape[1]} needs positions up to {labels.shape[1]}, "
                             f"but max_position_embeddings is {self.config.max_position_embeddings}")
        if encoder_out is not None:
            enc = encoder_out
        else:
            # A 4-D boolean mask is used by HF's encoder as is; a 2-D one is first checked for
            # padding on the host (a sync). Same attention either way.
            enc = self.encode(input_ids, attention_mask if host_counts is None else self.cross_mask(attention_mask))
        hidden = self.run_decoder(streams, enc, attention_mask)
        B, N, M = streams.batch_size, labels.shape[1], streams.num_masked_max
        nar_rows = hidden[streams.nar_half]
        out = JanusOutput(
            ar_hidden=hidden[:B, :N] if streams.has_ar else None,
            nar_hidden=nar_rows[:, :M] if streams.has_nar else None,
            aux_hidden=nar_rows[:, streams.aux_offset:streams.aux_offset + M] if streams.has_aux else None,
            masked_order=streams.masked_order, masked_valid=streams.masked_valid,
            target_valid=streams.target_valid, encoder_last_hidden_state=enc, logits_fn=self.logits,
            vocab_head=self.lm_head if isinstance(self.lm_head, VocabHead) else None,
            logits_bias=self.final_logits_bias)
        if self.length_head is not None:
            out.length_logits = self.length_logits(enc, attention_mask)
        if objective is not None:
            out.losses = janus_losses(out, labels, objective, length_targets=length_targets, host_counts=host_counts)
            out.loss = out.losses["total"]
        return out
