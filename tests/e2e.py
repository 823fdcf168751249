"""Helpers for end-to-end tests: tiny shards on generated text, multi-rank launches."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the a of river city north old new king music war river school island league film "
         "north south east west team game song story house village station church road market "
         "bridge castle garden forest mountain lake ship train plane paper letter court").split()


def write_corpus(path: Path, docs: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(3, 10))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def build_shards(tmp: Path, block_size: int = 64, vocab_size: int = 400) -> Path:
    corpus = write_corpus(tmp / "corpus.jsonl")
    out = tmp / "shards"
    subprocess.run([sys.executable, "-m", "data_pipeline.build", "--source", str(corpus), "--out", str(out),
                    "--block-size", str(block_size), "--vocab-size", str(vocab_size), "--workers", "1",
                    "--no-progress"], check=True, cwd=REPO, capture_output=True)
    return out


# Set by launchers and in-process process groups; a child launcher must make its own.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return env


def torchrun(script: str, args: list[str], nproc: int = 2, check: bool = True,
             timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(save_dir: Path) -> dict[int, dict]:
    """step -> last logged record (a resumed run logs the re-run steps again)."""
    rows = {}
    with open(save_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def write_copy_task(path: Path, n_train: int = 400, n_dev: int = 16, seed: int = 0) -> Path:
    """A GLGE-format task: the summary is the first four words of the source."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_dev)):
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(n)]
        (path / f"{split}.src").write_text("\n".join(src) + "\n")
        (path / f"{split}.tgt").write_text("\n".join(" ".join(s.split()[:4]) for s in src) + "\n")
    return path


def make_base_model(tmp: Path) -> Path:
    """A tiny random BART-JANUS HF folder with the tokenizer of tiny shards (a finetuning start)."""
    import shutil

    import torch
    from transformers import BartConfig

    from janus.model import JanusBart

    tmp.mkdir(parents=True, exist_ok=True)
    shards = build_shards(tmp)
    tok = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    torch.manual_seed(0)
    config = BartConfig(vocab_size=tok["vocab_size"], d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=128)
    out = tmp / "base"
    JanusBart(config, mask_token_id=tok["mask_id"]).save_pretrained(str(out))
    for f in (shards / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out
