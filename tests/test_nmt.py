"""NMT from scratch (finetune/nmt.py), Multi-Task NAT, the joint BPE, parallel-data errors."""
import json
import random

import numpy as np
import pytest
import torch

from finetune.data import DataFormatError, poisson_span_mask
from finetune.nmt import NMTConfig, NMTDataConfig, NMTModelConfig, load_bpe, read_parallel, train_joint_bpe
from janus.decoding import MaskPredictConfig, mask_predict
from janus.export import model_from_state
from janus.model import JanusBart
from janus.multitask_nat import MultiTaskNAT, importance_lambda
from janus.objectives import ObjectiveConfig

from conftest import tiny_bart_config
from e2e import WORDS, read_metrics, torchrun

GERMAN = ["Ich habe am ursprünglichen Entwurf ein paar Änderungen vorgenommen.",
          "Es gibt sie in den unterschiedlichsten Varianten.", "Das Abendessen hat mir geschmeckt.",
          "Größe, Maß und Gewicht – „alles“ stimmt!", "Er köpfte den Abpraller ein."]
ENGLISH = ["I've made one or two modifications to the original design.", "They come in all shapes and sizes.",
           "I enjoyed my supper.", "Size, measure and weight – 'all' fits!", "He headed in the rebound."]


def write_parallel(path, n_train=300, n_test=12, seed=0):
    """"German" = each English word reversed: a word-by-word translation task a tiny model learns."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_test), ("test", n_test)):
        en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        (path / f"{split}.en").write_text("\n".join(en) + "\n")
        (path / f"{split}.de").write_text("\n".join(" ".join(w[::-1] for w in s.split()) for s in en) + "\n")
    return path


def test_joint_bpe_round_trip_and_layout(tmp_path):
    tok = train_joint_bpe(GERMAN * 20, ENGLISH * 20, 400, str(tmp_path / "bpe"))
    again = load_bpe(str(tmp_path / "bpe"))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1 == again.mask_token_id
    for text in GERMAN + ENGLISH + ["Ünbekannte Wörter: ßøæ 北京 ✓"]:
        ids = again(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        assert again.decode(ids, skip_special_tokens=True) == text
        assert ids == tok(text)["input_ids"]
    # Joint: merges were learned on both sides (words of either language take fewer pieces than bytes).
    for word in ("Änderungen", "modifications"):
        assert len(again(word)["input_ids"]) - 2 < len(word.encode()) - 4


def test_parallel_data_errors_name_the_files(tmp_path):
    cfg = NMTDataConfig(dir=str(tmp_path), src_lang="de", tgt_lang="en")
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        read_parallel(cfg, "train")
    (tmp_path / "train.en").write_text("a\n\nc\n")
    with pytest.raises(DataFormatError, match=r"train\.en:2: empty line"):
        read_parallel(cfg, "train")
    with pytest.raises(FileNotFoundError, match=r"test\.de"):
        read_parallel(cfg, "test")
    (tmp_path / "valid.de").write_bytes(b"gut\n\xff\n")
    (tmp_path / "valid.en").write_text("good\nbad\n")
    with pytest.raises(DataFormatError, match=r"valid\.de:2: invalid UTF-8"):
        read_parallel(cfg, "valid")
    (tmp_path / "valid.de").write_text("gut\n\n")  # empty lines are errors in every split, not only train
    with pytest.raises(DataFormatError, match=r"valid\.de:2: empty line"):
        read_parallel(cfg, "valid")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="model.arch"):
        NMTConfig(model=NMTModelConfig(arch="nope"))
    with pytest.raises(ValueError, match="mtnat"):
        NMTConfig(system="mtnat", objective=ObjectiveConfig.from_preset("paper"))
    with pytest.raises(ValueError, match="masking"):
        NMTConfig(data=NMTDataConfig(masking="random"))
    cfg = NMTConfig(objective=ObjectiveConfig.from_preset("aux"))
    assert cfg.decode_modes() == (True, True)  # AUX is decoded both ways (paper Table 6)
    assert NMTConfig(objective=ObjectiveConfig.from_preset("ar")).decode_modes() == (True, False)
    assert NMTConfig(system="mtnat", objective=ObjectiveConfig.from_preset("cmlm")).decode_modes() == (False, True)


def test_poisson_span_masks_are_pure_spans_inside_targets():
    lengths = np.array([5, 12, 30, 1, 2] * 400)
    epochs, ids = np.zeros(len(lengths), np.int64), np.arange(len(lengths))
    m = poisson_span_mask(lengths, 30, 3, epochs, ids)
    counts = m.sum(1)
    assert ((counts >= 1) & (counts <= lengths)).all()
    assert not (m & (np.arange(30) >= lengths[:, None])).any()
    again = poisson_span_mask(lengths[::-1].copy(), 30, 3, epochs, ids[::-1].copy())[::-1]
    assert (again == m).all()  # a sample's mask depends on (seed, epoch, id) only
    assert not (poisson_span_mask(lengths, 30, 3, epochs + 1, ids) == m).all()
    long = m[lengths == 30]
    assert abs(long.sum(1).mean() / 30 - 0.5) < 0.05  # ratio ~ U(0, 1]
    # Contiguous runs are longer than single tokens (Poisson(2) spans, >= 1 each).
    runs = [len(r) for row in long[:200] for r in "".join("1" if x else "0" for x in row).split("0") if r]
    assert np.mean(runs) > 1.8


def test_importance_lambda_schedule():
    assert importance_lambda(0, 100) == 0.0
    assert importance_lambda(50, 100) == 0.5
    assert importance_lambda(100, 100) == 1.0
    assert importance_lambda(150, 100) == 1.0
    assert importance_lambda(10, 100, fixed=0.5) == 0.5
    with pytest.raises(ValueError):
        importance_lambda(1, 10, fixed=1.5)


def _batch(vocab=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, vocab - 1, (3, 7), generator=g)
    y = torch.randint(4, vocab - 1, (3, 6), generator=g)
    y[0, 4:] = 1
    dm = torch.rand(3, 6, generator=g) < 0.5
    dm[:, 1] = True
    return x, torch.ones_like(x), y, dm, torch.tensor([4, 6, 6])


def test_multitask_nat_shares_encoder_and_weights_losses():
    torch.manual_seed(0)
    config = tiny_bart_config(decoder_start_token_id=2, dropout=0.0)
    model = MultiTaskNAT(config, length_classes=16)
    assert model.at.model.encoder is model.nat.model.encoder
    assert model.at.lm_head.weight is model.nat.model.shared.weight
    at_only = set(model.at_decoder_keys())
    assert at_only and all(k.startswith("at.model.decoder.") for k in at_only)
    assert not any(".encoder." in k for k in at_only)
    x, am, y, dm, lt = _batch()
    outs = {lam: model(x, am, y, dm, length_targets=lt, lam=lam) for lam in (0.0, 0.3, 1.0)}
    l0, l1 = outs[0.0].losses, outs[1.0].losses
    assert torch.allclose(l0["total"], l0["at"]) and torch.allclose(l1["total"], l1["nat"])
    assert torch.allclose(l1["nat"], l1["nar"] + 0.1 * l1["length"])
    mid = outs[0.3].losses
    assert torch.allclose(mid["total"], 0.3 * mid["nat"] + 0.7 * mid["at"])
    # lambda = 0: only the AT decoder (and the shared encoder) learn; lambda = 1: only the NAT side.
    for lam, learns, frozen in ((0.0, model.at, model.nat), (1.0, model.nat, model.at)):
        model.zero_grad(set_to_none=True)
        model(x, am, y, dm, length_targets=lt, lam=lam).loss.backward()
        assert learns.model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0
        g = frozen.model.decoder.layers[0].fc1.weight.grad
        assert g is None or g.abs().sum() == 0
        assert model.nat.model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_multitask_nat_export_drops_at_decoder_and_decodes_with_nat(tmp_path):
    torch.manual_seed(0)
    config = tiny_bart_config(decoder_start_token_id=2, dropout=0.0)
    model = MultiTaskNAT(config, length_classes=16).eval()
    meta = {"bart_config": config.to_dict(), "janus": model.janus_config(), "export_prefix": "nat."}
    exported = model_from_state(model.state_dict(), meta)
    assert set(exported.state_dict()) == set(model.nat.state_dict())
    exported.save_pretrained(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert not any(k.startswith("at.") for k in saved)
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in model.parameters())
    loaded = JanusBart.from_bart(str(tmp_path / "final")).eval()
    x, am, *_ = _batch()
    cfg = MaskPredictConfig(iterations=2, length_candidates=3, max_len=12)
    reference = mask_predict(model.nat, x, am, cfg)
    with torch.no_grad():  # the AT decoder plays no part in decoding
        for p in model.at.model.decoder.parameters():
            p.add_(1.0)
    for tokens, score in (mask_predict(model.nat, x, am, cfg), mask_predict(loaded, x, am, cfg)):
        assert torch.equal(tokens, reference[0]) and torch.allclose(score, reference[1], atol=1e-5)


def nmt_run(data, save, extra, steps=30):
    return torchrun("finetune/nmt.py", [
        "--data.dir", str(data), "--model.arch", "tiny", "--model.d_model", "48", "--data.vocab_size", "300",
        "--data.max_source_length", "24", "--data.max_target_length", "24", "--run.max_steps", str(steps),
        "--run.micro_batch_size", "16", "--run.save_every", str(steps // 6), "--run.log_every", "5",
        "--optim.lr", "3e-3", "--optim.warmup_steps", "5", "--run.save_dir", str(save), "--eval.iterations", "0,2",
        "--eval.batch_size", "8", *extra])


@pytest.mark.slow
def test_nmt_janus_and_multitask_nat_train_on_two_ranks(tmp_path):
    data = write_parallel(tmp_path / "data")
    save = tmp_path / "janus"
    proc = nmt_run(data, save, ["--objective.preset", "paper", "--run.eval_every", "15"])
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = read_metrics(save)
    for term in ("ar", "nar", "aux", "length"):
        assert rows[30][f"loss/{term}"] < rows[5][f"loss/{term}"]
    assert last["finished"] and len(last["averaged_checkpoints"]) == 5
    assert set(last["bleu"]) == {"ar_beam5", "nar_T0", "nar_T2"} and "tok:13a" in last["signature"]
    assert "sacreBLEU signature" in proc.stdout
    assert (save / "tokenizer" / "tokenizer.json").exists() and (save / "final" / "tokenizer.json").exists()
    assert len((save / "test.nar_T2.hyp").read_text().splitlines()) == 12
    assert [json.loads(line)["step"] for line in open(save / "eval.jsonl")] == [15, 30]
    # Multi-Task NAT on the same data and BPE: lambda_t = t/T is logged; export keeps the NAT model only.
    mt = tmp_path / "mtnat"
    proc = nmt_run(data, mt, ["--system", "mtnat", "--data.tokenizer", str(save / "tokenizer")], steps=12)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last["bleu"]) == {"nar_T0", "nar_T2"}
    rows = read_metrics(mt)
    lambdas = [rows[s]["loss/lambda"] for s in (5, 10)]
    assert lambdas == pytest.approx([2 / 12, 7 / 12])  # mean of t/T over steps t = 0..4 and 5..9
    from safetensors.torch import load_file

    saved = load_file(str(mt / "final" / "model.safetensors"))
    assert saved and not any(k.startswith(("at.", "nat.")) for k in saved)


def test_span_masked_batches_train_every_pattern(tmp_path):
    from finetune.data import PairBatches, tokenize
    from finetune.nmt import NMTConfig, bart_config

    tok = train_joint_bpe(GERMAN * 20, ENGLISH * 20, 400, str(tmp_path / "bpe"))
    src, tgt = tokenize(tok, GERMAN, 32, "src"), tokenize(tok, ENGLISH, 32, "tgt")
    data = PairBatches(src, tgt, tok.pad_token_id, 0, True, 32, masker="span")
    batch = data[np.array([[0, 0, 0], [0, 2, 4]])]
    valid = batch["labels"].ne(tok.pad_token_id)
    assert (batch["decoder_mask"] <= valid).all() and (batch["decoder_mask"].sum(1) >= 1).all()
    assert torch.equal(batch["length_targets"], valid.sum(1))
    with pytest.raises(ValueError, match="masking"):
        PairBatches(src, tgt, tok.pad_token_id, 0, True, 32, masker="poisson")
    cfg = NMTConfig(model=NMTModelConfig(arch="tiny"))
    torch.manual_seed(0)
    model = JanusBart(bart_config(cfg, tok), mask_token_id=tok.mask_token_id, length_classes=33)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["decoder_mask"],
                objective=ObjectiveConfig.from_preset("paper"), length_targets=batch["length_targets"])
    assert torch.isfinite(out.loss) and {"ar", "nar", "aux", "length"} <= set(out.losses)
