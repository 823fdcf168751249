"""janus.flops: hand count, an independent count of the executed matmuls, scaling, peak table."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import BartConfig, BartForConditionalGeneration

from janus.flops import PEAK_TFLOPS, bart_step_flops, janus_step_flops, peak_tflops_for
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig

from conftest import tiny_bart_config


def _config(**kw):
    base = dict(vocab_size=10, d_model=4, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32)
    return BartConfig(**{**base, **kw})


def test_hand_count_tiny_config():
    # D=4, F=8, one encoder and one decoder layer, V=10; B=1, S=3 (2 non-pad), N=2, M=1,
    # 2 target tokens, 1 masked; all three patterns.
    flops = janus_step_flops(_config(), batch_size=1, src_tokens=2, src_len=3, tgt_len=2, n_tokens=2, n_masked=1,
                             num_masked_max=1)
    # Encoder, per token: q,k,v,o 4*16=64 + FFN 2*4*8=64 + scores/values 2*3*4=24 = 152 MACs; 2 tokens.
    enc = 2 * 152
    # Cross-attention keys/values: 1 layer x 3 source slots x 2*16.
    cross_kv = 3 * 32
    # The single decoder layer is the last one: keys/values of the key tokens (2*16 each), then per
    # output row q,o 32 + self scores/values 2*keys*4 + cross q,o 32 + cross scores/values 2*3*4 + FFN 64.
    # AR half: 4 tokens (2 content + 2 query), 2 output rows (queries), 2 keys (the content slots).
    ar = 2 * 32 + 2 * (32 + 2 * 2 * 4 + 32 + 24 + 64)
    # NAR/AUX half: N + 2M = 4 tokens, output rows M (NAR) + M (AUX) = 2, 3 keys (N block + true token).
    nar = 3 * 32 + 2 * (32 + 2 * 3 * 4 + 32 + 24 + 64)
    # Vocabulary: 2 AR + 1 NAR + 1 AUX logit rows x D*V = 40.
    vocab = 4 * 40
    assert flops == 3 * 2 * (enc + cross_kv + ar + nar + vocab)
    # NAR only: the half is just the N-token block, 1 output row, no AR, 1 logit row.
    nar_only = janus_step_flops(_config(), patterns=("nar",), batch_size=1, src_tokens=2, src_len=3, tgt_len=2,
                                n_tokens=2, n_masked=1, num_masked_max=1)
    assert nar_only == 3 * 2 * (enc + cross_kv + 2 * 32 + 1 * (32 + 2 * 2 * 4 + 32 + 24 + 64) + 40)


def test_bart_hand_count():
    # B=1, S=3, N=2: per decoder token q,k,v,o 64 + self 2*2*4 + cross q,o 32 + cross 2*3*4 + FFN 64; logits 40.
    enc = 3 * (64 + 64 + 2 * 3 * 4)
    dec = 2 * (64 + 16 + 32 + 24 + 64) + 3 * 32 + 2 * 40
    assert bart_step_flops(_config(), 3, 2) == 3 * 2 * (enc + dec)


def test_scaling():
    cfg = tiny_bart_config(vocab_size=500, d_model=32)
    sizes = dict(batch_size=2, src_tokens=20, src_len=10, tgt_len=8, n_tokens=16, n_masked=6, num_masked_max=3)
    one = janus_step_flops(cfg, **sizes)
    # Twice the samples (same lengths): exactly twice the FLOPs.
    two = janus_step_flops(cfg, **{**sizes, "batch_size": 4, "src_tokens": 40, "n_tokens": 32, "n_masked": 12})
    assert two == 2 * one
    # The vocabulary term is linear in V over exactly the logit rows (16 AR + 6 NAR + 6 AUX).
    big = janus_step_flops(tiny_bart_config(vocab_size=1500, d_model=32), **sizes)
    assert big - one == 6 * (16 + 6 + 6) * 32 * 1000
    # Fewer patterns, fewer FLOPs; one more masked logit row adds 2 vocabulary rows.
    assert janus_step_flops(cfg, patterns=("ar",), **sizes) < janus_step_flops(cfg, patterns=("ar", "nar"), **sizes) < one
    assert janus_step_flops(cfg, **{**sizes, "n_masked": 7}) - one == 6 * 2 * 32 * 500
    # bart-base dims, 2 x 512, half the targets masked: JANUS costs ~2.2-2.6 plain BART steps
    # (~4N decoder rows of which 2N + 2M produce attention rows, vs N).
    base = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072,
                      decoder_ffn_dim=3072)
    j = janus_step_flops(base, batch_size=2, src_tokens=1024, src_len=512, tgt_len=512, n_tokens=1024, n_masked=512,
                         num_masked_max=256)
    b = bart_step_flops(base, 1024, 1024, batch_size=2)
    assert 2.0 < j / b < 2.8, j / b


def test_batch_argument_reads_the_cpu_batch():
    cfg = tiny_bart_config()
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])
    dm = torch.tensor([[True, False, True, False], [True, False, False, False]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": am, "labels": labels,
             "decoder_mask": dm}
    explicit = janus_step_flops(cfg, batch_size=2, src_tokens=5, src_len=3, tgt_len=4, n_tokens=5, n_masked=3,
                                num_masked_max=2)
    assert janus_step_flops(cfg, batch=batch) == explicit
    # Host-side ints in the batch win over recounting; explicit keywords win over both.
    assert janus_step_flops(cfg, batch={**batch, "n_masked": 2}) < explicit
    assert janus_step_flops(cfg, batch=batch, n_masked=3) == explicit
    with pytest.raises(ValueError, match="missing"):
        janus_step_flops(cfg, batch_size=2)


def _cpu_sdpa_mapping():
    """FlopCounterMode does not count CPU SDPA kernels; map them to torch's own SDPA formula.
    Backward = 2 x forward (the PaLM convention; torch's backward formula also counts the
    flash kernel's recomputation of the scores, 2.5 x)."""
    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        assert sdpa_backward_flop_count(grad_out, q, k, v) == 2.5 * sdpa_flop_count(q, k, v)
        return 2 * sdpa_flop_count(q, k, v)

    def addmm_(acc, a, b, *args, out_shape=None, **kwargs):  # in-place addmm is not in torch's table
        return 2 * a[0] * a[1] * b[1]

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd, aten.addmm_: addmm_}


@pytest.mark.parametrize("chunk_rows", [0, 4])
@pytest.mark.parametrize("preset,patterns", [("paper", ("ar", "nar", "aux")), ("ar", ("ar",)), ("cmlm", ("nar",)),
                                             ("aux", ("aux",))])
def test_matches_the_executed_matmuls(preset, patterns, chunk_rows):
    """An independent count: torch's FlopCounterMode over a real forward + backward. Shapes are
    chosen so no padding is computed (no source padding; AR half 2N = NAR/AUX half N + 2M)."""
    torch.manual_seed(0)
    cfg = tiny_bart_config(vocab_size=101, d_model=32, dropout=0.0)
    model = JanusBart(cfg)
    B, S, N, M = 2, 8, 6, 3
    x = torch.randint(4, 99, (B, S))
    am = torch.ones(B, S, dtype=torch.long)
    y = torch.randint(4, 99, (B, N))
    y[1, -1] = cfg.pad_token_id  # padded targets are fine: only valid rows make logits
    dm = torch.zeros(B, N, dtype=torch.bool)
    dm[0, :M] = True
    dm[1, 1:4] = True
    objective = ObjectiveConfig(preset=preset, loss_chunk_rows=chunk_rows, loss_chunk_min_vocab=0)
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        model(x, am, y, dm, objective=objective).loss.backward()
    batch = {"input_ids": x, "attention_mask": am, "labels": y, "decoder_mask": dm}
    assert janus_step_flops(cfg, batch=batch, patterns=patterns) == counter.get_total_flops()


def test_bart_matches_the_executed_matmuls():
    torch.manual_seed(0)
    cfg = tiny_bart_config(vocab_size=101, d_model=32, dropout=0.0)
    hf = BartForConditionalGeneration(cfg)
    x, y = torch.randint(4, 99, (2, 8)), torch.randint(4, 99, (2, 6))
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        hf(input_ids=x, attention_mask=torch.ones_like(x), labels=y).loss.backward()
    assert bart_step_flops(cfg, 16, 12, batch_size=2) == counter.get_total_flops()


def test_peak_table():
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "bf16") == 312
    assert peak_tflops_for("NVIDIA A100-PCIE-40GB", "tf32") == 156
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "tf32") == 494
    assert peak_tflops_for("NVIDIA H200", "fp16") == 989
    assert peak_tflops_for("NVIDIA H200", "tf32") == PEAK_TFLOPS[("h100", "tf32")]
    assert peak_tflops_for("NVIDIA H100 PCIe", "bf16") < 989
    assert peak_tflops_for("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "float32") == 19.5  # TF32 off: the CUDA cores' rate
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "int8") is None
    for kind in ("bf16", "fp16", "tf32", "fp32"):
        assert PEAK_TFLOPS[("h200", kind)] == PEAK_TFLOPS[("h100", kind)]
    # Cards the table once missed, by the names torch reports.
    assert peak_tflops_for("NVIDIA H100 NVL", "bf16") == 835
    assert peak_tflops_for("NVIDIA H100 PCIe", "tf32") == 378
    assert peak_tflops_for("NVIDIA H800", "bf16") == 989
    assert peak_tflops_for("NVIDIA H800 PCIe", "bf16") == 756
    assert peak_tflops_for("NVIDIA A800-SXM4-80GB", "bf16") == 312
    assert peak_tflops_for("NVIDIA GH200 480GB", "bf16") == 989
    assert peak_tflops_for("NVIDIA H200 NVL", "fp32") == 60


def test_fp32_peak_follows_the_tf32_setting(monkeypatch):
    """An fp32 run's MFU counts against the TF32 peak only when TF32 is actually allowed."""
    from janus.flops import fp32_matmul_kind

    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert fp32_matmul_kind() == "fp32"
        torch.set_float32_matmul_precision("high")
        assert fp32_matmul_kind() == "tf32"
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
        assert fp32_matmul_kind() == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.slow
def test_train_step_benchmark_smoke():
    """benchmarks.train_step --small: every variant timed and memory-probed in its own process."""
    from benchmarks.train_step import main

    summary = main(["--small", "--seq", "32", "--device", "cpu", "--threads", "1"])
    assert set(summary["variants"]) == {"bart", "janus", "janus_unchunked", "janus_before"}
    assert summary["loss_chunk_rows"] > 0 and summary["device"] == "cpu"
    for name, v in summary["variants"].items():
        assert v["step_s"] > 0 and v["flops_per_step"] > 0, name
        assert 0 < v["mfu"] <= 1.5, (name, v["mfu"])
        assert v["peak_mem_mb"] >= 0 and v["peak_mem_total_mb"] >= v["peak_mem_mb"], name
    janus, bart = summary["variants"]["janus"], summary["variants"]["bart"]
    assert janus["flops_per_step"] == summary["variants"]["janus_unchunked"]["flops_per_step"]
    assert 1.5 < summary["flops_janus_over_bart"] < 3.5
    assert summary["janus_over_bart"] == pytest.approx(janus["step_s"] / bart["step_s"])
    assert summary["chunked_over_unchunked_memory"] > 0 and summary["matmul_flops_per_s"] > 0
    assert summary["janus_over_before_memory"] > 0 and summary["janus_over_before_time"] > 0
