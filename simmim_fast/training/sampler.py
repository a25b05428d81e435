"""A resumable, rank-sharded sampler over all epochs, whose items carry their own random seed.

Each yielded item is ``(index, item_seed)``: the dataset draws the crop, flip and mask of that sample
from ``item_seed`` alone, so a run resumed mid-epoch sees exactly the samples, augmentations and
masks the uninterrupted run would have seen, whatever the number of loader workers. One sampler
spans every remaining epoch, so the loader (and its workers) start once per run, not per epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Shuffled per epoch, split across ``world_size`` ranks, restartable at any batch.

    An epoch holds ``batches_per_epoch`` batches of ``batch_size`` per rank: ``len // global_batch``
    (drop last) rounded down to a multiple of ``min_batches``, and at least ``min_batches``: a data set
    smaller than that (the embedded default) is repeated, freshly shuffled, until it fills them. The
    trainers pass their gradient-accumulation micro-steps as ``min_batches``, so an epoch is a whole
    number of optimizer steps: no step mixes two epochs' micro-batches, and a resumed run (which restarts
    at a step boundary of its epoch) sees the micro-batches of the uninterrupted one.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        batch_size: int,
        epochs: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        min_batches: int = 1,
    ):
        if dataset_len <= 0:
            raise ValueError("dataset: is empty")
        self.n = dataset_len
        self.batch_size, self.epochs = batch_size, epochs
        self.rank, self.world_size, self.seed = rank, world_size, seed
        full = dataset_len // (batch_size * world_size)
        self.batches_per_epoch = max(min_batches, full - full % min_batches)
        self.start_epoch, self.start_batch = 0, 0

    def set_start(self, epoch: int, batch: int = 0) -> None:
        """Begin at batch ``batch`` of epoch ``epoch`` (resume)."""
        self.start_epoch, self.start_batch = epoch, batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's global order of dataset indices (every rank computes the same)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        need = self.batches_per_epoch * self.batch_size * self.world_size
        order: list[int] = []
        while len(order) < need:
            order.extend(torch.randperm(self.n, generator=g).tolist())
        return order[:need]

    def item_seed(self, epoch: int, pos: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, pos]).generate_state(1, np.uint64)[0]
        return int(state >> np.uint64(1))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.start_epoch, self.epochs):
            order = self.epoch_order(epoch)
            first = self.start_batch * self.batch_size if epoch == self.start_epoch else 0
            # rank r takes global positions r, r + world, ...: each global batch spans all ranks
            positions = range(self.rank, len(order), self.world_size)
            for pos in positions[first:]:
                yield order[pos], self.item_seed(epoch, pos)

    def __len__(self) -> int:
        per_epoch = self.batches_per_epoch * self.batch_size
        return max(0, (self.epochs - self.start_epoch) * per_epoch - self.start_batch * self.batch_size)
