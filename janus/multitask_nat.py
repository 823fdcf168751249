"""Multi-Task NAT (Hao et al., 2021): one shared encoder, an AT decoder and a CMLM NAT decoder.

Built from the same pieces as ``JanusBart`` (no second copy of the layer math):

* ``self.nat`` is a ``JanusBart`` (encoder, NAT decoder, length head): the NAT task is its CMLM
  objective (the NAR pattern, ``objective`` preset ``cmlm``) and it is the model that is exported
  and decoded (mask-predict). The AT decoder is dropped at export.
* ``self.at`` is a second ``JanusBart`` whose encoder *is* ``self.nat``'s encoder module and whose
  token embeddings / output projection are ``self.nat``'s (shared embeddings, as in the paper's
  fairseq set-up); its decoder layers, positions and embedding layer norm are its own. It runs as a
  plain left-to-right Transformer decoder (causal self-attention over the shifted target) through
  ``JanusBart.embed_decoder`` / ``decoder_layers`` / ``logits``.

Loss at step t of T: ``lambda_t * L_NAT + (1 - lambda_t) * L_AT`` with importance annealing
``lambda_t = t / T`` (or a fixed lambda). L_NAT includes the length loss (weight
``objective.length``), as in fairseq's CMLM loss. The encoder runs once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartConfig, BartModel

from janus.model import JanusBart, JanusOutput
from janus.objectives import ObjectiveConfig, _smoothed_nll


def importance_lambda(step: int, total_steps: int, fixed: float | None = None) -> float:
    """lambda_t = t / T (importance annealing: the AT weight 1 - lambda goes 1 -> 0), or ``fixed``."""
    if fixed is not None:
        if not 0.0 <= fixed <= 1.0:
            raise ValueError(f"fixed lambda must be in [0, 1], got {fixed}")
        return fixed
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


class MultiTaskNAT(nn.Module):
    def __init__(self, config: BartConfig, *, mask_token_id: int | None = None, length_classes: int = 0):
        super().__init__()
        self.config = config
        self.nat = JanusBart(config, mask_token_id=mask_token_id, length_classes=length_classes)
        at_bart = BartModel(config)
        # Share the encoder module and the token embeddings; the AT decoder keeps its own layers.
        at_bart.encoder = self.nat.model.encoder
        at_bart.shared = self.nat.model.shared
        at_bart.decoder.embed_tokens = self.nat.model.shared
        self.at = JanusBart(config, mask_token_id=self.nat.mask_token_id, bart=at_bart)
        self.nat_objective = ObjectiveConfig.from_preset("cmlm")

    @property
    def mask_token_id(self) -> int:
        return self.nat.mask_token_id

    @property
    def length_classes(self) -> int:
        return self.nat.length_classes

    def janus_config(self) -> dict:
        return self.nat.janus_config()

    def at_decoder_keys(self) -> list[str]:
        """State-dict keys that belong to the AT task only (dropped at export)."""
        shared = {id(p) for p in self.nat.parameters()}
        return [f"at.{n}" for n, p in self.at.named_parameters(remove_duplicate=False) if id(p) not in shared]

    def at_logits(self, encoder_out: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        """AT decoder: causal decoding of the shift-right target, logits [B, N, V] for ``labels``.
        Same position convention as JANUS's AR content stream (start token at 0, t_i at i + 1)."""
        at, c = self.at, self.config
        B, N = labels.shape
        shifted = torch.cat([labels.new_full((B, 1), c.decoder_start_token_id), labels[:, :-1]], 1)
        shifted = shifted.masked_fill(labels.eq(c.pad_token_id), c.pad_token_id)
        positions = torch.arange(N, device=labels.device).expand(B, N)
        causal = torch.ones(N, N, dtype=torch.bool, device=labels.device).tril()
        h = at.embed_decoder(shifted, positions)
        h = at.decoder_layers(h, causal[None, None], at.cross_kv(encoder_out), at.cross_mask(attention_mask))
        return at.logits(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                decoder_mask: torch.Tensor | None = None, *, objective: ObjectiveConfig | None = None,
                length_targets: torch.Tensor | None = None, lam: float = 0.5,
                host_counts: dict | None = None) -> JanusOutput:
        """``lam`` = lambda_t. Returns the NAT decoder's ``JanusOutput`` with ``losses``
        {nar, length, at, lambda, total, n_tokens, n_masked} and ``loss`` = the weighted sum."""
        nat_obj = objective if objective is not None else self.nat_objective
        enc = self.nat.encode(input_ids, attention_mask)
        out = self.nat(input_ids, attention_mask, labels, decoder_mask, objective=nat_obj, patterns=("nar",),
                       length_targets=length_targets, encoder_out=enc, host_counts=host_counts)
        valid = labels.ne(self.config.pad_token_id)
        logits = self.at_logits(enc, attention_mask, labels)
        logp = F.log_softmax(logits.float(), dim=-1)  # every slot, pads weighted 0: no boolean indexing (a sync)
        nll = (_smoothed_nll(logp, labels, nat_obj.label_smoothing) * valid).sum()
        count = valid.sum().clamp(min=1) if host_counts is None else max(int(host_counts["n_tokens"]), 1)
        at_loss = nll / count if nat_obj.reduction == "mean" else nll
        nat_loss = out.losses["total"]
        losses = dict(out.losses)
        losses.update(nat=nat_loss, at=at_loss, total=lam * nat_loss + (1.0 - lam) * at_loss,
                      # filled on the device: torch.tensor(python value, device=cuda) is a copy from
                      # pageable host memory, which waits on the stream every micro-batch
                      **{"lambda": torch.full((), float(lam), dtype=nat_loss.dtype, device=nat_loss.device)})
        out.losses, out.loss = losses, losses["total"]
        return out

    # Inference uses the NAT decoder only.
    def export_model(self) -> JanusBart:
        return self.nat
