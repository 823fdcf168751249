"""What every entry point trains with: the loss step, epochs -> steps, the evaluation copy.

``JanusLoss`` is the one loss function of pretraining, finetuning and NMT. The training loop
calls ``host_counts(batch)`` on the batch while it is still on the host (the counts the loop
logs and the stream builder needs are plain integers there, so nothing waits for the GPU),
then ``loss(engine, batch, host)`` on the device copy, and ``flops(host)`` for MFU.
``full_precision_copy`` builds the plain fp32 model that evaluation decodes and exports
(the optimizer's fp32 master weights under bf16/fp16, gathered under ZeRO-3).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from janus.objectives import ObjectiveConfig

HOST_KEYS = ("n_samples", "n_tokens", "n_masked", "num_masked_max", "n_src", "n_src_masked")


def epochs_to_steps(epochs: float, num_samples: int, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_samples`` at ``global_batch`` samples a step."""
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return max(1, math.ceil(epochs * num_samples / global_batch))


def accum_for(global_batch: int, micro: int, world_size: int) -> int:
    """Gradient accumulation that gives ``global_batch`` samples a step, or a refusal with the arithmetic."""
    if global_batch % (micro * world_size):
        options = [m for m in range(1, micro + 1) if global_batch % (m * world_size) == 0]
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro} x {world_size} ranks "
                         f"= {micro * world_size}: no whole number of accumulation steps fits"
                         + (f" (micro-batch sizes that fit: {options})" if options else
                            f" ({world_size} ranks cannot share {global_batch} samples evenly)"))
    return global_batch // (micro * world_size)


class JanusLoss:
    """``loss(engine, batch, host) -> (loss, {name: device scalar})`` for a JANUS objective.

    ``extra_kwargs(engine) -> dict`` adds forward arguments that depend on the training state
    (Multi-Task NAT's lambda_t). ``model_config`` (a BartConfig) enables the FLOP count;
    ``flop_patterns`` overrides the decoder patterns counted (Multi-Task NAT: its AT decoder
    costs what an AR pattern costs)."""

    def __init__(self, objective: ObjectiveConfig, pad_id: int, model_config=None,
                 extra_kwargs: Callable | None = None, flop_patterns: tuple[str, ...] | None = None):
        self.objective, self.pad_id, self.model_config = objective, pad_id, model_config
        self.extra_kwargs = extra_kwargs
        self.patterns = objective.patterns()
        self.flop_patterns = flop_patterns or self.patterns

    def host_counts(self, batch: dict) -> dict[str, int]:
        """Counts of a host-side batch (CPU tensors): no device work, no sync."""
        labels = batch["labels"]
        valid = labels.ne(self.pad_id)
        counts = {"n_samples": labels.shape[0], "n_tokens": int(valid.sum()), "n_target_width": labels.shape[1],
                  "n_src": int(batch["attention_mask"].sum()), "n_src_width": batch["attention_mask"].shape[1]}
        dm = batch.get("decoder_mask")
        if dm is not None and ("nar" in self.patterns or "aux" in self.patterns):
            per_row = (dm.bool() & valid).sum(1)
            counts.update(n_masked=int(per_row.sum()), num_masked_max=int(per_row.max()) if len(per_row) else 0)
        else:
            counts.update(n_masked=0, num_masked_max=0)
        if "n_src_masked" in batch:  # pretraining: encoder noise per sample, for the effective mask ratio
            counts["n_src_masked"] = int(batch["n_src_masked"].sum())
        return counts

    def __call__(self, engine, batch: dict, host: dict | None = None):
        host = host if host is not None else self.host_counts({k: v.cpu() if torch.is_tensor(v) else v
                                                                for k, v in batch.items()})
        kwargs = self.extra_kwargs(engine) if self.extra_kwargs is not None else {}
        out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("decoder_mask"),
                     objective=self.objective, length_targets=batch.get("length_targets"),
                     host_counts={k: host[k] for k in ("n_tokens", "n_masked", "num_masked_max")}, **kwargs)
        scalars = {k: v for k, v in out.losses.items() if k != "total" and not k.startswith("n_")}
        scalars["total"] = out.loss
        return out.loss, scalars

    def flops(self, host: dict) -> float:
        """Training FLOPs (forward + backward) of one micro-batch, from host counts."""
        if self.model_config is None:
            return 0.0
        from janus.flops import janus_step_flops

        return janus_step_flops(self.model_config, patterns=self.flop_patterns, batch_size=host["n_samples"],
                                src_tokens=host["n_src"], src_len=host["n_src_width"],
                                tgt_len=host["n_target_width"], n_tokens=host["n_tokens"],
                                n_masked=host["n_masked"], num_masked_max=host["num_masked_max"])


def full_precision_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A plain fp32 copy of a DeepSpeed-wrapped model, for decoding and export.

    Collective (every rank calls it, same order): under ZeRO-3 each parameter is gathered;
    under bf16/fp16 (any stage) the values are the optimizer's fp32 master weights, not the
    rounded module copy. The model class must rebuild from ``(config, **janus_config())``."""
    from deepspeed.utils import safe_get_full_fp32_param

    with torch.device(device):  # built where it runs (and faster there)
        plain = type(module)(module.config, **module.janus_config())
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            full = safe_get_full_fp32_param(p)
            seen[id(p)] = (full if full is not None else p.detach()).float().clone()
        state[name] = seen[id(p)]
    state.update({k: b.detach().float().clone() for k, b in module.named_buffers()})
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"evaluation copy does not match the model: missing {missing}, unexpected {unexpected}")
    return plain.eval()
