"""Memory-lean pieces of the training forward: what autograd keeps for backward is most of a
step's memory (activations, not weights or logits), so two things it would keep are made smaller.

* ``dropout``: on the CPU ``F.dropout`` keeps its mask as a float tensor of the input's size
  for backward (4 bytes per element); this one keeps a ``bool`` mask (1 byte) drawn straight
  into bool storage with ``bernoulli_``, about 2x faster there. Other devices use ``F.dropout``, whose fused
  kernel already keeps a 1-byte mask.
* ``ActLinear``: BART's ``fc2`` with the FFN activation (and its dropout) folded in, i.e.
  ``fc2(dropout(act(u)))`` from the ``fc1`` output ``u``. Plain autograd keeps both ``u`` (for
  the activation's backward) and ``act(u)`` (for ``fc2``'s weight gradient), two
  ``[tokens, ffn_dim]`` tensors per layer; ``ActLinear`` keeps ``u`` and recomputes ``act(u)``
  in backward (one elementwise pass). ``lean_bart`` swaps it into every encoder and decoder
  layer of a ``BartModel``: the parameters (``fc2.weight``/``fc2.bias``), the state dict and
  the function each layer computes stay the same, so HF's own layer forward still gives
  HF's result.
* ``LeanLayerNorm``: a LayerNorm that keeps its output (which the next linear keeps anyway,
  same storage) and the per-row ``rstd`` instead of its input: backward recovers the
  normalised input as ``(y - bias) / weight``, as memory-efficient LayerNorms do (Apex,
  Megatron-LM). A weight entry of exactly 0 loses that channel's gradient of the weight (the
  division is guarded, nothing becomes NaN). **Only in fp32/fp64**: recovering the input from a
  half-precision output amplifies its rounding by ``|y| / |weight|`` (bf16, weights 0.02-0.05,
  biases ~N(0, 1.5): weight-gradient error 3e-2 against the native kernel's 2e-3), so bf16 and
  fp16 data (DeepSpeed's bf16/fp16 modes, no autocast) get the native LayerNorm's memory and
  accuracy: computed in fp32 and rounded, the input kept (CUDA's own kernel; elsewhere
  ``_Fp32LayerNormFn`` does the same, since the CPU's half-precision LayerNorm accumulates in low
  precision). Under autocast, or without an affine weight, it is the plain LayerNorm: there the
  kept tensors differ anyway (CUDA autocast keeps an fp32 copy of the input either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool, lean: bool = True) -> torch.Tensor:
    """``F.dropout`` with a 1-byte mask kept for backward on the CPU (see the module docstring);
    ``lean=False``: plain ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if not lean or x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p=p, training=True)
    return x.mul(_keep_mask(x, p)).mul_(1.0 / (1.0 - p))


def _keep_mask(u: torch.Tensor, p: float) -> torch.Tensor:
    """A ``bool`` keep-mask (True with probability ``1 - p``) drawn straight into 1-byte storage:
    no ``[tokens, ffn_dim]`` fp32 random tensor in between (hundreds of MB per decoder FFN at GPU
    micro-batches)."""
    return torch.empty(u.shape, dtype=torch.bool, device=u.device).bernoulli_(1.0 - p)


def _act_grad_fn(act: nn.Module):
    """``(grad_out, u) -> grad_u`` by the activation's own backward kernel (no nested autograd call
    inside a backward, which e.g. FLOP counters cannot follow); None for an activation not listed."""
    name = type(act).__name__
    if (name == "GELUActivation" and getattr(act, "act", None) is F.gelu) or (
            isinstance(act, nn.GELU) and act.approximate == "none"):
        return torch.ops.aten.gelu_backward
    if isinstance(act, nn.ReLU):
        return lambda ga, u: ga * (u > 0)
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return torch.ops.aten.silu_backward
    return None


class _ActLinearFn(torch.autograd.Function):
    """``F.linear(dropout(act(u)), weight, bias)``; backward recomputes ``act(u)``."""

    @staticmethod
    def forward(ctx, u, weight, bias, act, p):
        dev = u.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else u.dtype
        with torch.autocast(dev, enabled=False):
            a = act(u)
            keep = _keep_mask(u, p) if p > 0.0 else None
            if keep is not None:
                a = a.mul_(keep).mul_(1.0 / (1.0 - p))
            y = F.linear(a.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
        ctx.save_for_backward(u, weight, keep)
        ctx.act, ctx.p, ctx.cd, ctx.has_bias = act, p, cd, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        u, weight, keep = ctx.saved_tensors
        cd = ctx.cd
        grad_fn = _act_grad_fn(ctx.act)
        with torch.autocast(u.device.type, enabled=False):
            with torch.enable_grad():  # a graph of the recomputation only where no kernel is known
                ud = u.detach().requires_grad_(grad_fn is None)
                a = ctx.act(ud)
            av = a.detach()
            if keep is not None:
                av = av * keep * (1.0 / (1.0 - ctx.p))
            g2 = gy.reshape(-1, gy.shape[-1]).to(cd)
            gw = gb = gu = None
            if ctx.needs_input_grad[1]:
                gw = torch.mm(g2.t(), av.reshape(-1, av.shape[-1]).to(cd)).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g2.sum(0, dtype=torch.promote_types(cd, torch.float32)).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                ga = torch.mm(g2, weight.to(cd)).view(av.shape).to(a.dtype)
                if keep is not None:
                    ga = ga.mul_(keep).mul_(1.0 / (1.0 - ctx.p))
                gu = grad_fn(ga, u) if grad_fn is not None else torch.autograd.grad(a, ud, ga)[0]
        return gu, gw, gb, None, None


class ActLinear(nn.Linear):
    """``fc2(dropout(act(u)))`` from the pre-activation ``u`` (see the module docstring). Without
    autograd (decoding) it is the three plain ops."""

    def __init__(self, linear: nn.Linear, act: nn.Module, dropout_p: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.act, self.dropout_p = act, float(dropout_p)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if not torch.is_grad_enabled() or not (u.requires_grad or self.weight.requires_grad):
            return F.linear(dropout(self.act(u), p, self.training), self.weight, self.bias)
        return _ActLinearFn.apply(u, self.weight, self.bias, self.act, p)


class _LeanLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, _, rstd = torch.native_layer_norm(x, weight.shape, weight, bias, eps)
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, w, b, rstd = ctx.saved_tensors
        safe_w = torch.where(w == 0, torch.ones_like(w), w)
        xhat = (y - b) / safe_w if b is not None else y / safe_w
        rows = tuple(range(gy.dim() - 1))
        gw = (gy * xhat).sum(rows) if ctx.needs_input_grad[1] else None
        gb = gy.sum(rows) if b is not None and ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            g = gy * w
            gx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return gx, gw, gb, None


class _Fp32LayerNormFn(torch.autograd.Function):
    """LayerNorm of half-precision data computed in fp32 and rounded, forward and backward: what
    CUDA's native kernel does (the CPU's own half-precision LayerNorm accumulates in low precision).
    Keeps what the native op keeps: the input in its own dtype and fp32 mean / rstd per row."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        w32, b32 = weight.float(), None if bias is None else bias.float()
        y, mean, rstd = torch.native_layer_norm(x.float(), weight.shape, w32, b32, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w, b, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            gy.float(), x.float(), w.shape, mean, rstd, w.float(), None if b is None else b.float(), mask)
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(w.dtype),
                None if gb is None else gb.to(b.dtype), None)


class LeanLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that keeps its output, not its input, for
    backward in fp32/fp64 (see the module docstring); same parameters. Half-precision data keep
    the native op's memory and accuracy (fp32 arithmetic, the input kept)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None, device="meta")
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight is None or len(self.normalized_shape) != 1 or not torch.is_grad_enabled()
                or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x)
        if x.dtype in (torch.float16, torch.bfloat16):
            if x.device.type == "cuda":  # the native kernel computes in fp32 and rounds
                return super().forward(x)
            return _Fp32LayerNormFn.apply(x, self.weight, self.bias, self.eps)
        return _LeanLayerNormFn.apply(x, self.weight, self.bias, self.eps)


_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")


def lean_bart(bart: nn.Module) -> None:
    """Swap ``ActLinear`` into every encoder/decoder layer of a ``BartModel`` (the layer's
    activation becomes the identity and its activation dropout 0, both moved into fc2), and
    ``LeanLayerNorm`` for its LayerNorms (idempotent; same parameters and state dict)."""
    for stack in (bart.encoder, bart.decoder):
        if not isinstance(stack.layernorm_embedding, LeanLayerNorm):
            stack.layernorm_embedding = LeanLayerNorm(stack.layernorm_embedding)
        for layer in stack.layers:
            for name in _NORMS:
                norm = getattr(layer, name, None)
                if isinstance(norm, nn.LayerNorm) and not isinstance(norm, LeanLayerNorm):
                    setattr(layer, name, LeanLayerNorm(norm))
            if isinstance(layer.fc2, ActLinear):
                continue
            layer.fc2 = ActLinear(layer.fc2, layer.activation_fn, layer.activation_dropout)
            layer.activation_fn = nn.Identity()
            layer.activation_dropout = 0.0
