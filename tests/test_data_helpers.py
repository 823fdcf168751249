"""Shared tiny-corpus helpers for the data pipeline tests (no tests here)."""
import json
import random
from pathlib import Path

from data_pipeline.build import BuildConfig, build

WORDS = ("the of and to in a is was for on as with by he it at from his an were are which this be also has or had "
         "its first one their after new who they two her she been other when there all during into school time may "
         "years more most only over city some world would where later up such used many can state about national "
         "out known university united then made river music film game team party war church house season").split()


def make_docs(n: int, seed: int = 0, max_sentences: int = 12) -> list[str]:
    """Pseudo-English documents of 1..max_sentences sentences; unique with overwhelming probability."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, max_sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def build_tiny(out: Path, sources: list[str], **overrides) -> dict:
    options = dict(vocab_size=400, block_size=64, workers=1, progress=False, cache_dir=out / "cache")
    options.update(overrides)
    return build(BuildConfig(out=out, sources=sources, **options))
