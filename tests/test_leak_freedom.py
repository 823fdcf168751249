"""Leak-freedom (docs/attention.md), checked by perturbation over random shapes, padding and batches."""
import pytest
import torch

from janus.model import JanusBart

from conftest import tiny_bart_config

PAD, VOCAB = 1, 64


def random_batch(gen: torch.Generator, B: int, S: int, N: int):
    src_len = torch.randint(2, S + 1, (B,), generator=gen)
    tgt_len = torch.randint(2, N + 1, (B,), generator=gen)
    input_ids = torch.randint(4, VOCAB - 1, (B, S), generator=gen)
    attention_mask = (torch.arange(S) < src_len[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), input_ids, PAD)
    labels = torch.randint(4, VOCAB - 1, (B, N), generator=gen)
    valid = torch.arange(N) < tgt_len[:, None]
    labels = torch.where(valid, labels, PAD)
    ratio = torch.rand(B, 1, generator=gen) * 0.8 + 0.1
    decoder_mask = (torch.rand(B, N, generator=gen) < ratio) & valid
    return input_ids, attention_mask, labels, decoder_mask


def resample(gen, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """New tokens (always different from the old ones) at ``where``."""
    shift = torch.randint(1, VOCAB - 6, x.shape, generator=gen)
    new = (x - 4 + shift) % (VOCAB - 5) + 4
    return torch.where(where, new, x)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = JanusBart(tiny_bart_config(vocab_size=VOCAB, scale_embedding=True)).double().eval()
    return m


def run(model, *batch):
    with torch.no_grad():
        out = model(*batch)
    return out.ar_logits, out.nar_logits, out.aux_logits, out


def close(a, b):
    return torch.isclose(a, b, rtol=1e-9, atol=1e-9).all(-1)


SHAPES = [(1, 5, 4), (3, 9, 11), (4, 6, 16), (2, 12, 7), (5, 3, 13)]


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_ar_never_sees_current_or_future_targets(model, seed, shape):
    gen = torch.Generator().manual_seed(seed)
    x, am, y, dm = random_batch(gen, *shape)
    B, N = y.shape
    valid = y.ne(PAD)
    cut = (torch.rand(B, generator=gen) * valid.sum(1)).long()
    pos = torch.arange(N).expand(B, N)
    y2 = resample(gen, y, valid & (pos >= cut[:, None]))
    ar1, *_ = run(model, x, am, y, dm)
    ar2, *_ = run(model, x, am, y2, dm)
    before = pos < cut[:, None]
    assert close(ar1, ar2)[before].all()
    # Positive direction: the position right after the cut sees the changed token.
    after = (pos == cut[:, None] + 1) & valid
    assert (~close(ar1, ar2))[after].all()


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_nar_never_sees_masked_targets(model, seed, shape):
    gen = torch.Generator().manual_seed(100 + seed)
    x, am, y, dm = random_batch(gen, *shape)
    _, nar1, _, _ = run(model, x, am, y, dm)
    _, nar2, _, _ = run(model, x, am, resample(gen, y, dm), dm)
    assert close(nar1, nar2)[dm].all()
    # Changing an unmasked token does change NAR predictions.
    unmasked = y.ne(PAD) & ~dm
    if unmasked.any() and dm.any():
        first = unmasked & (unmasked.cumsum(1) == 1)
        _, nar3, _, _ = run(model, x, am, resample(gen, y, first), dm)
        rows = first.any(1)
        assert (~close(nar1, nar3) & dm)[rows].any()


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_aux_sees_only_earlier_masked_targets(model, seed, shape):
    gen = torch.Generator().manual_seed(200 + seed)
    x, am, y, dm = random_batch(gen, *shape)
    B, N = y.shape
    m = dm.sum(1)
    order = torch.where(dm, dm.cumsum(1) - 1, -1)  # masked-order index of each label position
    cut = (torch.rand(B, generator=gen) * (m + 1)).long().clamp(max=m)
    _, _, aux1, _ = run(model, x, am, y, dm)
    _, _, aux2, _ = run(model, x, am, resample(gen, y, dm & (order >= cut[:, None])), dm)
    kept = dm & (order <= cut[:, None])
    assert close(aux1, aux2)[kept].all()
    # Positive direction: AUX at masked k changes when masked token k-1 changes.
    prev = dm & (order == cut[:, None] - 1)
    _, _, aux3, _ = run(model, x, am, resample(gen, y, prev), dm)
    target = dm & (order == cut[:, None]) & prev.any(1, keepdim=True)
    assert (~close(aux1, aux3))[target].all()


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_no_dependence_on_padding_or_other_samples(model, seed, shape):
    gen = torch.Generator().manual_seed(300 + seed)
    x, am, y, dm = random_batch(gen, *shape)
    ar, nar, aux, _ = run(model, x, am, y, dm)
    # Pad contents: source pads replaced by real-looking tokens, decoder_mask set on label pads.
    x_noise = torch.where(am.bool(), x, torch.randint(4, VOCAB - 1, x.shape, generator=gen))
    ar_p, nar_p, aux_p, _ = run(model, x_noise, am, y, dm | y.eq(PAD))
    valid = y.ne(PAD)
    assert close(ar, ar_p)[valid].all() and close(nar, nar_p)[dm].all() and close(aux, aux_p)[dm].all()
    # Each sample alone, trimmed to its own lengths, gives the same logits as in the batch.
    for b in range(y.shape[0]):
        s, n = int(am[b].sum()), int(valid[b].sum())
        ar_b, nar_b, aux_b, _ = run(model, x[b:b + 1, :s], am[b:b + 1, :s], y[b:b + 1, :n], dm[b:b + 1, :n])
        assert close(ar[b, :n], ar_b[0]).all()
        assert close(nar[b, :n], nar_b[0])[dm[b, :n]].all()
        assert close(aux[b, :n], aux_b[0])[dm[b, :n]].all()
