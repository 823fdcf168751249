"""Continued JANUS pretraining of BART (BART-JANUS) with DeepSpeed ZeRO.

Launch with any of:

    torchrun --nproc_per_node 8 pretrain/train.py --config cfg.json [--section.field value ...]
    deepspeed --num_gpus 8 pretrain/train.py --config cfg.json
    sbatch slurm/pretrain.sh            (see slurm/README in the main README)

Every configuration field is a flag (see --help); a JSON file given with --config sets
them first. Checkpoints, TensorBoard logs and metrics.jsonl go to --run.save_dir;
``--run.resume auto`` (the default) continues from the newest complete checkpoint there.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from transformers import BartConfig

from data_pipeline.loader import DataConfig, build_pretrain_loader, read_manifest
from janus.config import add_config_arguments, config_from_args, to_dict
from janus.distributed import init_distributed, print0, shutdown_distributed
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig
from janus.steps import JanusLoss, epochs_to_steps
from janus.trainer import OptimConfig, RunConfig, resolve_ds_config, train


@dataclass
class ModelConfig:
    init_from: str | None = field(default=None, metadata={"help": "local HF BART folder (e.g. bart-base)"})
    bart: dict = field(default_factory=dict, metadata={"help": "BartConfig kwargs (JSON) for a random model"})
    dropout: float | None = field(default=None, metadata={"help": "override dropout"})
    gradient_checkpointing: bool = False


@dataclass
class PretrainConfig:
    epochs: float | None = field(default=None, metadata={"help": "train this many passes over the shards "
                                                                 "(sets run.max_steps; the paper: 2)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(shards_dir=""))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def build_model(cfg: ModelConfig, tokenizer: dict) -> JanusBart:
    """Load or create the model and check it matches the tokenizer the shards were built with."""
    if cfg.init_from:
        if not os.path.isdir(cfg.init_from):
            raise FileNotFoundError(f"model.init_from={cfg.init_from}: no such folder (a local HF BART folder)")
        model = JanusBart.from_bart(cfg.init_from, mask_token_id=tokenizer["mask_id"])
    else:
        kwargs = {"vocab_size": tokenizer["vocab_size"], "pad_token_id": tokenizer["pad_id"],
                  "bos_token_id": tokenizer["bos_id"], "eos_token_id": tokenizer["eos_id"],
                  "decoder_start_token_id": tokenizer["eos_id"], "forced_eos_token_id": tokenizer["eos_id"],
                  **cfg.bart}
        model = JanusBart(BartConfig(**kwargs), mask_token_id=tokenizer["mask_id"])
    c = model.config
    problems = [f"{name}: tokenizer {tokenizer[key]} vs model {getattr(c, attr)}"
                for name, key, attr in (("vocab size", "vocab_size", "vocab_size"), ("<pad>", "pad_id", "pad_token_id"),
                                        ("</s>", "eos_id", "eos_token_id"))
                if tokenizer[key] != getattr(c, attr)]
    if problems:
        raise ValueError("tokenizer/model vocabulary mismatch (shards built with another tokenizer?): "
                         + "; ".join(problems))
    if cfg.dropout is not None:
        c.dropout = cfg.dropout
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def parse_config(argv=None) -> PretrainConfig:
    """The resolved run configuration for these command-line arguments (what ``main`` trains with)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, PretrainConfig)
    cfg = config_from_args(PretrainConfig, parser.parse_args(argv))
    if not cfg.data.shards_dir:
        parser.error("--data.shards_dir is required (build shards with python -m data_pipeline.build)")
    return cfg


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    manifest = read_manifest(cfg.data.shards_dir)  # fail fast, before any process-group set-up
    rank, world, _ = init_distributed(cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank and every run
    model = build_model(cfg.model, manifest["tokenizer"])
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, objective "
           f"{cfg.objective.preset} ({', '.join(cfg.objective.patterns())}), world size {world}")
    ds = resolve_ds_config(cfg.run, cfg.optim, world)  # batch sizes, validated (the engine checks again)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    loader = build_pretrain_loader(cfg.data, rank=rank, world_size=world, micro_batch_size=micro)
    if cfg.epochs is not None:
        cfg.run.max_steps = epochs_to_steps(cfg.epochs, loader.num_blocks, micro * accum * world)
        print0(f"{cfg.epochs} epochs of {loader.num_blocks} blocks = {cfg.run.max_steps} steps")
    meta = {"bart_config": model.config.to_dict(), "janus": model.janus_config(), "tokenizer": manifest["tokenizer"],
            "tokenizer_dir": os.path.join(os.path.abspath(str(cfg.data.shards_dir)), "tokenizer")}
    loss = JanusLoss(cfg.objective, pad_id=model.config.pad_token_id, model_config=model.config)
    return train(cfg.run, cfg.optim, model, loader, loss, meta, to_dict(cfg))


if __name__ == "__main__":
    main()
    shutdown_distributed()
