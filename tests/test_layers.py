"""janus.layers: the 1-byte-mask dropout and the FFN with its activation recomputed in backward
give the plain modules' values and gradients while keeping less for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartModel
from transformers.activations import ACT2FN

from janus.layers import ActLinear, LeanLayerNorm, dropout, lean_bart
from janus.model import JanusBart

from conftest import tiny_bart_config


def _saved(fn):
    """(shape, dtype) of every tensor autograd keeps for backward while running fn()."""
    kept = []

    def pack(t):
        kept.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


def _same_gradients(out, ref, pairs, rtol=1e-5, atol=1e-6):
    """Backpropagate one random gradient through ``out`` and ``ref``; compare (mine, theirs) grads."""
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=rtol, atol=atol)
    return g


def test_dropout_keeps_a_bool_mask_and_scales_like_f_dropout():
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(0)
    y, kept = _saved(lambda: dropout(x, 0.25, True))
    assert [d for s, d in kept if s == (64, 128)] == [torch.bool]
    keep = y.detach() != 0
    torch.testing.assert_close(y[keep], x.detach()[keep] / 0.75)
    assert 0.65 < keep.float().mean() < 0.85
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    # Off in eval, and at p = 0 / p = 1 as F.dropout.
    assert dropout(x, 0.25, False) is x and dropout(x, 0.0, True) is x
    assert dropout(x, 1.0, True).abs().sum() == 0


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("act_name", ["gelu", "relu", "silu", "tanh"])  # tanh: the autograd fallback
def test_act_linear_matches_the_plain_ffn_tail_and_keeps_no_activation_output(act_name, p):
    torch.manual_seed(0)
    fc2 = nn.Linear(48, 16)
    act = ACT2FN[act_name]
    u = torch.randn(3, 7, 48, requires_grad=True)
    ref_fc2 = copy.deepcopy(fc2)
    fused = ActLinear(fc2, act, p).train()
    assert fused.weight is fc2.weight and fused.bias is fc2.bias

    torch.manual_seed(1)
    u_ref = u.detach().clone().requires_grad_(True)
    ref, kept_ref = _saved(lambda: ref_fc2(dropout(act(u_ref), p, True)))
    torch.manual_seed(1)
    out, kept = _saved(lambda: fused(u))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    _same_gradients(out, ref, [(u, u_ref), (fused.weight, ref_fc2.weight), (fused.bias, ref_fc2.bias)])
    # What is kept: u once (float) and, with dropout, a bool mask; never act(u).
    big_float = [d for s, d in kept if s == (3, 7, 48) and d.is_floating_point]
    big_float_ref = [d for s, d in kept_ref if s in ((3, 7, 48), (21, 48)) and d.is_floating_point]
    assert len(big_float) == 1 and len(big_float_ref) >= 2
    # Without autograd it is the plain function (decoding).
    with torch.no_grad():
        fused.eval()
        torch.testing.assert_close(fused(u), ref_fc2(act(u)))


def test_act_linear_under_bf16_autocast_tracks_fp32():
    torch.manual_seed(0)
    fc2 = nn.Linear(64, 32)
    fused = ActLinear(fc2, ACT2FN["gelu"], 0.0)
    u = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref_u = u.detach().clone().requires_grad_(True)
    ref = F.linear(F.gelu(ref_u), fc2.weight.detach().clone(), fc2.bias.detach().clone())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    ref.sum().backward()
    torch.testing.assert_close(u.grad, ref_u.grad, rtol=5e-2, atol=5e-2)
    assert fused.weight.grad.dtype == torch.float32


def test_fused_bart_keeps_its_state_dict_and_hf_function_in_training():
    """lean_bart leaves the parameters, the state dict and HF's own layer forward as they were
    (dropout off for an exact comparison): values and gradients equal the unfused model's."""
    torch.manual_seed(0)
    config = tiny_bart_config(dropout=0.0, activation_dropout=0.0)
    ref = BartModel(config).train()
    fused = copy.deepcopy(ref)
    lean_bart(fused)
    lean_bart(fused)  # idempotent
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert all(isinstance(layer.fc2, ActLinear) for layer in [*fused.encoder.layers, *fused.decoder.layers])
    x = torch.randint(4, 60, (2, 9))
    y = torch.randint(4, 60, (2, 6))
    r = torch.randn(2, 6, config.d_model)  # a random projection (sum of squares of a LayerNorm output is ~constant)
    outs = []
    for m in (ref, fused):
        out = m(input_ids=x, decoder_input_ids=y).last_hidden_state
        (out * r).sum().backward()
        outs.append((out, {k: p.grad for k, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for k, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][k], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()), msg=k)


def test_janus_encoder_gradients_match_hf_encoder():
    torch.manual_seed(0)
    config = tiny_bart_config(dropout=0.0, scale_embedding=True)
    hf = BartModel(config).train()
    model = JanusBart(config, bart=copy.deepcopy(hf)).train()
    x = torch.randint(4, 60, (3, 11))
    am = torch.ones_like(x)
    am[1, 8:] = 0
    ref = hf.encoder(input_ids=x, attention_mask=am).last_hidden_state
    out = model.encode(x, am)
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    r = torch.randn_like(out)
    (ref * r)[valid].sum().backward()
    (out * r)[valid].sum().backward()
    for (k, p), (_, q) in zip(hf.encoder.named_parameters(), model.model.encoder.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * max(1.0, p.grad.abs().max().item()), msg=k)
    # With gradient checkpointing the encoder gives the same result.
    model.zero_grad()
    model.gradient_checkpointing = True
    out2 = model.encode(x, am)
    torch.testing.assert_close(out2, out)


def test_lean_layer_norm_matches_layer_norm_and_keeps_no_input():
    torch.manual_seed(0)
    ref = nn.LayerNorm(24)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    lean = LeanLayerNorm(copy.deepcopy(ref))
    x = (torch.randn(4, 5, 24) * 3 + 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, kept = _saved(lambda: lean(x))
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    assert sum(1 for s, d in kept if s == (4, 5, 24)) == 1  # the output only, not the input too
    g = _same_gradients(y, y_ref, [(x, x_ref), (lean.weight, ref.weight), (lean.bias, ref.bias)], atol=1e-5)
    # A zero weight entry: everything stays finite, the other channels' gradients are exact.
    with torch.no_grad():
        lean.weight[3] = 0.0
    lean.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    lean(x2).backward(g)
    assert torch.isfinite(x2.grad).all() and torch.isfinite(lean.weight.grad).all()
    # Under autocast and without autograd it is the plain LayerNorm.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean(x.bfloat16()).dtype == torch.bfloat16


def _saved_bytes_and_grads(model, batch, objective):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch, objective=objective)
    out.loss.backward()
    kept = sum(n for ptr, n in seen.items() if ptr not in params)
    return kept, out.losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lean_activations_keep_less_for_backward_with_the_same_losses_and_gradients(dropout_p):
    from janus.objectives import ObjectiveConfig
    torch.manual_seed(0)
    config = tiny_bart_config(d_model=64, dropout=dropout_p, activation_dropout=dropout_p)
    lean = JanusBart(config).train()
    plain = JanusBart(config, bart=copy.deepcopy(BartModel(config)), lean_activations=False).train()
    plain.load_state_dict(lean.state_dict())
    assert not any(isinstance(m, (ActLinear, LeanLayerNorm)) for m in plain.modules())
    x = torch.randint(4, 60, (3, 20))
    y = torch.randint(4, 60, (3, 16))
    dm = torch.rand(3, 16) < 0.5
    batch = (x, torch.ones_like(x), y, dm)
    objective = ObjectiveConfig(preset="janus", loss_chunk_rows=0)
    kept_lean, losses_lean, grads_lean = _saved_bytes_and_grads(lean, batch, objective)
    kept_plain, losses_plain, grads_plain = _saved_bytes_and_grads(plain, batch, objective)
    assert kept_lean < 0.8 * kept_plain, (kept_lean, kept_plain)
    if dropout_p == 0.0:  # dropout draws differ between the two, so values are compared without it
        for k, v in losses_plain.items():
            torch.testing.assert_close(losses_lean[k], v, rtol=1e-5, atol=1e-6, msg=k)
        for k, g in grads_plain.items():
            torch.testing.assert_close(grads_lean[k], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()), msg=k)
