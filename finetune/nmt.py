"""Neural machine translation from scratch with JANUS (any objective preset) or Multi-Task NAT.

    torchrun --nproc_per_node 8 finetune/nmt.py --data.dir data/iwslt14.de-en --data.src_lang de \\
        --data.tgt_lang en --model.arch transformer_iwslt_de_en --objective.preset paper --run.save_dir runs/iwslt-janus
    python -m finetune.nmt ...                                   (one process, e.g. for a quick look)
    ... --objective.preset cmlm                                  (CMLM baseline; ar, aux, ar+nar, ar+nar+kl, released)
    ... --system mtnat                                           (Multi-Task NAT: shared encoder, AT + NAT decoders)

Data: ``{train,valid,test}.{src_lang,tgt_lang}`` in ``--data.dir``, one sentence per line, raw
text. A joint byte-level BPE (BART's special-token layout: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask>
last) is trained on the training text with ``tokenizers`` and saved with the run
(``<save_dir>/tokenizer``), unless ``--data.tokenizer DIR`` names one to reuse.

Recipe (paper §4.2): ``--model.arch transformer_iwslt_de_en`` (6+6 layers, d 512, FFN 1024, 4 heads,
dropout 0.3, weight decay 1e-4) or ``transformer_wmt_en_de`` (FFN 2048, 8 heads, dropout 0.2);
``cpu_small`` / ``tiny`` for CPU runs and tests. Adam (0.9, 0.98), lr 5e-4, inverse-sqrt schedule
with 10k warmup steps, label smoothing 0.1, encoder/decoder/output embeddings shared (BART ties
them). At the end the last ``--eval.average`` (5) complete checkpoints are averaged into
``<save_dir>/final`` (an HF folder with tokenizer; for Multi-Task NAT the AT decoder is dropped),
which decodes the test set: AR beam search (beam 5) when the AR pattern was trained, NAR
mask-predict at every ``--eval.iterations`` when the NAR pattern was (T = refinement passes after
the first; T + 1 decoder passes). Scores: sacreBLEU (signature printed) and token repetition.
The last printed line is one JSON object (also ``<save_dir>/results.json``).

Decoder masking for the NAR/AUX patterns (``--data.masking``): ``cmlm`` (default) = mask-predict's
training masks: n ~ U{1..N} target tokens at uniformly random positions, the masking the CMLM
baseline is defined with and the one mask-predict inference matches; ``span`` = the paper's §3.2
span masking: a ratio r ~ U(0, 1], round(rN) tokens in spans of length Poisson(2) (>= 1). Both are
vectorised pure functions of (seed, epoch, example id), so runs resume exactly. Every system in a
comparison uses the same masking. The length head (mean-pooled encoder -> 0..max_target_length)
is trained with weight ``--objective.length`` (0.1) whenever the NAR or AUX pattern is trained.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from transformers import BartConfig

from data_pipeline.loader import ResumableLoader
from finetune.data import DECODER_MASKERS, PairBatches, fingerprint, read_pair, tokenize
from finetune.evaluation import decode_gathered
from janus import checkpoint
from janus.config import add_config_arguments, config_from_args, to_dict
from janus.decoding import BeamConfig, MaskPredictConfig
from janus.distributed import barrier, device, init_distributed, is_rank0, print0, shutdown_distributed
from janus.export import export as export_checkpoint
from janus.metrics import nmt_bleu, repetition_ratio
from janus.model import JanusBart
from janus.multitask_nat import MultiTaskNAT, importance_lambda
from janus.objectives import ObjectiveConfig
from janus.steps import JanusLoss, epochs_to_steps
from janus.trainer import OptimConfig, RunConfig, resolve_ds_config, train

# layers (encoder = decoder), d_model, FFN, heads, dropout, attention dropout, weight decay.
ARCHS: dict[str, dict] = {
    "transformer_iwslt_de_en": dict(layers=6, d_model=512, ffn=1024, heads=4, dropout=0.3, attention_dropout=0.0,
                                    weight_decay=1e-4),
    "transformer_wmt_en_de": dict(layers=6, d_model=512, ffn=2048, heads=8, dropout=0.2, attention_dropout=0.0,
                                  weight_decay=0.0),
    "cpu_small": dict(layers=3, d_model=256, ffn=512, heads=4, dropout=0.1, attention_dropout=0.0, weight_decay=1e-4),
    "tiny": dict(layers=1, d_model=32, ffn=64, heads=2, dropout=0.1, attention_dropout=0.0, weight_decay=1e-4),
}
SYSTEMS = ("janus", "mtnat")


@dataclass
class NMTModelConfig:
    arch: str = field(default="transformer_iwslt_de_en", metadata={"help": " | ".join(ARCHS)})
    layers: int | None = field(default=None, metadata={"help": "encoder and decoder layers (default: arch's)"})
    d_model: int | None = None
    ffn: int | None = None
    heads: int | None = None
    dropout: float | None = None
    attention_dropout: float | None = None

    def dims(self) -> dict:
        if self.arch not in ARCHS:
            raise ValueError(f"--model.arch {self.arch!r}: choose from {sorted(ARCHS)}")
        base = ARCHS[self.arch]
        return {k: (getattr(self, k) if getattr(self, k, None) is not None else base[k])
                for k in ("layers", "d_model", "ffn", "heads", "dropout", "attention_dropout")}


@dataclass
class NMTDataConfig:
    dir: str = field(default="", metadata={"help": "folder with {train,valid,test}.{src_lang,tgt_lang}"})
    src_lang: str = "de"
    tgt_lang: str = "en"
    tokenizer: str = field(default="", metadata={"help": "existing BPE folder to reuse (default: train one)"})
    vocab_size: int = field(default=10000, metadata={"help": "joint BPE size incl. specials and <mask>"})
    max_source_length: int = field(default=256, metadata={"help": "BPE tokens incl. <s> </s>; longer ones are cut"})
    max_target_length: int = 256
    masking: str = field(default="cmlm", metadata={"help": "decoder masks for NAR/AUX: cmlm | span"})
    seed: int = field(default=0, metadata={"help": "data order and decoder masks"})
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: 2 on a GPU, 0 on CPU)"})


@dataclass
class MultiTaskConfig:
    lambda_schedule: str = field(default="anneal", metadata={"help": "anneal (lambda_t = t/T) | fixed"})
    fixed_lambda: float = field(default=0.5, metadata={"help": "lambda with --mtnat.lambda_schedule fixed"})


@dataclass
class NMTEvalConfig:
    average: int = field(default=5, metadata={"help": "average the last K complete checkpoints (0/1 = newest)"})
    split: str = field(default="test", metadata={"help": "split decoded and scored at the end ('' = none)"})
    valid_split: str = "valid"
    valid_samples: int = field(default=200, metadata={"help": "valid sentences scored every run.eval_every steps"})
    beam: int = 5
    iterations: str = field(default="1,4,10", metadata={"help": "mask-predict T values (refinement passes)"})
    length_candidates: int = 5
    batch_size: int = 64
    samples: int = field(default=0, metadata={"help": "score only the first N test sentences (0 = all)"})


@dataclass
class NMTConfig:
    system: str = field(default="janus", metadata={"help": "janus (one model, --objective.preset) | mtnat"})
    name: str = field(default="", metadata={"help": "label in results.json (default: preset or mtnat)"})
    epochs: float = field(default=50.0, metadata={"help": "used when run.max_steps is 0"})
    model: NMTModelConfig = field(default_factory=NMTModelConfig)
    data: NMTDataConfig = field(default_factory=NMTDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    mtnat: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(max_steps=0, save_dir="runs/nmt", save_every=1000,
                                                             keep_last=5))  # (also nmt_defaults: flags keep them)
    eval: NMTEvalConfig = field(default_factory=NMTEvalConfig)

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise ValueError(f"--system must be one of {SYSTEMS}, got {self.system!r}")
        if self.system == "mtnat" and self.objective.preset != "cmlm":
            raise ValueError("--system mtnat trains its NAT decoder with CMLM: leave --objective.preset at cmlm")
        if self.data.masking not in DECODER_MASKERS:
            raise ValueError(f"--data.masking {self.data.masking!r}: choose from {sorted(DECODER_MASKERS)}")
        if self.mtnat.lambda_schedule not in ("anneal", "fixed"):
            raise ValueError(f"--mtnat.lambda_schedule must be anneal or fixed, got {self.mtnat.lambda_schedule!r}")
        self.model.dims()  # validates the arch name
        self.iteration_list()
        if not self.name:
            self.name = "mtnat" if self.system == "mtnat" else self.objective.preset

    def iteration_list(self) -> list[int]:
        try:
            its = [int(t) for t in str(self.eval.iterations).split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--eval.iterations must be comma-separated integers, got {self.eval.iterations!r}") from None
        if any(t < 0 for t in its):
            raise ValueError("--eval.iterations must be >= 0")
        return its

    def patterns(self) -> tuple[str, ...]:
        return ("nar",) if self.system == "mtnat" else self.objective.patterns()

    def decode_modes(self) -> tuple[bool, bool]:
        """(AR beam search, NAR mask-predict) at test time: AR when the AR or AUX pattern was trained
        (AUX is a left-to-right predictor too: paper Table 6 decodes it both ways), NAR when NAR or AUX was."""
        p = self.patterns()
        return ("ar" in p or "aux" in p) and self.system != "mtnat", "nar" in p or "aux" in p


def nmt_defaults(values: dict) -> dict:
    """Paper §4.2 optimisation defaults (weight decay from the arch), preset weights for the objective."""
    arch = values.get("model", {}).get("arch", "transformer_iwslt_de_en")
    wd = ARCHS.get(arch, ARCHS["transformer_iwslt_de_en"])["weight_decay"]
    system = values.get("system", "janus")
    preset = "cmlm" if system == "mtnat" else "paper"  # the default preset; ObjectiveConfig fills its weights
    return {"run": {"max_steps": 0, "save_dir": "runs/nmt", "save_every": 1000, "keep_last": 5},
            "optim": {"lr": 5e-4, "schedule": "inverse_sqrt", "warmup_steps": 10000, "betas": [0.9, 0.98],
                      "weight_decay": wd},
            "objective": {"preset": preset}}


def parse_config(argv=None) -> NMTConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, NMTConfig)
    cfg = config_from_args(NMTConfig, parser.parse_args(argv), defaults_fn=nmt_defaults)
    if not cfg.data.dir:
        parser.error("--data.dir is required")
    return cfg


# ---------------------------------------------------------------------------------------- data
def split_paths(cfg: NMTDataConfig, split: str) -> tuple[str, str]:
    return (os.path.join(cfg.dir, f"{split}.{cfg.src_lang}"), os.path.join(cfg.dir, f"{split}.{cfg.tgt_lang}"))


def read_parallel(cfg: NMTDataConfig, split: str) -> tuple[list[str], list[str]]:
    """Line-aligned source/target files; mismatched line counts name both files."""
    return read_pair(*split_paths(cfg, split), forbid_empty=True)  # an empty line is an error in every split


def train_joint_bpe(src: list[str], tgt: list[str], vocab_size: int, out_dir: str):
    """Joint byte-level BPE on both sides of the training text, BART layout, saved to ``out_dir``."""
    from data_pipeline.tokenizer import check_layout, save_tokenizer, train_bpe

    tok = train_bpe(list(src) + list(tgt), vocab_size)
    check_layout(tok, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(tok, __import__("pathlib").Path(out_dir))
    return tok


def load_bpe(path: str):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(path)


def bart_config(cfg: NMTConfig, tokenizer) -> BartConfig:
    d = cfg.model.dims()
    return BartConfig(
        vocab_size=len(tokenizer), d_model=d["d_model"], encoder_layers=d["layers"], decoder_layers=d["layers"],
        encoder_attention_heads=d["heads"], decoder_attention_heads=d["heads"], encoder_ffn_dim=d["ffn"],
        decoder_ffn_dim=d["ffn"], dropout=d["dropout"], attention_dropout=d["attention_dropout"],
        activation_dropout=0.0, max_position_embeddings=max(cfg.data.max_source_length, cfg.data.max_target_length) + 2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True)


def build_model(cfg: NMTConfig, tokenizer) -> JanusBart | MultiTaskNAT:
    config = bart_config(cfg, tokenizer)
    length_classes = cfg.data.max_target_length + 1 if cfg.decode_modes()[1] else 0
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    if cfg.system == "mtnat":
        return MultiTaskNAT(config, mask_token_id=tokenizer.mask_token_id, length_classes=length_classes)
    return JanusBart(config, mask_token_id=tokenizer.mask_token_id, length_classes=length_classes)


def decode_and_score(model: JanusBart, tokenizer, sources: list[str], refs: list[str], cfg: NMTConfig,
                     iterations: list[int] | None = None, modes: tuple[bool, bool] | None = None) -> dict:
    """Collective: each rank decodes a slice; every rank gets {mode: {bleu, repetition, seconds}}."""
    ar, nar = modes or cfg.decode_modes()
    max_len = cfg.data.max_target_length
    settings: list[tuple[str, str, BeamConfig | None, MaskPredictConfig | None]] = []
    if ar:
        settings.append((f"ar_beam{cfg.eval.beam}", "ar", BeamConfig(beam=cfg.eval.beam, max_len=max_len), None))
    if nar:
        for t in (cfg.iteration_list() if iterations is None else iterations):
            settings.append((f"nar_T{t}", "nar", None, MaskPredictConfig(
                iterations=t, length_candidates=cfg.eval.length_candidates, max_len=max_len)))
    results: dict = {}
    model.eval()
    for name, mode, beam, mp in settings:
        preds, seconds = decode_gathered(model, tokenizer, sources, mode=mode, batch_size=cfg.eval.batch_size,
                                         max_source_length=cfg.data.max_source_length, beam=beam or BeamConfig(),
                                         nar=mp or MaskPredictConfig())
        score = nmt_bleu(preds, refs)
        results[name] = {"bleu": score["bleu"], "repetition": repetition_ratio(preds), "signature": score["signature"],
                         "decode_seconds": seconds, "hypotheses": preds}
    return results


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    rank, world, _ = init_distributed(cfg.run.dist_timeout_minutes)
    if is_rank0():
        os.makedirs(cfg.run.save_dir, exist_ok=True)
    tok_dir = cfg.data.tokenizer or os.path.join(cfg.run.save_dir, "tokenizer")

    src, tgt = read_parallel(cfg.data, "train")
    if is_rank0() and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        if cfg.data.tokenizer:
            raise FileNotFoundError(f"--data.tokenizer {cfg.data.tokenizer}: no tokenizer.json there")
        t0 = time.perf_counter()
        train_joint_bpe(src, tgt, cfg.data.vocab_size, tok_dir)
        print0(f"joint BPE ({cfg.data.vocab_size}) trained on {len(src)} pairs in {time.perf_counter() - t0:.1f}s "
               f"-> {tok_dir}")
    barrier()
    tokenizer = load_bpe(tok_dir)
    max_src, max_tgt = cfg.data.max_source_length, cfg.data.max_target_length
    src_tok = tokenize(tokenizer, src, max_src, "tokenising train source")
    tgt_tok = tokenize(tokenizer, tgt, max_tgt, "tokenising train target")
    print0(f"train: {len(src)} pairs, {len(src_tok.ids)} + {len(tgt_tok.ids)} BPE tokens; truncated {src_tok.truncated} "
           f"sources to {max_src} and {tgt_tok.truncated} targets to {max_tgt} tokens")

    model = build_model(cfg, tokenizer)
    ar_decode, nar_decode = cfg.decode_modes()
    ds = resolve_ds_config(cfg.run, cfg.optim, world)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if not cfg.run.max_steps:
        cfg.run.max_steps = epochs_to_steps(cfg.epochs, len(src), micro * accum * world)
    needs_mask = "nar" in cfg.patterns() or "aux" in cfg.patterns()
    dataset = PairBatches(src_tok, tgt_tok, tokenizer.pad_token_id, cfg.data.seed, needs_mask, max_tgt,
                          masker=cfg.data.masking)
    fp = fingerprint(*split_paths(cfg.data, "train"), os.path.join(tok_dir, "tokenizer.json"),
                     extra=f"{max_src}/{max_tgt}/{cfg.data.masking}/{needs_mask}")
    loader = ResumableLoader(dataset, num_items=len(dataset), seed=cfg.data.seed, fingerprint=fp, rank=rank,
                             world_size=world, micro_batch_size=micro, num_workers=cfg.data.num_workers)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"{cfg.name}: {cfg.system}, patterns {','.join(cfg.patterns())}, {n_params / 1e6:.2f}M parameters, "
           f"{cfg.run.max_steps} steps, lr {cfg.optim.lr}, masking {cfg.data.masking}, world size {world}")

    fixed = cfg.mtnat.fixed_lambda if cfg.mtnat.lambda_schedule == "fixed" else None
    # Multi-Task NAT: lambda_t from the engine's optimizer-step counter (restored on resume).
    extra = (lambda engine: {"lam": importance_lambda(engine.global_steps, cfg.run.max_steps, fixed)}) \
        if cfg.system == "mtnat" else None
    loss = JanusLoss(cfg.objective, pad_id=tokenizer.pad_token_id, model_config=model.config, extra_kwargs=extra,
                     flop_patterns=("ar", "nar") if cfg.system == "mtnat" else None)

    evaluate = None
    if cfg.run.eval_every:
        vsrc, vtgt = read_parallel(cfg.data, cfg.eval.valid_split)
        vsrc, vtgt = vsrc[:cfg.eval.valid_samples or None], vtgt[:cfg.eval.valid_samples or None]
        first = [min(cfg.iteration_list() or [4])]

        def evaluate(module, step):
            net = module.nat if isinstance(module, MultiTaskNAT) else module
            res = decode_and_score(net, tokenizer, vsrc, vtgt, cfg, iterations=first)
            return {f"bleu_{k}": v["bleu"] for k, v in res.items()}

    meta = {"bart_config": model.config.to_dict(), "janus": model.janus_config(), "system": cfg.system,
            "export_prefix": "nat." if cfg.system == "mtnat" else "", "tokenizer_dir": os.path.abspath(tok_dir)}
    t_train = time.perf_counter()
    summary = train(cfg.run, cfg.optim, model, loader, loss, meta, to_dict(cfg), evaluate=evaluate)
    train_seconds = time.perf_counter() - t_train

    results = {"name": cfg.name, "system": cfg.system, "objective": cfg.objective.preset,
               "patterns": list(cfg.patterns()), "masking": cfg.data.masking, "seed": cfg.run.seed,
               "data_seed": cfg.data.seed, "arch": cfg.model.arch, "parameters": n_params, "steps": summary["steps"],
               "finished": summary["finished"],
               "train": {"median_step_seconds": summary["median_step_seconds"], "wall_seconds": train_seconds,
                         "steps_this_run": summary["steps_this_run"],
                         "tokens_per_step": summary.get("tokens_per_step")}}
    if not summary["finished"]:
        print0(json.dumps(results))
        return results
    # Average the last K checkpoints into final/ (rank 0), then every rank decodes its share of the test set.
    final = os.path.join(cfg.run.save_dir, "final")
    root = os.path.join(cfg.run.save_dir, "checkpoints")
    k = max(1, min(cfg.eval.average, len(checkpoint.complete_tags(root))))
    if is_rank0():
        info = export_checkpoint(cfg.run.save_dir, final, average=k if k > 1 else 0)
        results["averaged_checkpoints"] = info["tags"]
        print0(f"averaged {len(info['tags'])} checkpoint(s) {info['tags'][0]}..{info['tags'][-1]} -> {final}")
    barrier()
    if cfg.eval.split:
        net = JanusBart.from_bart(final).to(device())
        test_src, test_ref = read_parallel(cfg.data, cfg.eval.split)
        if cfg.eval.samples:
            test_src, test_ref = test_src[:cfg.eval.samples], test_ref[:cfg.eval.samples]
        scores = decode_and_score(net, tokenizer, test_src, test_ref, cfg)
        results["test"] = {"split": cfg.eval.split, "n": len(test_src)}
        results["bleu"] = {k: v["bleu"] for k, v in scores.items()}
        results["repetition"] = {k: v["repetition"] for k, v in scores.items()}
        results["decode_seconds"] = {k: v["decode_seconds"] for k, v in scores.items()}
        results["signature"] = next(iter(scores.values()))["signature"] if scores else None
        if is_rank0():
            for name, v in scores.items():
                with open(os.path.join(cfg.run.save_dir, f"{cfg.eval.split}.{name}.hyp"), "w") as f:
                    f.write("\n".join(v["hypotheses"]) + "\n")
                print0(f"{cfg.eval.split} {name}: BLEU {v['bleu']:.2f}  repetition {v['repetition']:.2f}%  "
                       f"({v['decode_seconds']:.1f}s)")
            if results["signature"]:
                print0(f"sacreBLEU signature: {results['signature']}")
    if is_rank0():
        with open(os.path.join(cfg.run.save_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print0(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    shutdown_distributed()
