import os

import pytest
import torch
from transformers import BartConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_environment():
    """A test that sets up a process group in-process (``init_distributed`` in plain python sets
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) must not hand those to the launchers and
    sbatch jobs of later tests: restore the environment after every test."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


def tiny_bart_config(vocab_size: int = 64, d_model: int = 32, layers: int = 2, heads: int = 4, max_positions: int = 128,
                     **kw) -> BartConfig:
    """A tiny random BART config (BART special-token layout: <s>=0 <pad>=1 </s>=2, <mask> last)."""
    return BartConfig(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
                      decoder_ffn_dim=2 * d_model, max_position_embeddings=max_positions, **kw)


@pytest.fixture
def tiny_config():
    return tiny_bart_config()
