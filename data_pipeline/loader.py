"""Deterministic, resumable data-parallel loader over a shards folder (sample order: sampling.py).

The only state is the global `consumed_samples`: resuming with another world size (or micro-batch
size, or number of DataLoader workers) continues at the same stream position.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from janus.stop import ignore_in_worker

from .collate import collate
from .manifest import read_manifest
from .masking import MaskingConfig, mask_sample
from .sampling import StreamOrder, rank_batches
from .shards import ShardReader
from .verify import check_on_open
from .vocab import VocabInfo

DEFAULT_GPU_WORKERS = 2  # per rank (masking + collation run at ~1.8 M tokens/s per core: two keep a GPU fed)

__all__ = ["DataConfig", "ResumableLoader", "PretrainLoader", "build_pretrain_loader", "read_manifest", "mask_and_collate"]


@dataclass
class DataConfig:
    # "" = not set: entry points say it is required (a config file's `data` section may omit it).
    shards_dir: str | Path = field(default="", metadata={"help": "folder written by python -m data_pipeline.build"})
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    seed: int = 0
    num_workers: int | None = None  # DataLoader worker processes (None: 2 on a GPU, 0 on CPU); results do not depend on it
    max_source_length: int | None = None  # None: the block size of the build
    max_target_length: int | None = None
    prefetch_factor: int = 2  # batches prefetched per worker (num_workers > 0 only)
    verify: str = field(default="once", metadata={"help": "shard checksums + token-id check: once (first use per "
                                                          "node, then a stamp) | always | size (sizes and index only)"})
    verify_cache_dir: str | None = field(default=None, metadata={"help": "node-local folder for verification stamps "
                                                                         "(default $BART_JANUS_VERIFY_CACHE or the temp dir)"})


class _BlockBatches(Dataset):
    """Map-style dataset whose item is a whole micro-batch: key = int64 [2, B] of (epoch, block id).
    Masking + collation run in the DataLoader worker; the batch is a pure function of the key."""

    def __init__(self, cfg: DataConfig, manifest: dict) -> None:
        self.cfg = cfg
        self.blocks = ShardReader(cfg.shards_dir, manifest)
        self.vocab = VocabInfo.from_shards_dir(cfg.shards_dir)
        block_size = manifest["config"]["block_size"]
        self.max_source = min(cfg.max_source_length or block_size, block_size)
        self.max_target = min(cfg.max_target_length or block_size, block_size)
        if min(self.max_source, self.max_target) < 3:
            raise ValueError("max_source_length and max_target_length must be >= 3 (<s> token </s>)")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: np.ndarray) -> dict[str, torch.Tensor]:
        blocks = [_truncate(self.blocks.block(int(i)), self.max_target, self.vocab.eos_id) for i in key[1]]
        return mask_and_collate(blocks, key[0], key[1], self.cfg.masking, self.vocab, self.cfg.seed, self.max_source)


def mask_and_collate(blocks: list[np.ndarray], epochs: np.ndarray, indices: np.ndarray, masking: MaskingConfig,
                     vocab: VocabInfo, seed: int, max_source: int) -> dict[str, torch.Tensor]:
    """Noise each block (labels = the block itself) and pad everything into one batch."""
    sources, decoder_masks, src_masked, src_total = [], [], [], []
    for block, epoch, index in zip(blocks, epochs.tolist(), indices.tolist()):
        sample = mask_sample(block, masking, vocab, seed=seed, epoch=epoch, index=index)
        sources.append(_truncate(sample.input_ids, max_source, vocab.eos_id))
        decoder_masks.append(sample.decoder_mask)
        src_masked.append(int(sample.encoder_mask.sum()))
        src_total.append(len(sample.encoder_mask))
    batch = collate(sources, blocks, decoder_masks, vocab.pad_id)
    # Per-sample encoder noise counts, so training can log the effective encoder mask ratio.
    batch["n_src_masked"] = torch.tensor(src_masked, dtype=torch.float32)
    batch["n_src"] = torch.tensor(src_total, dtype=torch.float32)
    return batch


def _truncate(ids: np.ndarray, max_len: int, eos_id: int) -> np.ndarray:
    """Cut to max_len keeping the closing </s>."""
    return ids if len(ids) <= max_len else np.append(ids[: max_len - 1], eos_id)


class ResumableLoader:
    """Iterates forever over batches of a map-style ``dataset`` whose item is a batch key
    (int64 [2, B] of epoch, item id; see sampling.py). ``consumed_samples`` counts samples of
    batches actually yielded (all ranks), so ``state_dict()`` taken after any batch resumes
    exactly at the next one, whatever num_workers. Shared by pretraining and finetuning."""

    def __init__(self, dataset: Dataset, *, num_items: int, seed: int, fingerprint: str, rank: int,
                 world_size: int, micro_batch_size: int, num_workers: int | None = None,
                 prefetch_factor: int = 2) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if num_items == 0:
            raise ValueError("the dataset holds no samples")
        self.dataset, self.num_items, self.seed, self.fingerprint = dataset, num_items, seed, fingerprint
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        # On a GPU, masking/collation runs in worker processes and batches land in pinned memory,
        # so the host-to-device copy is asynchronous; on CPU, workers only add start-up time.
        on_gpu = torch.cuda.is_available()
        self.num_workers = (DEFAULT_GPU_WORKERS if on_gpu else 0) if num_workers is None else num_workers
        self.pin_memory = on_gpu
        self.prefetch_factor = prefetch_factor
        self.consumed_samples = 0

    @property
    def epoch(self) -> int:
        """Epoch of the next sample."""
        return self.consumed_samples // self.num_items

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        keys = rank_batches(StreamOrder(self.seed, self.num_items), self.consumed_samples, self.rank,
                            self.world_size, self.micro_batch_size)
        workers = self.num_workers
        # A private generator: creating the iterator must not draw from the global torch RNG,
        # or a resumed run's dropout stream would differ from an uninterrupted one.
        loader = DataLoader(self.dataset, sampler=keys, batch_size=None, num_workers=workers,
                            prefetch_factor=self.prefetch_factor if workers else None, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed),
                            worker_init_fn=ignore_in_worker if workers else None)
        for batch in loader:
            self.consumed_samples += self.global_batch_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "data_fingerprint": self.fingerprint,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["consumed_samples"]`; takes effect at the next `iter()`. World size and
        micro-batch size may differ from the saved ones; seed and data must not."""
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader uses {self.seed}")
        if state["data_fingerprint"] != self.fingerprint:
            raise ValueError("state was saved on different data (fingerprint differs)")
        self.consumed_samples = int(state["consumed_samples"])


class PretrainLoader(ResumableLoader):
    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int) -> None:
        self.cfg = cfg
        if not cfg.shards_dir:
            raise ValueError("data.shards_dir is not set (build shards with python -m data_pipeline.build)")
        self.manifest = read_manifest(cfg.shards_dir)  # every file present, at its size
        # Index, tokenizer and token classes always; checksums and token ids on first use per node.
        check_on_open(cfg.shards_dir, self.manifest, cfg.verify, cfg.verify_cache_dir)
        dataset = _BlockBatches(cfg, self.manifest)
        self.vocab = dataset.vocab
        if len(dataset) == 0:
            raise ValueError(f"{cfg.shards_dir}: the shards hold no blocks")
        super().__init__(dataset, num_items=len(dataset), seed=cfg.seed, fingerprint=self.manifest["fingerprint"],
                         rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                         num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor)

    @property
    def num_blocks(self) -> int:
        return self.num_items


def build_pretrain_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int) -> PretrainLoader:
    return PretrainLoader(cfg, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
