"""Loader: determinism, exact resume, disjoint rank slices, world-size change, batch layout."""
import pytest
import torch

from data_pipeline.loader import DataConfig, build_pretrain_loader, read_manifest
from data_pipeline.shards import ShardReader

from test_data_helpers import build_tiny, make_docs, write_jsonl

MB = 4  # micro-batch size


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    manifest = build_tiny(root / "shards", [str(write_jsonl(root / "docs.jsonl", make_docs(120)))], shard_tokens=2000)
    assert len(manifest["shards"]) > 2 and 100 < manifest["totals"]["blocks"] < 400  # blocks span several shards
    return root / "shards"


@pytest.fixture(scope="module")
def block_ids(shards):
    """Block content -> block id, to identify the samples of a batch by their labels."""
    reader = ShardReader(shards, read_manifest(shards))
    ids = {tuple(reader.block(i)): i for i in range(len(reader))}
    assert len(ids) == len(reader), "test corpus must have unique blocks"
    return ids


def _ids(batch, block_ids, pad_id=1):
    return [block_ids[tuple(row[row != pad_id].tolist())] for row in batch["labels"]]


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_layout(shards):
    loader = build_pretrain_loader(DataConfig(shards), rank=0, world_size=1, micro_batch_size=MB)
    for batch in _take(loader, 10):
        assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
        assert batch["decoder_mask"].dtype == torch.bool and batch["attention_mask"].dtype == torch.long
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["labels"].shape == batch["decoder_mask"].shape and batch["labels"].shape[0] == MB
        real = batch["attention_mask"].bool()
        assert (batch["input_ids"][~real] == loader.vocab.pad_id).all() and (batch["input_ids"][real] != loader.vocab.pad_id).all()
        assert not batch["decoder_mask"][batch["labels"] == loader.vocab.pad_id].any()
        assert (batch["labels"][:, 0] == loader.vocab.bos_id).all()


def test_same_seed_same_batches_and_epochs_differ(shards, block_ids):
    a = _take(build_pretrain_loader(DataConfig(shards, seed=3), rank=0, world_size=1, micro_batch_size=MB), 6)
    b = _take(build_pretrain_loader(DataConfig(shards, seed=3), rank=0, world_size=1, micro_batch_size=MB), 6)
    assert all(_equal(x, y) for x, y in zip(a, b))
    c = _take(build_pretrain_loader(DataConfig(shards, seed=4), rank=0, world_size=1, micro_batch_size=MB), 6)
    assert not all(_equal(x, y) for x, y in zip(a, c))

    loader = build_pretrain_loader(DataConfig(shards, seed=3), rank=0, world_size=1, micro_batch_size=1)
    n = loader.num_blocks
    stream = _take(loader, 2 * n)
    order = [_ids(b, block_ids)[0] for b in stream]
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))  # each epoch: every block once
    assert order[:n] != order[n:]  # a new permutation per epoch
    assert loader.epoch == 2 and loader.consumed_samples == 2 * n
    # Same block in two epochs gets different noise.
    first = {i: b for i, b in zip(order[:n], stream[:n])}
    second = {i: b for i, b in zip(order[n:], stream[n:])}
    assert any(not torch.equal(first[i]["decoder_mask"], second[i]["decoder_mask"]) for i in range(n))


@pytest.mark.parametrize("workers_before, workers_after", [(2, 0), (0, 2)])
def test_exact_resume_after_40_batches(shards, workers_before, workers_after):
    cfg = DataConfig(shards, seed=1, num_workers=workers_before)
    loader = build_pretrain_loader(cfg, rank=1, world_size=2, micro_batch_size=MB)
    it = iter(loader)
    for _ in range(40):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = build_pretrain_loader(DataConfig(shards, seed=1, num_workers=workers_after), rank=1, world_size=2, micro_batch_size=MB)
    resumed.load_state_dict(state)
    assert resumed.consumed_samples == 40 * 2 * MB
    assert all(_equal(x, y) for x, y in zip(expected, _take(resumed, 5)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_take_disjoint_slices_covering_each_epoch(shards, block_ids, world_size):
    loaders = [build_pretrain_loader(DataConfig(shards), rank=r, world_size=world_size, micro_batch_size=MB) for r in range(world_size)]
    n = loaders[0].num_blocks
    steps = -(-2 * n // (world_size * MB))  # two epochs, rounded up
    per_rank = [[i for b in _take(ld, steps) for i in _ids(b, block_ids)] for ld in loaders]
    stream = [i for step in range(steps) for r in range(world_size) for i in per_rank[r][step * MB:(step + 1) * MB]]
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    single = build_pretrain_loader(DataConfig(shards), rank=0, world_size=1, micro_batch_size=1)
    assert stream == [_ids(b, block_ids)[0] for b in _take(single, len(stream))]


def test_world_size_change_neither_repeats_nor_skips(shards, block_ids):
    n_steps_before = 5
    old = [build_pretrain_loader(DataConfig(shards), rank=r, world_size=2, micro_batch_size=MB) for r in range(2)]
    before = [_ids(b, block_ids) for ld in old for b in _take(ld, n_steps_before)]
    state = old[0].state_dict()
    new = [build_pretrain_loader(DataConfig(shards), rank=r, world_size=3, micro_batch_size=MB) for r in range(3)]
    for ld in new:
        ld.load_state_dict(state)
    n = new[0].num_blocks
    remaining_steps = -(-(n - n_steps_before * 2 * MB) // (3 * MB))
    after = [_ids(b, block_ids) for ld in new for b in _take(ld, remaining_steps)]
    seen = [i for ids in before + after for i in ids]
    # The first epoch is covered exactly once; the overshoot belongs to the next epoch.
    single = build_pretrain_loader(DataConfig(shards), rank=0, world_size=1, micro_batch_size=1)
    epoch0 = [_ids(b, block_ids)[0] for b in _take(single, n)]
    assert sorted(seen[:n]) == sorted(epoch0) == list(range(n))
    assert len(seen) - n < 3 * MB
    assert new[0].consumed_samples == n_steps_before * 2 * MB + remaining_steps * 3 * MB


def test_state_from_other_seed_is_rejected(shards):
    a = build_pretrain_loader(DataConfig(shards, seed=0), rank=0, world_size=1, micro_batch_size=MB)
    b = build_pretrain_loader(DataConfig(shards, seed=1), rank=0, world_size=1, micro_batch_size=MB)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_max_lengths_truncate_keeping_eos(shards):
    cfg = DataConfig(shards, max_source_length=20, max_target_length=24)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=8)
    batch = _take(loader, 1)[0]
    assert batch["input_ids"].shape[1] <= 20 and batch["labels"].shape[1] <= 24
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(8), last] == loader.vocab.eos_id).all()


def test_bad_arguments(shards, tmp_path):
    with pytest.raises(ValueError):
        build_pretrain_loader(DataConfig(shards), rank=2, world_size=2, micro_batch_size=MB)
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_pretrain_loader(DataConfig(tmp_path), rank=0, world_size=1, micro_batch_size=MB)


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(shards, workers):
    """The trainer's dropout stream must not depend on when the data iterator was (re)created."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = build_pretrain_loader(DataConfig(shards, num_workers=workers), rank=0, world_size=1, micro_batch_size=MB)
    _take(loader, 3)
    assert torch.equal(before, torch.get_rng_state())
