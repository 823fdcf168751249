"""Byte-level BPE in BART's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, ..., <mask>=last id (lstrip=True).

Either loaded from a local folder (real runs: bart-base's) or trained on the corpus (demo, tests).
Whatever the source, the build saves it to `OUT/tokenizer/` with `save_pretrained`, so the model
side loads the exact tokenizer the shards were made with.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers (and torch behind it) take seconds to import: only when a build runs
    from transformers import PreTrainedTokenizerBase

from .shards import file_sha256
from .sources import DataError
from .vocab import SENTENCE_END, WORD_START

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
SENTENCE_FINAL = ".!?"
MIN_VOCAB = 256 + len(SPECIALS) + 1  # bytes + specials + <mask>


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a GPT-2-style byte-level BPE; deterministic for the same texts in the same order."""
    from transformers import BartTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be >= {MIN_VOCAB} (bytes + specials + <mask>), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"], **{"<mask>": len(model["vocab"])})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    return BartTokenizerFast(vocab=vocab, merges=merges, mask_token=mask)


# Files a saved HF tokenizer may consist of (what is copied into checkpoints and exports; never
# model weights or configs that happen to sit in the same folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files present in a folder (see TOKENIZER_FILES), sorted by name."""
    return sorted(p for p in (Path(path) / name for name in TOKENIZER_FILES) if p.is_file())


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The one checked way to load a BART tokenizer from a local folder (a shards folder's
    tokenizer/, an exported model, a finetuning run's best/): the folder must hold real tokenizer
    files -- AutoTokenizer silently builds a tiny fallback tokenizer from a bare model config -- and
    the tokenizer must have BART's special-token layout."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"tokenizer {folder}: no such folder (a local folder holding tokenizer.json, e.g. bart-base, "
                        "a shards folder's tokenizer/ or an exported model)")
    if not (folder / "tokenizer.json").is_file() and not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise DataError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); it holds {present}. "
                        "Copy the tokenizer the model was trained with into it (e.g. from the shards folder's tokenizer/ "
                        "or the checkpoint's tokenizer/), or point to a folder that has one")
    tok = AutoTokenizer.from_pretrained(str(folder))
    check_layout(tok, str(folder))
    return tok


def check_layout(tok: PreTrainedTokenizerBase, where: str) -> None:
    expected = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": len(tok) - 1}
    actual = {name: getattr(tok, f"{name}_token_id") for name in expected}
    if actual != expected:
        raise DataError(f"{where}: tokenizer special ids {actual} are not BART's layout {expected}")


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: Path) -> dict:
    """Save to out_dir and return the manifest record (ids, size, sha256 of tokenizer.json). The hashes of
    all its files (file_hashes) go into the manifest next to it: tokenizer_config.json records where the
    tokenizer was loaded from, which must not change the data fingerprint."""
    tok.save_pretrained(str(out_dir))
    return {
        "vocab_size": len(tok), "bos_id": tok.bos_token_id, "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id,
        "unk_id": tok.unk_token_id, "mask_id": tok.mask_token_id, "sha256": file_sha256(out_dir / "tokenizer.json"),
    }


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every tokenizer file in a folder, by name."""
    return {p.name: file_sha256(p) for p in tokenizer_files(folder)}


def tokenizer_problems(folder: str | Path, record: dict, files: dict[str, str] | None = None,
                       against: str = "the manifest's", why: str = "the tokenizer was changed after the build") -> list[str]:
    """How a tokenizer folder differs from a tokenizer record (tokenizer.json's sha256) and, when given,
    the sha256 of each of its files (file_hashes). Empty: it is the same tokenizer."""
    folder = Path(folder)
    expected = dict(files or {})
    if record.get("sha256"):
        expected.setdefault("tokenizer.json", record["sha256"])
    problems = []
    for name, sha in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := file_sha256(path)) != sha:
            problems.append(f"{path}: sha256 {actual[:12]}... differs from {against} {sha[:12]}... ({why})")
    return problems


def token_classes(tok: PreTrainedTokenizerBase) -> np.ndarray:
    """uint8 per id: WORD_START if the token begins with whitespace (GPT-2 BPE marks a word start
    with a leading space) or is special; SENTENCE_END if its text ends with . ! ? or is a line break."""
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    classes = np.zeros(len(tok), dtype=np.uint8)
    specials = set(tok.all_special_ids)
    for token, i in tok.get_vocab().items():
        if i in specials:
            classes[i] = WORD_START
            continue
        if any(ch not in byte_of for ch in token):
            raise DataError(f"token {token!r} (id {i}) is not byte-level BPE; a BART/GPT-2 tokenizer is required")
        text = bytes(byte_of[ch] for ch in token).decode("utf-8", errors="replace")
        if text[:1].isspace():
            classes[i] |= WORD_START
        last = text.rstrip(" ")[-1:]
        if (last and last in SENTENCE_FINAL) or (last == "\n" and text.strip() == ""):
            classes[i] |= SENTENCE_END
    return classes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def raw_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    """The Rust tokenizer for worker processes. Special-token text inside documents (a literal
    "<mask>" in an article) is encoded as plain text, never as the special id."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok
