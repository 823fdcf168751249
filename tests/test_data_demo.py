"""The embedded demo corpus (gensim 4.4.0 wheel from PyPI): build and measure end to end."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.demo import default_cache_dir
from data_pipeline.loader import read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_build_and_stats(tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    built = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--demo", "--out", str(out), "--workers", "2",
                            "--cache-dir", str(default_cache_dir()), "--no-progress"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert built.returncode == 0, built.stderr
    manifest = read_manifest(out)
    wiki, news = manifest["sources"]
    assert wiki["documents"]["kept"] == 106 and wiki["documents"]["skipped"] == {"wiki_non_article": 1, "wiki_redirect": 99}
    assert news["documents"]["kept"] == 300
    assert manifest["tokenizer"]["vocab_size"] == 8000 and manifest["totals"]["tokens"] > 500_000
    assert seconds < 60, f"demo build took {seconds:.0f} s"
    stats = subprocess.run([sys.executable, "-m", "data_pipeline.stats", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(stats.stdout.strip().splitlines()[-1])
    assert abs(result["encoder_mask_ratio"] - 0.3) < 0.01 and abs(result["decoder_mask_ratio"] - 0.5) < 0.01


@pytest.mark.slow
def test_demo_tasks_xsum_and_lead(tmp_path):
    """xsum: the target is not in the source; lead: the source starts with its target."""
    from finetune.make_demo_task import write_task

    for kind in ("xsum", "lead"):
        counts = write_task(str(tmp_path / kind), default_cache_dir(), dev=10, test=10, kind=kind)
        assert counts["dev"] == counts["test"] == 10 and counts["train"] > 1000
        src = (tmp_path / kind / "train.src").read_text().splitlines()
        tgt = (tmp_path / kind / "train.tgt").read_text().splitlines()
        assert len(src) == len(tgt) == counts["train"]
        starts = sum(s.startswith(t) for s, t in zip(src, tgt))
        if kind == "lead":
            assert starts == len(src) and all(4 <= len(t.split()) <= 20 for t in tgt)
            assert all(len(s) > len(t) for s, t in zip(src, tgt))  # a second sentence follows
        else:
            assert starts == 0
