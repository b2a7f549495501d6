"""A seeded, resumable, rank-sharded sampler, and an endless batch iterator built on it.

Exact resume needs the data order to be a pure function of (seed, epoch) and the cursor to be part of the
checkpoint. :class:`ResumableSampler` draws each epoch's permutation from a ``torch.Generator`` seeded with
``seed + epoch`` (the same on every rank), gives rank r the indices ``perm[r::world_size]``, and counts
how many of them have been handed out; ``state_dict()`` is ``{epoch, position}``, and a sampler restored
from it yields exactly the indices an uninterrupted run would have yielded next.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation of ``range(num_items)``, resumable mid-epoch.

    - ``drop_last=True``: the permutation is cut to a multiple of ``world_size`` (every rank gets
      ``num_items // world_size`` indices, each item at most once per epoch); ``False``: it is padded by
      wrapping around so every rank gets ``ceil(num_items / world_size)``.
    - The position advances as indices are handed out, so with a ``DataLoader`` (``num_workers=0``, which
      fetches lazily) it counts consumed samples. Iterating again continues from the position; an epoch
      that is finished yields nothing until :meth:`set_epoch` moves to another epoch.
    - ``set_epoch(e)`` with a new ``e`` starts that epoch at position 0; with the current epoch it keeps the
      position, so a ``set_epoch`` call after ``load_state_dict`` does not undo a resume.
    """

    def __init__(self, num_items: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = True):
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        if drop_last:
            self.num_samples = self.num_items // self.world_size
        else:
            self.num_samples = -(-self.num_items // self.world_size)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_indices(self, epoch: Optional[int] = None) -> list[int]:
        """All of this rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.world_size
        if total > len(order) and order:
            order = (order * (-(-total // len(order))))[:total]
        order = order[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        epoch = self.epoch
        while self.position < len(indices):
            if self.epoch != epoch:  # set_epoch during iteration: this iterator is stale
                return
            index = indices[self.position]
            self.position += 1
            yield index

    @property
    def remaining(self) -> int:
        """Indices left in the current epoch."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        """``{epoch, position}`` plus the layout (``num_items``, ``world_size``, ``seed``) checked on load."""
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items,
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_items", "world_size", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this sampler has "
                                 f"{key}={getattr(self, key)}; exact resume needs the same data, seed and world size")
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler position {position} is outside this epoch (0..{self.num_samples})")
        self.epoch, self.position = int(state["epoch"]), position


class InfiniteBatches:
    """Endless batches of ``dataset`` in ``sampler`` order, moving to the next epoch automatically.

    Batches are ``collate([dataset[i] for i in indices])`` with ``batch_size`` indices (an incomplete last
    batch of an epoch is dropped when ``drop_last``). Items are fetched in this process, one batch at a
    time, so the sampler's position is exactly the number of items consumed and ``state_dict()`` resumes
    exactly.
    """

    def __init__(self, dataset, sampler: ResumableSampler, collate: Optional[Callable[[list], Any]] = None,
                 batch_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(sampler) < (batch_size if drop_last else 1):
            raise ValueError(f"an epoch has {len(sampler)} items on this rank, fewer than one batch of {batch_size}")
        if collate is None:
            from torch.utils.data import default_collate

            collate = default_collate
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.batch_size, self.drop_last = batch_size, drop_last
        self._it: Optional[Iterator[int]] = None

    def __iter__(self) -> "InfiniteBatches":
        return self

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                self._it = iter(self.sampler)
            indices: list[int] = []
            for index in self._it:
                indices.append(index)
                if len(indices) == self.batch_size:
                    return self.collate([self.dataset[i] for i in indices])
            self._it = None
            self.sampler.set_epoch(self.sampler.epoch + 1)
            if indices and not self.drop_last:
                return self.collate([self.dataset[i] for i in indices])

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._it = None


def infinite_batches(dataset, sampler: ResumableSampler, collate: Optional[Callable[[list], Any]] = None,
                     batch_size: int = 1, drop_last: bool = True) -> InfiniteBatches:
    """Shorthand for :class:`InfiniteBatches`."""
    return InfiniteBatches(dataset, sampler, collate, batch_size, drop_last)


def shard_indices(num_items: int, rank: int, world_size: int) -> Sequence[int]:
    """Rank-strided indices without shuffling or padding (evaluation over all items exactly once)."""
    return range(rank, num_items, world_size)
