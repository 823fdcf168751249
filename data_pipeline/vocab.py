"""Token facts the masking needs, loaded from a shards folder without any tokenizer library."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import TOKEN_CLASSES_FILE, read_manifest  # noqa: F401  (re-exported)

WORD_START, SENTENCE_END = 1, 2  # bit flags in token_classes.npy


@dataclass(frozen=True, eq=False)
class VocabInfo:
    vocab_size: int
    bos_id: int
    pad_id: int
    eos_id: int
    unk_id: int
    mask_id: int
    word_start: np.ndarray  # bool[vocab_size]: token begins a word (whole-word masking units)
    sentence_end: np.ndarray  # bool[vocab_size]: token ends a sentence (sentence permutation)

    @property
    def first_regular_id(self) -> int:
        """Random replacement tokens are drawn from [first_regular_id, mask_id): never a special."""
        return max(self.bos_id, self.pad_id, self.eos_id, self.unk_id) + 1

    @classmethod
    def from_classes(cls, tokenizer_record: dict, classes: np.ndarray) -> "VocabInfo":
        ids = {k: int(tokenizer_record[k]) for k in ("vocab_size", "bos_id", "pad_id", "eos_id", "unk_id", "mask_id")}
        if len(classes) != ids["vocab_size"]:
            raise ValueError(f"token classes cover {len(classes)} ids, tokenizer has {ids['vocab_size']}")
        return cls(**ids, word_start=(classes & WORD_START) > 0, sentence_end=(classes & SENTENCE_END) > 0)

    @classmethod
    def from_shards_dir(cls, shards_dir: str | Path) -> "VocabInfo":
        shards_dir = Path(shards_dir)
        record = read_manifest(shards_dir)["tokenizer"]
        return cls.from_classes(record, np.load(shards_dir / TOKEN_CLASSES_FILE))
