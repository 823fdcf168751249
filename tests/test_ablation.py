"""benchmarks.ablation: sentence-pair extraction from a trans-style dictionary, and a tiny smoke run."""
import json
import random
import subprocess
import sys

import pytest

from benchmarks.ablation import SYSTEMS, extract_pairs, write_splits

from e2e import REPO, WORDS, launch_env

DICT = """# Version :: devel
# License :: GPL
Abend {m} | Guten Abend! | Es wird Abend. :: evening | Good evening! | Night is falling.
Haus {n} | Das Haus ist alt. :: house | The house is old. | extra part
Baum {m} | Der Baum [bot.] ist groß. :: tree | The tree is tall.
Noch nicht.; Bald ist es so weit. :: Not yet.; It will soon be time.
Katze {f} | Die Katze schläft auf dem Sofa. :: cat | The cat is sleeping on the sofa.
Kater {m} | Die Katze schläft auf dem Sofa. :: tomcat | The cat sleeps on the couch.
Hund {m} | Der Hund bellt laut und lange. :: dog | the dog barks loudly.
"""


def test_extract_pairs_keeps_aligned_full_sentences_only(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(DICT, encoding="utf-8")
    pairs = extract_pairs(str(path), max_words=15)
    # Kept: aligned parts that are sentences on both sides (>= 3 words, capitalised, final punctuation);
    # dropped: single words, "Guten Abend!" (2 words), mismatched part counts, brackets, ';' alternatives,
    # a German sentence seen before, a lower-case English side.
    assert pairs == [("Es wird Abend.", "Night is falling."),
                     ("Die Katze schläft auf dem Sofa.", "The cat is sleeping on the sofa.")]
    assert extract_pairs(str(path), max_words=3) == [("Es wird Abend.", "Night is falling.")]
    splits = write_splits(pairs * 10, tmp_path / "data", test=3, valid=2)
    assert splits == {"test": 3, "valid": 2, "train": 15}
    assert len((tmp_path / "data" / "train.de").read_text(encoding="utf-8").splitlines()) == 15


def write_dictionary(path, n=300, seed=0):
    """A trans-style file whose "German" is the English sentence with every word reversed."""
    rng = random.Random(seed)
    lines = ["# Version :: test"]
    for _ in range(n):
        en = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        de = " ".join(w[::-1] for w in en).capitalize() + "."
        lines.append(f"{en[0][::-1]} {{f}} | {de} :: {en[0]} | {' '.join(en).capitalize()}.")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_ablation_smoke_run(tmp_path):
    dictionary = write_dictionary(tmp_path / "de-en")
    out = tmp_path / "out"
    args = ["--out", str(out), "--dict-file", str(dictionary), "--test-size", "16", "--valid-size", "4",
            "--vocab-size", "300", "--arch", "tiny", "--layers", "1", "--d-model", "32", "--ffn", "64", "--heads", "2",
            "--steps", "5", "--micro-batch", "8", "--nproc", "1", "--warmup", "2", "--checkpoints-per-run", "5",
            "--max-len", "20", "--iterations", "0,2", "--key-seeds", "1,2"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ablation", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["bleu"]) == set(SYSTEMS)
    assert set(summary["bleu"]["AR"]) == {"ar_beam5"}
    assert set(summary["bleu"]["CMLM"]) == set(summary["bleu"]["MT-NAT"]) == {"nar_T0", "nar_T2"}
    assert set(summary["bleu"]["JANUS-paper"]) == {"ar_beam5", "nar_T0", "nar_T2"}
    report = json.loads((out / "ablation.json").read_text())
    assert report["systems"]["JANUS-paper"]["seeds"] == [1, 2] and report["systems"]["CMLM"]["seeds"] == [1, 2]
    assert report["systems"]["AUX"]["seeds"] == [1]
    for name in ("JANUS-paper", "CMLM"):
        assert len(report["systems"][name]["bleu"]["nar_T2"]["values"]) == 2
    assert report["systems"]["AR"]["step_time_vs_ar"] == 1.0
    md = (out / "ablation.md").read_text()
    assert "| JANUS-paper | 1,2 |" in md and "Token repetition" in md and "NAR T=2" in md
    assert (out / "bleu_vs_iterations.png").read_bytes()[:4] == b"\x89PNG"
    # Every system saw the same data: same BPE, same sentences per step.
    tokens = {row["tokens_per_step"] for row in report["systems"].values()}
    assert len(tokens) == 1
