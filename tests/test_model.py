import copy

import torch
from transformers import BartConfig, BartForConditionalGeneration, BartModel

from janus.model import JanusBart
from janus.objectives import PRESETS, ObjectiveConfig
from janus.streams import build_streams

from conftest import tiny_bart_config

PAD, MASK, START = 1, 99, 2


def test_attention_table_on_the_papers_example():
    """Paper §3.1: y1..y6 with y2, y3, y5 masked. Expected contexts written out by name."""
    labels = torch.tensor([[11, 12, 13, 14, 15, 16]])
    dm = torch.tensor([[False, True, True, False, True, False]])
    s = build_streams(labels, dm, pad_id=PAD, mask_id=MASK, start_id=START)
    assert s.tokens.shape[0] == 2  # AR half + NAR/AUX half
    # AR half: content [b, y1..y5], queries q1..q6 predicting y1..y6.
    ar_names = ["b", "c1", "c2", "c3", "c4", "c5"] + [f"q{i}" for i in range(1, 7)]
    ar_expected = {f"q{i}": {"b"} | {f"c{j}" for j in range(1, i)} for i in range(1, 7)}
    ar_expected |= {n: set(ar_names[: j + 1]) for j, n in enumerate(ar_names[:6])}
    # NAR/AUX half: [y1 m2 m3 y4 m5 y6 | true y2 y3 y5 | queries for 2 3 5].
    nar_names = ["y1", "m2", "m3", "y4", "m5", "y6", "t2", "t3", "t5", "q2", "q3", "q5"]
    block = {"y1", "m2", "m3", "y4", "m5", "y6"}
    nar_expected = {n: block for n in block}
    nar_expected |= {
        "t2": {"y1", "y4", "y6", "m3", "m5", "t2"},
        "t3": {"y1", "y4", "y6", "m5", "t2", "t3"},  # paper: y3 sees {y1,y4,y6,y2,y3,m5}
        "t5": {"y1", "y4", "y6", "t2", "t3", "t5"},
        "q2": {"y1", "y4", "y6", "m2", "m3", "m5"},
        "q3": {"y1", "y4", "y6", "t2", "m3", "m5"},  # paper: m3 sees {y1,y4,y6,y2,m3,m5}
        "q5": {"y1", "y4", "y6", "t2", "t3", "m5"},  # paper: m5 sees {y1,y4,y6,y2,y3,m5}
    }
    for half, names, expected in ((0, ar_names, ar_expected), (1, nar_names, nar_expected)):
        mask = s.self_mask[half, 0]
        for r, row in enumerate(names):
            got = {names[c] for c in range(len(names)) if mask[r, c]}
            assert got == expected[row], (row, got, expected[row])
    # Position compensation: every token keeps its own position (start at 0, y_i at i).
    assert s.positions[1, :12].tolist() == [1, 2, 3, 4, 5, 6, 2, 3, 5, 2, 3, 5]
    assert s.tokens[1, 6:9].tolist() == [12, 13, 15] and s.tokens[1, 9:12].tolist() == [MASK] * 3
    assert s.positions[0, :12].tolist() == [0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6]


def _random_batch(vocab, B=3, S=8, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab - 1, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[0, S - 3:] = 0
    x = torch.where(am.bool(), x, PAD)
    y = torch.randint(4, vocab - 1, (B, N), generator=g)
    y[1, N - 4:] = PAD
    dm = (torch.rand(B, N, generator=g) < 0.5) & y.ne(PAD)
    return x, am, y, dm


def test_encoder_and_content_stream_match_hf_bart():
    torch.manual_seed(0)
    config = tiny_bart_config(scale_embedding=True, dropout=0.0)
    hf = BartModel(config).eval()
    model = JanusBart(config, bart=copy.deepcopy(hf)).eval()  # the wrapped copy gets janus.layers' fc2
    x, am, y, _ = _random_batch(config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=am, decoder_input_ids=torch.cat(
            [torch.full((3, 1), config.decoder_start_token_id), y[:, :-1]], 1))
        enc = model.encode(x, am)
        torch.testing.assert_close(enc, ref.encoder_last_hidden_state, rtol=0, atol=0)
        # The AR content stream is exactly BART's causal decoder over the shift-right input.
        s = build_streams(y, None, pad_id=PAD, mask_id=config.vocab_size - 1,
                          start_id=config.decoder_start_token_id, ar=True, nar=False, aux=False)
        s.out_rows = torch.arange(y.shape[1]).expand(3, -1)
        content = model.run_decoder(s, enc, am)
    valid = y.ne(PAD)
    torch.testing.assert_close(content[valid], ref.last_hidden_state[valid], rtol=1e-5, atol=1e-5)


def test_export_import_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    config = tiny_bart_config()
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    model = JanusBart.from_bart(str(tmp_path / "bart"), length_classes=17)
    assert model.janus_only_keys == ["length_head.weight", "length_head.bias"]
    model.save_pretrained(str(tmp_path / "export"))
    hf = BartForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert hf.lm_head.weight.data_ptr() == hf.model.shared.weight.data_ptr()
    again = JanusBart.from_bart(str(tmp_path / "export"))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in hf.state_dict().items():
        assert torch.equal(v, a[k]), k
    x, am, y, dm = _random_batch(config.vocab_size)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(x, am, y, dm).aux_logits, again(x, am, y, dm).aux_logits)


def test_bart_base_shaped_config_builds():
    config = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                        decoder_ffn_dim=3072, max_position_embeddings=1024)
    with torch.device("meta"):
        model = JanusBart(config)
    n = sum(p.numel() for p in model.parameters())
    assert 139e6 < n < 141e6, n
    assert model.mask_token_id == 50264


def test_losses_unchanged_by_extra_padding():
    torch.manual_seed(0)
    config = tiny_bart_config()
    model = JanusBart(config).double().eval()
    x, am, y, dm = _random_batch(config.vocab_size)
    for preset in PRESETS:
        obj = ObjectiveConfig.from_preset(preset)
        with torch.no_grad():
            base = model(x, am, y, dm, objective=obj).losses
            px = torch.nn.functional.pad(x, (0, 5), value=PAD)
            pam = torch.nn.functional.pad(am, (0, 5), value=0)
            py = torch.nn.functional.pad(y, (0, 7), value=PAD)
            pdm = torch.nn.functional.pad(dm, (0, 7), value=False)
            padded = model(px, pam, py, pdm, objective=obj).losses
        assert base.keys() == padded.keys()
        for k in base:
            torch.testing.assert_close(base[k], padded[k], rtol=1e-10, atol=1e-10, msg=f"{preset}/{k}")


def test_presets_select_patterns_and_terms():
    assert ObjectiveConfig.from_preset("ar").patterns() == ("ar",)
    assert ObjectiveConfig.from_preset("cmlm").patterns() == ("nar",)
    assert ObjectiveConfig.from_preset("aux").patterns() == ("aux",)
    assert ObjectiveConfig.from_preset("ar+nar+kl").patterns() == ("ar", "nar")
    assert ObjectiveConfig.from_preset("paper").patterns() == ("ar", "nar", "aux")
    torch.manual_seed(0)
    config = tiny_bart_config()
    model = JanusBart(config).eval()
    x, am, y, dm = _random_batch(config.vocab_size)
    with torch.no_grad():
        paper = model(x, am, y, dm, objective=ObjectiveConfig.from_preset("paper")).losses
        kl = model(x, am, y, dm, objective=ObjectiveConfig.from_preset("ar+nar+kl")).losses
    assert {"ar", "nar", "aux", "kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar"} <= paper.keys()
    expected = sum(paper[k] for k in ("ar", "nar", "aux", "kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar"))
    torch.testing.assert_close(paper["total"], expected)
    assert "aux" not in kl and {"kl_ar_nar", "kl_nar_ar"} <= kl.keys()
    # Independent check of one KL term and the smoothed CE from the full logits.
    with torch.no_grad():
        out = model(x, am, y, dm)
    lp_ar = out.ar_logits.log_softmax(-1)[dm]
    lp_aux = out.aux_logits.log_softmax(-1)[dm]
    kl_ref = torch.nn.functional.kl_div(lp_aux, lp_ar, log_target=True, reduction="batchmean")
    torch.testing.assert_close(paper["kl_ar_aux"], kl_ref, rtol=1e-5, atol=1e-6)
    kl_rev = torch.nn.functional.kl_div(lp_ar, lp_aux, log_target=True, reduction="batchmean")
    torch.testing.assert_close(paper["kl_aux_ar"], kl_rev, rtol=1e-5, atol=1e-6)
    lp_nar = out.nar_logits.log_softmax(-1)[dm]
    kl_nar = torch.nn.functional.kl_div(lp_nar, lp_aux, log_target=True, reduction="batchmean")
    torch.testing.assert_close(paper["kl_aux_nar"], kl_nar, rtol=1e-5, atol=1e-6)
    ce_ref = torch.nn.functional.cross_entropy(out.nar_logits[dm], y[dm], label_smoothing=0.1)
    torch.testing.assert_close(paper["nar"], ce_ref, rtol=1e-5, atol=1e-6)


def test_overfits_a_fixed_batch_with_the_janus_preset():
    torch.manual_seed(0)
    config = tiny_bart_config(d_model=64, dropout=0.0, attention_dropout=0.0)
    model = JanusBart(config)
    x, am, y, dm = _random_batch(config.vocab_size, B=4, S=10, N=12, seed=3)
    obj = ObjectiveConfig.from_preset("janus", label_smoothing=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        losses = model(x, am, y, dm, objective=obj).losses
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], history[-1]
    for term in ("ar", "nar", "aux"):
        assert last[term] < 0.1 * first[term], (term, first[term], last[term])
    for term in ("kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar"):
        peak = max(h[term] for h in history)
        assert last[term] < 0.5 * peak, (term, peak, last[term])
    assert last["total"] < 0.1 * first["total"]


def test_key_spans_change_no_real_output_and_keep_pad_rows_finite():
    """Keys/values only over each half's attended prefix (``key_spans``) give the same states as
    attending every column, at every real output row, for every pattern subset; pad rows stay finite
    and the gradients finite (NaN rows would poison them through 0 * NaN)."""
    import dataclasses

    torch.manual_seed(0)
    config = tiny_bart_config(dropout=0.0)
    model = JanusBart(config).double()
    x, am, y, dm = _random_batch(config.vocab_size, N=12)
    enc = model.encode(x, am)
    for ar, nar, aux in [(1, 1, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 0)]:
        s = build_streams(y, dm, pad_id=PAD, mask_id=config.vocab_size - 1, start_id=START, ar=bool(ar),
                          nar=bool(nar), aux=bool(aux))
        assert s.key_spans and s.key_spans[-1][1] == s.tokens.shape[0]
        full = model.run_decoder(dataclasses.replace(s, key_spans=()), enc, am)
        spans = model.run_decoder(s, enc, am)
        assert torch.isfinite(spans).all()
        real = s.segments.gather(1, s.out_rows) != 6  # segment PAD = 6
        torch.testing.assert_close(spans[real], full[real], rtol=1e-10, atol=1e-10)
    model.train()
    out = model(x, am, y, dm, objective=ObjectiveConfig.from_preset("janus"))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
