"""Fault injection: every fault we know of either lets the run continue correctly or stops it with a
message naming the file and the fix -- never rc 0 with wrong results. Add a test here for every new one.

Most checks are in-process (fast); two real end-to-end runs (1 rank, tiny model) cover a killed save,
a truncated checkpoint file with fallback and exact continuation, and export's tokenizer.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data_pipeline.loader import DataConfig, build_pretrain_loader, read_manifest
from data_pipeline.sources import DataError
from janus import checkpoint

from e2e import REPO, torchrun
from test_data_helpers import build_tiny, make_docs, write_jsonl

PAD, VOCAB = 1, 400


@pytest.fixture(autouse=True)
def verify_cache(tmp_path, monkeypatch):
    """A private stamp cache per test: a stamp from one test must not vouch for another's files."""
    cache = tmp_path / "verify_cache"
    monkeypatch.setenv("BART_JANUS_VERIFY_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    build_tiny(root / "shards", [str(write_jsonl(root / "docs.jsonl", make_docs(120)))], shard_tokens=2000)
    return root / "shards"


@pytest.fixture
def shards(pristine, tmp_path):
    """A fresh copy of a good build, free to damage."""
    out = tmp_path / "shards"
    shutil.copytree(pristine, out)
    return out


def _verify_module():
    from data_pipeline import verify

    return verify


def _tokens(shards, name="shard_00000"):
    return np.fromfile(shards / f"{name}.bin", dtype="<u2")


def _loader(shards, **kw):
    return build_pretrain_loader(DataConfig(str(shards), **kw), rank=0, world_size=1, micro_batch_size=4)


def _first_batch(loader):
    return next(iter(loader))


# ---------------------------------------------------------------- shards (issue 11 items 1, 10)

def test_truncated_shard_is_refused_before_startup(shards):
    path = shards / "shard_00001.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"shard_00001\.bin: \d+ bytes, the manifest says"):
        read_manifest(shards)  # what pretrain/train.py calls before the process group exists
    from pretrain.train import main

    with pytest.raises(DataError, match=r"shard_00001\.bin"):
        main(["--data.shards_dir", str(shards)])


def test_missing_index_is_named_before_startup(shards):
    (shards / "shard_00002.idx.npy").unlink()
    with pytest.raises(DataError, match=r"shard_00002\.idx\.npy: missing"):
        read_manifest(shards)


def test_inconsistent_index_is_refused_at_open(shards):
    path = shards / "shard_00000.idx.npy"
    good = np.load(path)
    index = good.copy()
    index[4, 0] += 2  # a block that does not start where the previous one ends
    np.save(path, index)
    with pytest.raises(DataError, match=r"shard_00000\.idx\.npy: row 4: start \d+, expected"):
        _loader(shards, verify="size")  # checked on every start
    index = good.copy()
    index[3, 1] += 2  # a block claims two tokens of its neighbour: consistent offsets, wrong boundaries
    index[4, 0] += 2
    index[4, 1] -= 2
    np.save(path, index)
    with pytest.raises(DataError, match=r"shard_00000\.idx\.npy: block 4 does not start with <s>"):
        _loader(shards)  # the full check (first use): reads the tokens at every block edge


def test_swapped_tokens_fail_the_checksum_on_first_use(shards):
    tokens = _tokens(shards)
    rng = np.random.default_rng(0)
    where = rng.choice(len(tokens), len(tokens) // 4, replace=False)
    tokens[where] = rng.integers(4, VOCAB - 1, len(where))  # other valid ids: only a checksum can tell
    tokens.tofile(shards / "shard_00000.bin")
    with pytest.raises(DataError, match=r"shard_00000\.bin: sha256 .* differs from the manifest"):
        _loader(shards)
    assert _verify_module().main([str(shards), "--no-progress"]) == 1


def test_checksums_once_per_node_then_a_stamp(shards, monkeypatch, verify_cache):
    calls = []
    shard_verify = _verify_module()
    real = shard_verify.content_problems
    monkeypatch.setattr(shard_verify, "content_problems", lambda *a, **k: calls.append(1) or real(*a, **k))
    _loader(shards)
    _loader(shards)
    assert len(calls) == 1 and any(verify_cache.iterdir())  # the second start trusts the stamp
    _loader(shards, verify="always")
    assert len(calls) == 2
    # Any change to a file (size or mtime) invalidates the stamp.
    tokens = _tokens(shards)
    tokens[10] = 5 if tokens[10] != 5 else 6
    tokens.tofile(shards / "shard_00000.bin")
    with pytest.raises(DataError, match="sha256"):
        _loader(shards)


def test_out_of_vocabulary_ids_are_named(shards, capsys):
    tokens = _tokens(shards)
    tokens[7] = VOCAB + 17
    tokens.tofile(shards / "shard_00000.bin")
    # The same bytes with a matching checksum (as a buggy build would write): the id check must catch it.
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sha256"]["shard_00000.bin"] = _verify_module().file_sha256(shards / "shard_00000.bin")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert _verify_module().main([str(shards), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard_00000.bin" in err and f"token id {VOCAB + 17} >= vocab size {VOCAB}" in err
    with pytest.raises(DataError, match=f"shard_00000.bin.*token id {VOCAB + 17}"):
        _loader(shards)
    # Even with checksums off, a batch holding the bad block fails naming the shard, not a bare IndexError.
    loader = _loader(shards, verify="size")
    with pytest.raises(DataError, match=r"shard_00000\.bin block 0: token id"):
        for _, batch in zip(range(100), loader):
            pass


def test_verify_cli(shards, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(shards)], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "verify" in ok.stderr  # the progress bar
    (shards / "token_classes.npy").write_bytes(b"junk")
    (shards / "shard_00001.bin").write_bytes(b"")
    bad = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(shards), "--no-progress"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "shard_00001.bin: 0 bytes" in bad.stderr and "token_classes.npy" in bad.stderr
    assert "python -m data_pipeline.build" in bad.stderr  # the fix
    missing = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(tmp_path / "nowhere")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no manifest" in missing.stderr


@pytest.mark.parametrize("kind", ["empty_file", "blank_text", "all_skipped"])
def test_a_build_without_blocks_fails_at_build_time(tmp_path, kind):
    if kind == "empty_file":
        source = tmp_path / "a.txt"
        source.write_text("")
    elif kind == "blank_text":
        source = tmp_path / "a.txt"
        source.write_text("\n  \n\n\t\n")
    else:
        source = tmp_path / "a.jsonl"
        source.write_text('{"text": "unterminated\n{"title": "x"}\n\n')
    with pytest.raises(DataError, match="no blocks") as err:
        build_tiny(tmp_path / "out", [str(source)])
    if kind == "all_skipped":
        assert "malformed_json" in str(err.value) and "missing_text_field" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_config_file_with_data_section_but_no_shards_dir(tmp_path, capsys):
    from pretrain.train import main

    with pytest.raises(SystemExit):
        main(["--config", "pretrain/configs/tiny_cpu.json"])
    assert "--data.shards_dir is required" in capsys.readouterr().err


# ---------------------------------------------------------------- build safety (item 6)

def test_mistyped_source_with_overwrite_keeps_the_previous_build(shards, tmp_path):
    before = {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()}
    with pytest.raises(DataError, match="source not found"):
        build_tiny(shards, [str(tmp_path / "typo.jsonl")], tokenizer=shards / "tokenizer", overwrite=True)
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".shards.*"))  # no staging folder left behind


def test_bad_tokenizer_or_options_fail_before_anything_is_touched(shards, tmp_path):
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(5)))
    before = read_manifest(shards)["fingerprint"]
    with pytest.raises(DataError, match="tokenizer"):
        build_tiny(shards, [source], tokenizer=tmp_path / "no_tokenizer_here", overwrite=True)
    with pytest.raises(DataError, match="shard_tokens"):
        build_tiny(shards, [source], shard_tokens=0, overwrite=True)
    assert read_manifest(shards)["fingerprint"] == before


def test_a_failing_build_never_harms_the_previous_one(shards, tmp_path, monkeypatch):
    from data_pipeline import build as build_module

    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=9)))
    before = {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()}

    def boom(self, *a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing shards

    monkeypatch.setattr(build_module.ShardWriter, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(shards, [source], overwrite=True)
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")) == []


def test_killed_build_leaves_the_previous_build_in_place(shards, tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", make_docs(6000, seed=3))
    before = {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()}
    cmd = [sys.executable, "-m", "data_pipeline.build", "--out", str(shards), "--source", str(big), "--overwrite",
           "--vocab-size", "400", "--block-size", "64", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".shards.build-*")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()} == before
    assert _first_batch(_loader(shards))["labels"].shape[0] == 4
    # The next build cleans up the dead build's staging folder and swaps its result in.
    small = str(write_jsonl(tmp_path / "small.jsonl", make_docs(30, seed=4)))
    build_tiny(shards, [small], overwrite=True)
    assert not list(tmp_path.glob(".shards.*"))
    assert read_manifest(shards)["sources"][0]["location"] == small


def test_out_folder_with_other_data_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(10)))
    with pytest.raises(DataError, match="thesis.tex"):
        build_tiny(out, [source], overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_build_set_aside_by_a_killed_swap_is_put_back(shards, tmp_path):
    import socket

    aside = tmp_path / f".shards.old-{socket.gethostname()}-999999999"  # a pid that cannot be alive
    shards.rename(aside)
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(10)))
    with pytest.raises(DataError, match="already holds a build"):
        build_tiny(shards, [source])  # no --overwrite: the restored build is not replaced
    assert read_manifest(shards) and not aside.exists()


def test_overwriting_through_a_symlink_keeps_the_link(shards, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(shards, target_is_directory=True)
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(30, seed=6)))
    build_tiny(link, [source], overwrite=True)
    assert link.is_symlink() and read_manifest(shards)["sources"][0]["location"] == source


# ---------------------------------------------------------------- tokenizer (items 2, 3)

def test_changed_tokenizer_is_refused_at_training_start(shards, tmp_path):
    other = build_tiny(tmp_path / "other", [str(write_jsonl(tmp_path / "b.jsonl", make_docs(80, seed=5)))])
    assert other["tokenizer"]["sha256"] != read_manifest(shards)["tokenizer"]["sha256"]
    shutil.copy(tmp_path / "other" / "tokenizer" / "tokenizer.json", shards / "tokenizer" / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer\.json: sha256 .* differs from the manifest"):
        _loader(shards, verify="size")  # checked on every start, not only on first use


def test_load_tokenizer_refuses_a_folder_without_tokenizer_files(tmp_path, pristine):
    from transformers import BartConfig

    from data_pipeline.tokenizer import load_tokenizer

    BartConfig(vocab_size=VOCAB).save_pretrained(str(tmp_path / "model"))
    with pytest.raises(DataError, match=r"model: no tokenizer files \(tokenizer\.json, or vocab\.json \+ merges\.txt\)"):
        load_tokenizer(tmp_path / "model")
    with pytest.raises(DataError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")
    assert len(load_tokenizer(pristine / "tokenizer")) == VOCAB


# ---------------------------------------------------------------- text sources, GLGE files (item 11)

def test_bad_utf8_line_inside_a_paragraph_skips_that_whole_document(tmp_path):
    good = make_docs(3, seed=2)
    path = tmp_path / "books.txt"
    path.write_bytes(f"{good[0]}\n\n{good[1]}\n".encode() + b"bad \xff line\n" + f"more\n\n{good[2]}\n".encode())
    manifest = build_tiny(tmp_path / "out", [str(path)])
    docs = manifest["sources"][0]["documents"]
    assert docs["kept"] == 2 and docs["skipped"] == {"invalid_utf8": 1} and docs["read"] == 3
    assert manifest["sources"][0]["skip_examples"]["invalid_utf8"][0].startswith(f"{path}:3: invalid_utf8")


def test_glge_eval_utf8_error_names_file_and_line(tmp_path):
    from finetune.glge_eval import read_lines

    path = tmp_path / "out.hyp"
    path.write_bytes(b"fine\nalso fine\nbad \xfe\n")
    with pytest.raises(ValueError, match=rf"{path}:3: invalid UTF-8"):
        read_lines(str(path))


def test_empty_dev_lines_are_errors(tmp_path):
    from finetune.data import DataFormatError, read_split

    (tmp_path / "dev.src").write_text("a b\nc d\n")
    (tmp_path / "dev.tgt").write_text("a\n\n")
    with pytest.raises(DataFormatError, match=r"dev\.tgt:2: empty line"):
        read_split(str(tmp_path), "dev")


# ---------------------------------------------------------------- checkpoints (items 5, 7; issue 10 items 12, 13)

class FakeEngine:
    """Writes and reads DeepSpeed-like files, so the checkpoint logic runs without DeepSpeed."""

    def __init__(self, rank=0):
        self.rank, self.loaded = rank, None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        path = os.path.join(root, tag)
        os.makedirs(path, exist_ok=True)
        torch.save({"client": client_state, "w": torch.arange(300.0)}, os.path.join(path, f"mp_rank_{self.rank:02d}_model_states.pt"))
        torch.save({"exp_avg": torch.ones(3000)}, os.path.join(path, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        path = os.path.join(root, tag)
        state = torch.load(os.path.join(path, f"mp_rank_{self.rank:02d}_model_states.pt"), weights_only=False)
        torch.load(os.path.join(path, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"), weights_only=False)
        self.loaded = tag
        return path, state["client"]


@pytest.fixture
def group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():  # left by an in-process training test that ran before
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(root, step, tok_dir=None, world=1, engine=None):
    meta = {"bart_config": {}, "janus": {}}
    if tok_dir is not None:
        meta["tokenizer_dir"] = str(tok_dir)
    client = {"step": step, "nonfinite": 0, "loader": {"consumed_samples": step}, "summary": {"world_size": world}}
    return checkpoint.save(engine or FakeEngine(), str(root), step, client, meta, keep_last=0)


def test_save_records_every_file_and_copies_the_tokenizer(group, tmp_path, pristine):
    root = tmp_path / "ckpt"
    tag = _save(root, 2, tok_dir=pristine / "tokenizer")
    marker = json.loads((root / tag / "COMPLETE").read_text())
    files = marker["files"]
    for name in ("rng_rank0.pt", "model_meta.json", "mp_rank_00_model_states.pt", "tokenizer/tokenizer.json"):
        assert files[name]["size"] == (root / tag / name).stat().st_size, name
    assert (root / tag / "tokenizer" / "tokenizer.json").read_bytes() == (pristine / "tokenizer" / "tokenizer.json").read_bytes()
    assert not list((root / tag / "tokenizer").glob("*.safetensors"))  # tokenizer files only


def test_missing_rng_file_makes_a_checkpoint_incomplete(group, tmp_path, capsys):
    root = tmp_path / "ckpt"
    _save(root, 2)
    _save(root, 4)
    (root / "step_00000004" / "rng_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000004/rng_rank0\.pt"):
        checkpoint.load(FakeEngine(), str(root), "step_00000004")
    engine = FakeEngine()
    tag, client, info = checkpoint.resume(engine, str(root), "auto", 1)
    assert (tag, client["step"], info["fallbacks"], engine.loaded) == ("step_00000002", 2, 1, "step_00000002")
    out = capsys.readouterr()
    assert "step_00000004" in out.out + out.err and "rng_rank0.pt: missing" in out.out + out.err


def test_truncated_checkpoint_file_falls_back_loudly(group, tmp_path, capsys):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step)
    path = root / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:100])
    tag, client, info = checkpoint.resume(FakeEngine(), str(root), "auto", 1)
    assert tag == "step_00000004" and client["loader"] == {"consumed_samples": 4} and info["fallbacks"] == 1
    printed = capsys.readouterr()
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: 100 bytes, expected" in printed.out + printed.err
    assert "WARNING" in printed.out + printed.err
    log = [json.loads(line) for line in (root / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["tag"] == "step_00000004" and log[-1]["fallbacks"] == 1


def test_no_usable_checkpoint_is_refused_naming_every_problem(group, tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 2)
    _save(root, 4)
    (root / "step_00000002" / "model_meta.json").unlink()
    (root / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(RuntimeError) as err:
        checkpoint.resume(FakeEngine(), str(root), "auto", 1)
    text = str(err.value)
    assert "step_00000002/model_meta.json: missing" in text and "step_00000004/mp_rank_00_model_states.pt: 0 bytes" in text
    assert "--run.resume none" in text  # the fix: start fresh deliberately, or restore the files


def test_requested_tag_must_exist_and_be_intact(group, tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 2)
    _save(root, 4)
    with pytest.raises(FileNotFoundError, match=r"step_00000009.*complete checkpoints: step_00000002, step_00000004"):
        checkpoint.resume(FakeEngine(), str(root), "step_00000009", 1)
    (root / "step_00000004" / "rng_rank0.pt").unlink()
    with pytest.raises(RuntimeError, match=r"step_00000004/rng_rank0\.pt: missing"):
        checkpoint.resume(FakeEngine(), str(root), "step_00000004", 1)  # asked for: no silent substitute
    tag, _, info = checkpoint.resume(FakeEngine(), str(root), "step_00000002", 1)
    assert tag == "step_00000002" and info["fallbacks"] == 0
    assert checkpoint.resume(FakeEngine(), str(root), "none", 1)[0] is None


def test_resume_at_another_world_size_refuses_a_global_batch_that_cannot_fit(group, tmp_path):
    """Elastic resume (tests/test_elastic.py) keeps the saved global batch; when micro-batch x ranks cannot
    divide it, it refuses with the arithmetic before converting anything."""
    root = tmp_path / "ckpt"
    client = {"step": 2, "nonfinite": 0, "loader": {"consumed_samples": 2},
              "summary": {"world_size": 2, "global_batch": 6}}
    checkpoint.save(FakeEngine(), str(root), 2, client, {"bart_config": {}, "janus": {}}, keep_last=0)
    shutil.copy(root / "step_00000002" / "rng_rank0.pt", root / "step_00000002" / "rng_rank1.pt")

    class Sized(FakeEngine):
        def train_micro_batch_size_per_gpu(self):
            return 4

    with pytest.raises(ValueError, match=r"global batch 6 is not a multiple of micro-batch 4 x 1 ranks = 4"):
        checkpoint.resume(Sized(), str(root), "auto", 1)
    assert not (root / "universal").exists()  # refused before any conversion


def test_legacy_complete_marker_without_file_list_still_resumes(group, tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 2)
    (root / "step_00000002" / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
    assert checkpoint.resume(FakeEngine(), str(root), "auto", 1)[0] == "step_00000002"
    (root / "step_00000002" / "rng_rank0.pt").unlink()
    with pytest.raises(RuntimeError, match="rng_rank0.pt: missing"):
        checkpoint.resume(FakeEngine(), str(root), "auto", 1)


class FailingEngine(FakeEngine):
    """Dies in the middle of writing its shards (a kill, a full disk)."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        raise OSError("No space left on device")


def test_saving_a_complete_step_again_never_deletes_it_first(group, tmp_path):
    """A stop on an overflow-skipped step right after a resume saves the resumed step again: until the new
    copy is complete, the old one must stay the checkpoint that resumes."""
    root = tmp_path / "ckpt"
    _save(root, 2)
    _save(root, 4)
    meta = {"bart_config": {}, "janus": {}}
    again = {"step": 4, "nonfinite": 1, "skipped_steps": 1, "loader": {"consumed_samples": 5}, "summary": {"world_size": 1}}
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(FailingEngine(), str(root), 4, again, meta, keep_last=0)
    tag, client, info = checkpoint.resume(FakeEngine(), str(root), "auto", 1)
    assert (tag, client["loader"], info["fallbacks"]) == ("step_00000004", {"consumed_samples": 4}, 0)
    assert not (root / "step_00000004.resave").exists()  # the incomplete copy is dropped
    checkpoint.save(FakeEngine(), str(root), 4, again, meta, keep_last=0)  # a complete copy replaces it
    assert checkpoint.complete_tags(str(root)) == ["step_00000002", "step_00000004"]
    assert checkpoint.resume(FakeEngine(), str(root), "auto", 1)[1]["loader"] == {"consumed_samples": 5}
    # Killed between the two renames of the swap: the complete new copy is put in place on resume.
    shutil.copytree(root / "step_00000004", root / "step_00000004.resave")
    (root / "step_00000004").rename(root / "step_00000004.replaced")
    tag, client, _ = checkpoint.resume(FakeEngine(), str(root), "auto", 1)
    assert tag == "step_00000004" and client["loader"] == {"consumed_samples": 5}
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000002", "step_00000004"]


def test_cuda_rng_state_is_the_current_device_only(monkeypatch):
    state = torch.ByteTensor([1, 2, 3])
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": seen.update(state=s, device=device))

    def all_devices(*a, **k):
        raise AssertionError("must not touch the other visible devices")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", all_devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_devices)
    saved = checkpoint.rng_state()
    assert saved["cuda"] is state
    checkpoint.set_rng_state(saved)
    assert seen["state"] is state
    checkpoint.set_rng_state({**saved, "cuda": [torch.ByteTensor([0]), state]})  # old format: one per device
    assert seen["state"] is state


def _broadcast_worker(rank, root, store, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for step in (2, 4):
            _save(root, step, world=2, engine=FakeEngine(rank))
        if rank == 1:  # this rank's file system view lags: it does not list the newest checkpoint yet
            real = checkpoint.complete_tags
            checkpoint.complete_tags = lambda r: [t for t in real(r) if t != "step_00000004"]
        tag, client, _ = checkpoint.resume(FakeEngine(rank), root, "auto", 2)
        results[rank] = (tag, client["step"])
    finally:
        dist.destroy_process_group()


def test_resume_tag_is_chosen_by_rank0_and_broadcast(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_broadcast_worker, args=(str(tmp_path / "ckpt"), str(tmp_path / "pg"), results), nprocs=2)
    assert dict(results) == {0: ("step_00000004", 4), 1: ("step_00000004", 4)}


# ---------------------------------------------------------------- end to end (1 rank, tiny model)

def _pretrain(shards, save_dir, *extra, check=True):
    args = ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards), "--run.save_dir",
            str(save_dir), "--run.max_steps", "6", "--run.save_every", "2", "--run.log_every", "1",
            "--run.keep_last", "0", "--optim.lr", "2e-3", "--optim.warmup_steps", "2", *extra]
    return torchrun("pretrain/train.py", args, nproc=1, check=check)


def _logged(save_dir):
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return rows


@pytest.mark.slow
def test_e2e_killed_save_truncated_checkpoint_fallback_and_export_tokenizer(shards, tmp_path, capsys):
    run = tmp_path / "run"
    killed = _pretrain(shards, run, "--run.faults.crash_in_save_at_step", "6", check=False)
    assert killed.returncode != 0
    ckpts = run / "checkpoints"
    assert [t for t in checkpoint.complete_tags(str(ckpts))] == ["step_00000002", "step_00000004"]
    assert (ckpts / "step_00000006").is_dir()  # the killed save: no COMPLETE, ignored
    first = {r["step"]: r for r in reversed(_logged(run))}  # the first record of each step
    optim = next((ckpts / "step_00000004").glob("*optim_states.pt"))
    full = optim.stat().st_size
    truncated = full // 2
    optim.write_bytes(optim.read_bytes()[:truncated])

    resumed = _pretrain(shards, run)
    text = resumed.stdout + resumed.stderr
    assert f"{optim.name}: {truncated} bytes, expected {full} (truncated" in text and "WARNING" in text
    assert "resumed from" in text and "step_00000002 at step 2" in text
    again = {r["step"]: r for r in _logged(run)}  # the last record of each step: the resumed run's
    for step in range(3, 7):  # the resumed run repeats steps 3..6 exactly (dropout on: RNG restored)
        assert again[step]["loss/total"] == pytest.approx(first[step]["loss/total"], rel=1e-6), step
    log = [json.loads(line) for line in (ckpts / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["fallbacks"] == 1 and log[-1]["tag"] == "step_00000002"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resume_fallbacks"] == 1 and summary["resumed_from"] == "step_00000002" and summary["finished"]

    # The checkpoint carries its tokenizer: export ships it even after the shards' copy was replaced.
    original = (shards / "tokenizer" / "tokenizer.json").read_bytes()
    assert (ckpts / "step_00000006" / "tokenizer" / "tokenizer.json").read_bytes() == original
    (shards / "tokenizer" / "tokenizer.json").write_text(original.decode().replace('"<unk>"', '"<UNK>"', 1))
    from pretrain.export import main as export_main

    export_main(["--save-dir", str(run), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == original
    from data_pipeline.tokenizer import load_tokenizer

    assert len(load_tokenizer(tmp_path / "hf")) == VOCAB
    # A checkpoint whose tokenizer copy was damaged is refused by export, naming the file.
    damaged = ckpts / "step_00000006" / "tokenizer" / "tokenizer.json"
    damaged.write_text("{}")
    with pytest.raises(SystemExit):
        export_main(["--save-dir", str(run), "--out", str(tmp_path / "hf2")])
    assert "step_00000006/tokenizer/tokenizer.json: " in capsys.readouterr().err  # size or sha256
    assert not (tmp_path / "hf2").exists()  # refused before anything was written


@pytest.mark.slow
def test_e2e_hung_rank_ends_the_job_with_every_ranks_stacks_and_the_rerun_resumes(pristine, tmp_path):
    """Rank 1 stops responding in step 4; rank 0 waits for it inside a collective. Both watchdogs fire on
    their own deadline: every rank's stacks are on disk (the hung one names the line it hangs on), the job
    exits non-zero within the timeout, and the rerun resumes from the last complete checkpoint."""
    import inspect
    import re

    from janus import trainer

    run = tmp_path / "run"
    timeout_s = 12
    args = ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(pristine), "--run.save_dir", str(run),
            "--run.max_steps", "5", "--run.save_every", "2", "--run.log_every", "1", "--run.keep_last", "0",
            "--run.hang_timeout_minutes", str(timeout_s / 60)]
    hung = torchrun("pretrain/train.py", [*args, "--run.faults.hang_at_step", "4", "--run.faults.hang_rank", "1"],
                    check=False, timeout=300)
    ended = time.time()
    text = hung.stdout + hung.stderr
    assert hung.returncode != 0 and "exitcode  : 75" in text, text[-4000:]
    began = float(re.search(r"rank 1: test hook: hanging in step 4 at ([\d.]+)", text).group(1))
    assert timeout_s <= ended - began < timeout_s + 30, (ended - began, text[-3000:])
    folders = list((run / "hangs").iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["rank0.txt", "rank1.txt"]
    lines, first = inspect.getsourcelines(trainer._hang)
    sleep_line = first + next(i for i, ln in enumerate(lines) if "time.sleep" in ln)
    stacks = {r: (folders[0] / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert f'trainer.py", line {sleep_line} in _hang' in stacks[1], stacks[1]
    assert "step 4 did not finish" in stacks[0] and "in micro_batch" in stacks[0], stacks[0]  # waiting in the reduction
    assert checkpoint.complete_tags(str(run / "checkpoints")) == ["step_00000002"]
    rerun = torchrun("pretrain/train.py", args, timeout=300)
    assert f"resumed from {run}/checkpoints/step_00000002 at step 2" in rerun.stdout + rerun.stderr
    assert json.loads((run / "train_summary.json").read_text())["finished"]


@pytest.mark.slow
def test_e2e_loss_spike_is_skipped_on_every_rank_after_warm_up_and_survives_resume(pristine, tmp_path):
    """Rank 0's loss is multiplied by 100 at steps 2 and 8 (window 4 micro-batches). Step 2 is in the
    window's warm-up: trained on. Step 8's micro-batch is skipped on both ranks (one rank alone would
    desynchronise ZeRO's gradient reduction). Killed after step 9 and resumed from step 5, the run skips
    step 8 again from the restored window and repeats steps 6-9 exactly."""
    run = tmp_path / "run"
    args = ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(pristine), "--run.save_dir", str(run),
            "--run.max_steps", "10", "--run.save_every", "5", "--run.log_every", "1", "--run.keep_last", "0",
            "--run.spike_guard", "true", "--run.spike_window", "4", "--run.faults.spike_at_steps", "[2, 8]"]
    killed = torchrun("pretrain/train.py", [*args, "--run.faults.crash_at_step", "9"], check=False, timeout=300)
    assert killed.returncode != 0
    text = killed.stdout + killed.stderr
    assert "step 2: loss spike" not in text and text.count("loss spike") == 1, text[-3000:]
    assert "step 8: loss spike" in text and "micro-batch skipped (spike_skipped 1; 1/20)" in text, text[-3000:]
    first = {r["step"]: r for r in reversed(_logged(run))}
    assert [first[s]["spike_skipped"] for s in (7, 8, 9)] == [0, 1, 1]
    resumed = torchrun("pretrain/train.py", args, timeout=300)
    assert "step 8: loss spike" in resumed.stdout + resumed.stderr  # the window came back with the checkpoint
    again = {r["step"]: r for r in _logged(run)}
    for step in range(6, 10):
        assert again[step]["loss/total"] == pytest.approx(first[step]["loss/total"], rel=1e-6), step
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["spike_skipped"] == 1 and summary["nonfinite_skipped"] == 1 and summary["finished"]
