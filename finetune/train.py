"""AR or NAR finetuning of BART-JANUS (or any HF BART) on a GLGE-format task with DeepSpeed.

    torchrun --nproc_per_node 8 finetune/train.py --task xsum --mode nar \\
        --model.init_from runs/bart-janus --data.dir /data/glge/xsum --run.save_dir runs/xsum-nar
    deepspeed --num_gpus 8 finetune/train.py ...      |      sbatch slurm/finetune.sh

AR mode trains the JANUS AR pattern (query stream) with label-smoothed cross-entropy;
NAR mode trains CMLM on the NAR pattern (mask-predict masking: a uniform number of masked
target tokens) plus a new, randomly initialised length head (weight ``objective.length``).
JANUS mode trains the full JANUS objective on the task (AR + NAR + AUX + the KL terms, preset
``paper`` unless ``--objective.preset`` says otherwise; NAR/AUX on the mask-predict masking) plus
the length head, so one model serves AR beam search, mask-predict and speculative decoding;
its dev evaluation decodes with all three (``ar_*``, ``nar_*``, ``spec_*`` scores, ``score`` =
their mean; the speculative draft acceptance is logged too).
Mode defaults follow the paper (AR: lr 3e-5, warmup 200, 10 epochs; NAR: lr 1e-4, warmup
1000, 50 epochs; label smoothing 0.1; JANUS: NAR's, since it trains the NAR pattern and a new
length head too); any flag overrides them. The dev set is decoded and
scored with the task metric every ``--run.eval_every`` steps; the best model is exported
to ``<save_dir>/best`` (an HF folder with tokenizer, loadable by ``finetune.generate``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from data_pipeline.loader import ResumableLoader
from data_pipeline.tokenizer import load_tokenizer
from finetune.data import TASK_MAX_TARGET, PairBatches, fingerprint, read_split, tokenize
from finetune.evaluation import decode_gathered
from finetune.glge_eval import PROTOCOLS
from finetune.glge_eval import score as score_task
from janus.config import add_config_arguments, config_from_args, to_dict
from janus.decoding import BeamConfig, MaskPredictConfig
from janus.distributed import init_distributed, is_rank0, print0, shutdown_distributed
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig
from janus.speculative import SpecConfig, combine_stats
from janus.steps import JanusLoss, epochs_to_steps
from janus.trainer import OptimConfig, RunConfig, resolve_ds_config, train

MODE_DEFAULTS = {
    "ar": {"optim": {"lr": 3e-5, "warmup_steps": 200}, "epochs": 10.0, "objective": "ar"},
    "nar": {"optim": {"lr": 1e-4, "warmup_steps": 1000}, "epochs": 50.0, "objective": "cmlm"},
    # JANUS finetuning trains the NAR pattern and a fresh length head as well: NAR's schedule.
    "janus": {"optim": {"lr": 1e-4, "warmup_steps": 1000}, "epochs": 50.0, "objective": "paper"},
}
# Label smoothing 0.1 in every mode is ObjectiveConfig's default.


@dataclass
class FinetuneModelConfig:
    init_from: str = field(default="", metadata={"help": "BART-JANUS export or any local HF BART folder"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: init_from)"})
    dropout: float | None = None


@dataclass
class FinetuneDataConfig:
    dir: str = field(default="", metadata={"help": "folder with {train,dev,test}.{src,tgt}"})
    max_source_length: int = 512
    max_target_length: int | None = field(default=None, metadata={"help": "default: the task's (64/64/32 ...)"})
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: 2 on a GPU, 0 on CPU)"})
    seed: int = 0


@dataclass
class EvalConfig:
    samples: int = field(default=200, metadata={"help": "dev samples decoded per evaluation (0 = all)"})
    batch_size: int = 16
    beam: int = 5
    iterations: int = field(default=4, metadata={"help": "mask-predict refinement passes for NAR validation"})
    length_candidates: int = 5
    meteor: bool = field(default=False, metadata={"help": "METEOR (a JVM run) in validation scores"})
    protocol: str = field(default="official", metadata={
        "help": "official (GLGE's official evaluation of the raw outputs, as published numbers) | modern "
                "(re-derived metrics on the outputs as given); see docs/metrics.md"})

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--eval.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


@dataclass
class FinetuneConfig:
    task: str = field(default="xsum", metadata={"help": "xsum|squadqg|personachat|cnndm|gigaword|msnews|msqg|coqa"})
    mode: str = field(default="ar", metadata={"help": "ar | nar | janus (sets the paper's defaults for optim/objective)"})
    epochs: float | None = field(default=None, metadata={"help": "used when run.max_steps is 0 (default: mode's)"})
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(max_steps=0, save_dir="runs/finetune"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.mode not in MODE_DEFAULTS:
            raise ValueError(f"--mode must be one of {sorted(MODE_DEFAULTS)}, got {self.mode!r}")
        if self.task not in TASK_MAX_TARGET:
            raise ValueError(f"--task {self.task!r}: choose from {sorted(TASK_MAX_TARGET)}")
        if self.epochs is None:
            self.epochs = MODE_DEFAULTS[self.mode]["epochs"]
        if self.data.max_target_length is None:
            self.data.max_target_length = TASK_MAX_TARGET[self.task]


def mode_defaults(values: dict) -> dict:
    """The paper's per-mode settings, under whatever the user set explicitly."""
    d = MODE_DEFAULTS.get(values.get("mode", "ar"), MODE_DEFAULTS["ar"])  # a bad mode is reported by the config
    return {"optim": dict(d["optim"]), "objective": {"preset": d["objective"]}}  # the preset fills its weights


def parse_config(argv=None) -> FinetuneConfig:
    """The resolved run configuration for these command-line arguments (what ``main`` trains with)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, FinetuneConfig)
    cfg = config_from_args(FinetuneConfig, parser.parse_args(argv), defaults_fn=mode_defaults)
    if not cfg.model.init_from or not cfg.data.dir:
        parser.error("--model.init_from and --data.dir are required")
    return cfg


def main(argv=None) -> dict:
    cfg = parse_config(argv)

    rank, world, _ = init_distributed(cfg.run.dist_timeout_minutes)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.init_from)
    nar = cfg.mode in ("nar", "janus")  # length head and decoder masks
    max_tgt = cfg.data.max_target_length
    torch.manual_seed(cfg.run.seed)  # the new length head starts identical on every rank
    model = JanusBart.from_bart(cfg.model.init_from, mask_token_id=tokenizer.mask_token_id,
                                length_classes=max_tgt + 1 if nar else 0)
    if nar and model.length_classes != max_tgt + 1:
        raise ValueError(f"{cfg.model.init_from} has a length head over {model.length_classes} classes, "
                         f"this run needs {max_tgt + 1} (max_target_length {max_tgt})")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model vocabulary only {model.config.vocab_size}")
    if cfg.model.dropout is not None:
        model.config.dropout = cfg.model.dropout
    positions = model.config.max_position_embeddings
    if max_tgt >= positions:
        raise ValueError(f"--data.max_target_length {max_tgt} needs more decoder positions than the "
                         f"{positions} of {cfg.model.init_from}: use at most {positions - 1}")
    if cfg.data.max_source_length > positions:
        print0(f"--data.max_source_length {cfg.data.max_source_length} is more than the model's {positions} "
               f"positions: sources are cut to {positions} tokens")
        cfg.data.max_source_length = positions

    src, tgt = read_split(cfg.data.dir, "train")
    src_tok = tokenize(tokenizer, src, cfg.data.max_source_length, "tokenising train.src")
    tgt_tok = tokenize(tokenizer, tgt, max_tgt, "tokenising train.tgt")
    print0(f"train: {len(src)} pairs; truncated {src_tok.truncated} sources to {cfg.data.max_source_length} and "
           f"{tgt_tok.truncated} targets to {max_tgt} tokens")
    dev_src, dev_tgt = read_split(cfg.data.dir, "dev")
    if cfg.eval.samples:
        dev_src, dev_tgt = dev_src[:cfg.eval.samples], dev_tgt[:cfg.eval.samples]

    ds = resolve_ds_config(cfg.run, cfg.optim, world)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    budget = f"({cfg.epochs} epochs)"
    if not cfg.run.max_steps:
        cfg.run.max_steps = epochs_to_steps(cfg.epochs, len(src), micro * accum * world)
    else:
        budget = f"(--run.max_steps; {cfg.run.max_steps * micro * accum * world / len(src):.2f} epochs)"
    dataset = PairBatches(src_tok, tgt_tok, tokenizer.pad_token_id, cfg.data.seed, nar, max_tgt)
    fp = fingerprint(os.path.join(cfg.data.dir, "train.src"), os.path.join(cfg.data.dir, "train.tgt"),
                     extra=f"{cfg.data.max_source_length}/{max_tgt}/{len(tokenizer)}/{cfg.mode}")
    loader = ResumableLoader(dataset, num_items=len(dataset), seed=cfg.data.seed, fingerprint=fp, rank=rank,
                             world_size=world, micro_batch_size=micro, num_workers=cfg.data.num_workers)
    objective = cfg.objective
    print0(f"{cfg.task} {cfg.mode}: {cfg.run.max_steps} steps {budget}, objective {objective.preset}, "
           f"lr {cfg.optim.lr}, world size {world}")

    loss = JanusLoss(objective, pad_id=tokenizer.pad_token_id, model_config=model.config)

    best_dir = os.path.join(cfg.run.save_dir, "best")
    best_file = os.path.join(best_dir, "dev_scores.json")
    beam_cfg = BeamConfig(beam=cfg.eval.beam, max_len=max_tgt)
    nar_cfg = MaskPredictConfig(iterations=cfg.eval.iterations, length_candidates=cfg.eval.length_candidates,
                                max_len=max_tgt)

    spec_cfg = SpecConfig(max_len=max_tgt)

    def dev_scores(preds: list[str]) -> dict:
        srcs = dev_src if cfg.task in ("squadqg", "msqg") else None
        results = score_task(cfg.task, preds, dev_tgt, srcs, protocol=cfg.eval.protocol, meteor=cfg.eval.meteor)
        score = results.get("overall")
        if score is None:
            score = sum(v for k, v in results.items() if isinstance(v, float) and k not in ("repetition",))
        return {k: v for k, v in results.items() if isinstance(v, (int, float))} | {"score": float(score)}

    def evaluate(module: JanusBart, step: int) -> dict:
        """``module`` is a plain fp32 copy on every rank (the trainer's ``full_precision_copy``): each
        rank decodes a slice of dev, rank 0 scores, and the best model is exported from it. JANUS
        mode decodes with AR beam search, mask-predict and speculative decoding; the best model is
        the best mean of the three scores (``dev_predictions.txt``: the AR beam outputs)."""
        decoders = ("ar", "nar", "spec") if cfg.mode == "janus" else (cfg.mode,)
        outputs, spec_stats = {}, []
        for mode in decoders:
            outputs[mode], _ = decode_gathered(module, tokenizer, dev_src, mode=mode, batch_size=cfg.eval.batch_size,
                                               max_source_length=cfg.data.max_source_length, beam=beam_cfg,
                                               nar=nar_cfg, spec=spec_cfg, stats=spec_stats if mode == "spec" else None)
        preds = outputs[decoders[0]]
        results = {}
        if is_rank0():
            if cfg.mode != "janus":
                results = dev_scores(preds)
            else:
                for mode in decoders:
                    results.update({f"{mode}_{k}": v for k, v in dev_scores(outputs[mode]).items()})
                results["score"] = sum(results[f"{m}_score"] for m in decoders) / len(decoders)
                st = combine_stats(spec_stats)  # rank 0's share of dev
                results.update({f"spec_{k}": st[k] for k in ("accepted_per_verification", "passes_per_token",
                                                             "single_verification_share")})
            best = json.load(open(best_file))["score"] if os.path.exists(best_file) else -math.inf
            if results["score"] > best:
                module.save_pretrained(best_dir)
                tokenizer.save_pretrained(best_dir)
                with open(best_file, "w") as f:
                    json.dump({"step": step, "protocol": cfg.eval.protocol, **results}, f, indent=2)
                with open(os.path.join(best_dir, "dev_predictions.txt"), "w") as f:
                    f.write("\n".join(preds) + "\n")
            results["best"] = max(best, results["score"])
        box = [results]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    meta = {"bart_config": model.config.to_dict(), "janus": model.janus_config(), "task": cfg.task, "mode": cfg.mode,
            "tokenizer_dir": os.path.abspath(cfg.model.tokenizer or cfg.model.init_from)}
    summary = train(cfg.run, cfg.optim, model, loader, loss, meta, to_dict(cfg), evaluate=evaluate)
    summary["best_dir"] = best_dir
    return summary


if __name__ == "__main__":
    main()
    shutdown_distributed()
