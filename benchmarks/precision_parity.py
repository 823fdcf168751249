"""Precision parity of every custom autograd path, in every precision regime a user can select.

    python -m benchmarks.precision_parity [--regimes ...] [--paths ...]

DeepSpeed's ``bf16``/``fp16`` modes cast the weights and run the forward in that dtype *without*
autocast (fp16 also multiplies the loss by a dynamic scale, 2^16 at first, before backward), so
a custom autograd function sees half-precision tensors and a scaled upstream gradient. For each
path we own (``ActLinear``, ``LeanLayerNorm``, the lean ``dropout``, the chunked vocabulary
losses, the whole ``JanusBart`` step) and each regime this runs

* **ours**: the path as the training step runs it;
* **plain**: the same function from plain modules, *as a GPU runs it* (CUDA's LayerNorm computes
  in fp32 from half-precision data and rounds the result; the CPU's own half-precision LayerNorm
  accumulates in low precision, so on the CPU the plain LayerNorm is built that way here);
* **reference**: the plain function in float64 on the same rounded data (weights and inputs
  first rounded to the regime's dtype, then upcast),

and reports, for every gradient, the relative error ``||g - g_ref|| / ||g_ref||`` of ours and of
plain. The inputs are adversarial: LayerNorms with small weights (15 % of channels at 0.02-0.05)
and large biases (N(0, 1.5)), peaked logits, long targets, padded rows. ``tests/test_precision_parity.py``
asserts ours <= 2 x plain (+ a small floor) for every gradient.

Regimes: ``fp32``; ``bf16`` (weights + inputs, no autocast); ``fp16_2^16`` (fp16 weights, loss
x 2^16, DeepSpeed's initial scale); ``fp16_max`` (the largest power-of-two scale at which the plain
path's gradients stay finite, found per case); ``bf16_autocast`` (fp32 weights under bf16 autocast).
The last line printed is one JSON object: {regime: {path: {"ours": worst error, "plain": worst
error, "ratio": worst ours/plain over gradients, "finite": bool}}}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from janus.layers import ActLinear, LeanLayerNorm, dropout
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig


@dataclass(frozen=True)
class Regime:
    name: str
    dtype: torch.dtype  # what weights and inputs are rounded to and run in
    autocast: bool = False  # bf16 autocast over fp32 weights
    scale: float | str = 1.0  # loss scale: a number, or "max" (largest finite power of two for plain)


REGIMES = {r.name: r for r in (
    Regime("fp32", torch.float32),
    Regime("bf16", torch.bfloat16),
    Regime("fp16_2^16", torch.float16, scale=2.0 ** 16),
    Regime("fp16_max", torch.float16, scale="max"),
    Regime("bf16_autocast", torch.float32, autocast=True),
)}
# Below these relative errors a difference is rounding noise of the regime's own dtype: the bound
# is max(2 x plain, floor). Well under the half-precision epsilons (bf16 3.9e-3, fp16 4.9e-4).
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 2e-5}


class GpuLikeLayerNorm(nn.LayerNorm):
    """The native LayerNorm as CUDA runs it on half-precision data: computes in fp32 (forward and
    backward) and rounds outputs and gradients to the data's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), b, self.eps).to(x.dtype)


def gpu_like(model: nn.Module) -> nn.Module:
    """Swap ``GpuLikeLayerNorm`` in for every plain ``nn.LayerNorm`` (same parameters)."""
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.LayerNorm:
                new = GpuLikeLayerNorm(child.normalized_shape, eps=child.eps, device="meta")
                new.weight, new.bias = child.weight, child.bias
                setattr(m, child_name, new)
    return model


# ----------------------------------------------------------------------------- cases
# A case: make(seed) -> (leaves, fns); leaves: name -> tensor (full precision, the data before the
# regime rounds it); fns: variant -> f(leaves) -> scalar loss (in at least fp32), where the leaves
# passed are already rounded, upcast for the reference, and require grad.

def _adversarial_norm(d: int, g: torch.Generator, bias_std: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm weights ~1 with 15 % of channels at +-0.02-0.05, biases ~N(0, bias_std)."""
    w = 1.0 + 0.1 * torch.randn(d, generator=g)
    small = torch.rand(d, generator=g) < 0.15
    w[small] = (0.02 + 0.03 * torch.rand(int(small.sum()), generator=g)) * torch.sign(torch.randn(int(small.sum()), generator=g))
    return w, bias_std * torch.randn(d, generator=g)


def _dot(y: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """sum(y * gy) in at least fp32 (the loss a backward starts from)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    return (y.to(acc) * gy.to(acc)).sum()


def _upstream(shape, g: torch.Generator) -> torch.Tensor:
    """A fixed upstream gradient with the magnitude of a mean loss's (1 / rows)."""
    return torch.randn(*shape, generator=g) / shape[0]


def case_layer_norm(seed: int = 0, rows: int = 256, d: int = 768):
    g = torch.Generator().manual_seed(seed)
    w, b = _adversarial_norm(d, g)
    x = 3.0 * torch.randn(rows, d, generator=g) + torch.randn(d, generator=g)
    gy = _upstream((rows, d), g)

    modules = {"ours": LeanLayerNorm(nn.LayerNorm(d)), "plain": GpuLikeLayerNorm(d), "reference": nn.LayerNorm(d)}

    def layer(kind):
        def f(t):
            return _dot(torch.func.functional_call(modules[kind], {"weight": t["w"], "bias": t["b"]}, (t["x"],)), gy)
        return f
    return {"x": x, "w": w, "b": b}, {k: layer(k) for k in ("ours", "plain", "reference")}


def case_act_linear(seed: int = 0, rows: int = 256, d: int = 64, ffn: int = 256, p: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    u = 2.0 * torch.randn(rows, ffn, generator=g)
    w = torch.randn(d, ffn, generator=g) / math.sqrt(ffn)
    b = 0.5 * torch.randn(d, generator=g)
    keep = torch.rand(rows, ffn, generator=g) >= p
    gy = _upstream((rows, d), g)
    act = nn.GELU()
    ours = ActLinear(nn.Linear(ffn, d), act, p).train()

    def layer(kind):
        def f(t):
            if kind == "ours":
                with _fixed_keep_mask(keep):
                    y = torch.func.functional_call(ours, {"weight": t["w"], "bias": t["b"]}, (t["u"],))
            else:
                a = act(t["u"]) * keep.to(t["u"].dtype) / (1.0 - p)
                y = F.linear(a, t["w"], t["b"])
            return _dot(y, gy)
        return f
    return {"u": u, "w": w, "b": b}, {k: layer(k) for k in ("ours", "plain", "reference")}


@contextlib.contextmanager
def _fixed_keep_mask(keep: torch.Tensor):
    """Make ``janus.layers`` draw ``keep`` as its dropout keep-mask (same mask for every path)."""
    import janus.layers as layers
    saved = layers._keep_mask
    layers._keep_mask = lambda u, p: keep.to(u.device)
    try:
        yield
    finally:
        layers._keep_mask = saved


def case_dropout(seed: int = 0, rows: int = 256, d: int = 768, p: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(rows, d, generator=g)
    keep = torch.rand(rows, d, generator=g) >= p
    gy = _upstream((rows, d), g)

    def layer(kind):
        def f(t):
            if kind == "ours":
                with _fixed_keep_mask(keep):
                    y = dropout(t["x"], p, True)
            else:  # F.dropout's function: x * mask / (1 - p), in the op math of the dtype
                y = (t["x"].float() * keep / (1.0 - p)).to(t["x"].dtype) if t["x"].dtype != torch.float64 else \
                    t["x"] * keep / (1.0 - p)
            return _dot(y, gy)
        return f
    return {"x": x}, {k: layer(k) for k in ("ours", "plain", "reference")}


def _janus_case(seed: int, vocab: int, d: int, B: int, N: int, S: int):
    """A tiny JanusBart with adversarial LayerNorms and peaked logits, and a padded batch with
    long targets (the model's own weights: each case picks its leaves)."""
    from transformers import BartConfig
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = BartConfig(vocab_size=vocab, d_model=d, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
                        max_position_embeddings=max(N, S) + 8, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0)
    model = JanusBart(config, lean_activations=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1 if "embed" not in name else 0.5, generator=g)
            elif "layer_norm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    # Biases of 1.5 before attention make all tokens alike, and attention's q/k
                    # gradients then cancel to noise in any precision (relative errors above 1 in
                    # bf16 for every path alike): 0.5 keeps the whole step measurable. The 1.5 case
                    # is the LayerNorm path's own.
                    w, b = _adversarial_norm(p.numel(), g, bias_std=0.5)
                    p.copy_(w)
                    model.get_parameter(name[:-len("weight")] + "bias").copy_(b)
        model.final_logits_bias.normal_(0.0, 2.0, generator=g)  # peaked logits
    x = torch.randint(4, vocab - 1, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[0, S // 2:] = 0
    x = torch.where(am.bool(), x, 1)
    y = torch.randint(4, vocab - 1, (B, N), generator=g)
    y[1, N // 3:] = 1
    y[2, N - 5:] = 1
    dm = (torch.rand(B, N, generator=g) < 0.5) & y.ne(1)
    return model, (x, am, y, dm)


class _Head:
    """The lm_head's interface to the chunked losses (``head(None, vocab_loss=fn)`` -> ``fn(weight)``)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.out_features = weight, weight.shape[0]

    def __call__(self, hidden, vocab_loss):
        return vocab_loss(self.weight)


_PLAIN_OBJECTIVE = ObjectiveConfig(preset="janus", loss_chunk_rows=0)


def case_vocab_loss(seed: int = 0, vocab: int = 4096, d: int = 64, B: int = 8, N: int = 48, S: int = 24):
    """The chunked vocabulary losses (64-row chunks) vs the unchunked ones, on the decoder outputs
    of a tiny model: hidden states, lm_head weight and logits bias are the leaves."""
    model, batch = _janus_case(seed, vocab, d, B, N, S)
    with torch.no_grad():
        out = model(*batch, objective=_PLAIN_OBJECTIVE)
    leaves = {"ar": out.ar_hidden, "nar": out.nar_hidden, "aux": out.aux_hidden, "lm_head": model.lm_head.weight.detach()}
    chunked = ObjectiveConfig(preset="janus", loss_chunk_rows=64, loss_chunk_min_vocab=0)

    def loss(objective):
        def f(t):
            from janus.objectives import janus_losses
            head = _Head(t["lm_head"])
            o = copy.copy(out)
            o.ar_hidden, o.nar_hidden, o.aux_hidden = t["ar"], t["nar"], t["aux"]
            o.vocab_head = head
            o.logits_bias = model.final_logits_bias.to(t["ar"].dtype)
            o.logits_fn = lambda h: F.linear(h, t["lm_head"]) + o.logits_bias.to(h.dtype)
            return janus_losses(o, batch[2], objective)["total"]
        return f
    return leaves, {"ours": loss(chunked), "plain": loss(_PLAIN_OBJECTIVE), "reference": loss(_PLAIN_OBJECTIVE)}


def case_janus_bart(seed: int = 0, vocab: int = 4096, d: int = 64, B: int = 8, N: int = 48, S: int = 24):
    """One whole training forward/backward: JanusBart with lean activations and chunked losses
    (ours) vs plain modules with unchunked losses (plain, GPU-like LayerNorms); every parameter."""
    model, batch = _janus_case(seed, vocab, d, B, N, S)
    leaves = {n: p.detach().clone() for n, p in model.named_parameters()}
    lean = JanusBart(model.config, lean_activations=True).eval()
    lean.load_state_dict(model.state_dict())
    chunked = ObjectiveConfig(preset="janus", loss_chunk_rows=64, loss_chunk_min_vocab=0)
    plain = gpu_like(copy.deepcopy(model))

    def loss(m, objective):
        def f(t):
            params = dict(m.named_parameters())
            state = {n: t[n] for n in params}
            buffers = {n: b.to(next(iter(t.values())).dtype) if b.is_floating_point() else b
                       for n, b in m.named_buffers()}
            out = torch.func.functional_call(m, {**state, **buffers}, batch, {"objective": objective})
            return out.loss
        return f
    return leaves, {"ours": loss(lean, chunked), "plain": loss(plain, _PLAIN_OBJECTIVE),
                    "reference": loss(model, _PLAIN_OBJECTIVE)}


CASES: dict[str, Callable] = {"act_linear": case_act_linear, "layer_norm": case_layer_norm, "dropout": case_dropout,
                              "vocab_loss": case_vocab_loss, "janus_bart": case_janus_bart}


# ----------------------------------------------------------------------------- measuring
def _grads(f, leaves: dict[str, torch.Tensor], dtype: torch.dtype, autocast: bool, scale: float) -> dict:
    """Gradients (float64, unscaled) of f at the leaves rounded to ``dtype``."""
    t = {k: v.to(dtype).detach().requires_grad_(True) for k, v in leaves.items()}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = f(t)
    (loss * scale).backward()
    return {k: (v.grad.double() / scale if v.grad is not None else torch.zeros_like(v, dtype=torch.float64))
            for k, v in t.items()}


def _rel(g: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(g).all():
        return math.inf
    return float((g - ref).norm() / ref.norm().clamp_min(1e-300))


def _max_finite_scale(f, leaves, dtype, top: int = 24) -> float:
    for k in range(top, -1, -1):
        g = _grads(f, leaves, dtype, False, 2.0 ** k)
        if all(torch.isfinite(v).all() for v in g.values()):
            return 2.0 ** k
    return 1.0


def measure(case: str, regime: Regime, seed: int = 0) -> dict:
    """Per-gradient relative errors of ours and plain against the float64 reference."""
    leaves, fns = CASES[case](seed=seed)
    rounded = {k: v.to(regime.dtype) for k, v in leaves.items()}
    ref = _grads(fns["reference"], rounded, torch.float64, False, 1.0)
    # Gradients that are zero in exact arithmetic are left out (a key projection's bias: softmax
    # is invariant to it, so its float64 "gradient" is rounding noise, ~1e-17 of the others).
    largest = max(float(v.norm()) for v in ref.values())
    measured = [k for k, v in ref.items() if float(v.norm()) > 1e-9 * largest]
    scale = regime.scale
    if scale == "max":
        scale = _max_finite_scale(fns["plain"], rounded, regime.dtype)
    errs = {}
    for kind in ("ours", "plain"):
        g = _grads(fns[kind], rounded, regime.dtype, regime.autocast, float(scale))
        errs[kind] = {k: _rel(g[k], ref[k]) for k in measured}
    return {"scale": scale, **errs}


def summarise(errs: dict, floor: float) -> dict:
    ours, plain = errs["ours"], errs["plain"]
    ratios = {k: ours[k] / max(plain[k], floor) for k in ours}
    worst = max(ratios, key=ratios.get)
    return {"ours": max(ours.values()), "plain": max(plain.values()), "ratio": ratios[worst], "worst": worst,
            "finite": all(math.isfinite(v) for v in ours.values()), "scale": errs["scale"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--paths", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = {}
    print(f"{'regime':<14} {'path':<11} {'ours':>9} {'plain':>9} {'worst ratio':>11} {'scale':>8}  worst gradient")
    for r in args.regimes:
        regime = REGIMES[r]
        table[r] = {}
        for path in args.paths:
            s = summarise(measure(path, regime, args.seed), FLOORS[regime.dtype])
            table[r][path] = s
            print(f"{r:<14} {path:<11} {s['ours']:9.2e} {s['plain']:9.2e} {s['ratio']:11.2f} {s['scale']:8g}  {s['worst']}",
                  flush=True)
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
