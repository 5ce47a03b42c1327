"""Batching: an endless, resumable, rank-sharded sampler and the StatefulDataLoader around it."""

from __future__ import annotations

from collections.abc import Iterator
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class _EndlessIterator(Iterator[int]):
    def __init__(self, sampler: EndlessSampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.pos = 0
        self.order = sampler.order(0)

    def __iter__(self) -> _EndlessIterator:
        return self

    def __next__(self) -> int:
        if self.pos == len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self.sampler.order(self.epoch)
        self.pos += 1
        return self.order[self.pos - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = self.sampler.order(self.epoch)


class EndlessSampler(Sampler[int]):
    """Indices forever: epoch ``e`` is a permutation seeded by ``(seed, e)``, split across ranks.

    Its iterator is stateful (epoch, position), so a resumed loader continues at the same sample, across epochs.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise ValueError(f"a data set of {size} items cannot be split across {world_size} processes")
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            perm = torch.randperm(self.size, generator=g)
        else:
            perm = torch.arange(self.size)
        usable = self.size - self.size % self.world_size  # equal shares keep ranks in step
        return perm[self.rank : usable : self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return _EndlessIterator(self)


def make_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int, fabric: Any) -> StatefulDataLoader:
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata calls a deprecated torch hook
    sampler = EndlessSampler(len(dataset), seed=seed, rank=fabric.global_rank, world_size=fabric.world_size)  # type: ignore[arg-type]
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
