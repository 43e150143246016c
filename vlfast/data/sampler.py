"""UNITER's token-bucket batch sampler, sharded across ranks, resumable mid-epoch.

Batching by tokens (UNITER ``data/sampler.py``): the sample indices are shuffled,
cut into buckets of ``bucket_size``, each bucket is sorted by length (longest
first) and filled greedily into batches whose *padded* cost -- longest sample x
number of samples -- stays within ``batch_size`` tokens.  Samples join a batch in
groups of ``size_multiple`` (8 by default), so batch sizes are multiples of it
except for a bucket's last batch.  Finally the batches are shuffled.

Sharding (``world_size > 1``).  Every rank builds the same *global* batches from
the same seeded permutation, with a budget of ``world_size x batch_size`` tokens
measured as ``max_len x ceil(n / world_size)``, growing in groups of
``world_size x size_multiple`` samples.  A global batch (sorted longest first) is
then dealt round-robin: rank ``r`` gets its items ``r, r + W, r + 2W, ...``.  So

* every rank's part holds ``ceil(n/W)`` or ``floor(n/W)`` samples, none longer
  than the global batch's longest, and therefore costs at most ``batch_size``
  padded tokens;
* the ranks' parts of a global batch are disjoint and together are the global
  batch: across ranks, every index appears exactly once per epoch (unless
  ``droplast``, which drops each bucket's last, partial batch, as UNITER does);
* the round-robin deal gives every rank a similar length profile, so no rank
  waits on a rank that got all the long samples;
* every rank sees the same number of batches per epoch (DDP needs it).

A global batch with fewer than ``W`` samples (a bucket's tail) would leave a rank
empty-handed: such tails are pooled and re-batched at the end of the epoch; if the
very last pooled batch still has fewer than ``W`` samples it is dropped under
``droplast`` and otherwise topped up by repeating its own samples (the only case
where an index is seen twice in an epoch; it needs fewer than ``W`` samples left
over after all buckets).

Determinism and resume.  The batches of epoch ``e`` depend only on ``(seed, e)``
and the lengths, never on the rank or on global RNG state; ``set_epoch(e)`` picks
the epoch.  ``state_dict()`` records the epoch and how many batches of it were
consumed; after ``load_state_dict`` the next iteration skips those batches and
continues at the same data position (later epochs start from the beginning).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["TokenBucketSampler"]

_STATE_KEYS = ("num_samples", "bucket_size", "batch_size", "size_multiple", "droplast", "seed",
               "world_size", "shuffle")


class TokenBucketSampler(Sampler[list[int]]):
    """Batches of sample indices whose padded token count stays within a budget.

    Args:
        lens: (N,) the length of every sample in tokens (UNITER: words + regions).
        bucket_size: how many shuffled samples are sorted together before batching.
        batch_size: the per-rank budget in padded tokens (max length x batch size).
        droplast: drop each bucket's last, partial batch.
        size_multiple: samples join a (per-rank) batch in groups of this many.
        seed: the batches of an epoch are a function of (seed, epoch).
        rank, world_size: this process's shard of every global batch.
        shuffle: False keeps the index order (buckets and batches in order), for
            evaluation; the length sorting within a bucket still applies.

    Iterating yields lists of indices into ``lens`` (use as a DataLoader
    ``batch_sampler``).  ``len(sampler)`` is the number of batches per rank in the
    current epoch (the same on every rank).
    """

    def __init__(self, lens: Sequence[int], bucket_size: int, batch_size: int, droplast: bool = False,
                 size_multiple: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        arr = np.asarray(lens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"TokenBucketSampler: lens: expected a non-empty 1-d sequence of lengths, "
                             f"got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
                raise ValueError(f"TokenBucketSampler: lens: expected integer lengths, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.min() < 1:
            bad = int(np.argmin(arr))
            raise ValueError(f"TokenBucketSampler: lens: expected lengths >= 1, got lens[{bad}] = {arr[bad]}")
        for name, v in (("bucket_size", bucket_size), ("batch_size", batch_size),
                        ("size_multiple", size_multiple), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TokenBucketSampler: {name}: expected a positive int, got {v!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"TokenBucketSampler: rank: expected an int in [0, {world_size}), got {rank!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"TokenBucketSampler: seed: expected a non-negative int, got {seed!r}")
        # the smallest group of the longest sample must fit, or no batch could ever form
        need = int(arr.max()) * size_multiple
        if need > batch_size:
            raise ValueError(f"TokenBucketSampler: batch_size: expected at least max(lens) x size_multiple = "
                             f"{arr.max()} x {size_multiple} = {need} tokens, got {batch_size}")
        self._lens = arr
        self.bucket_size = int(bucket_size)
        self.batch_size = int(batch_size)
        self.droplast = bool(droplast)
        self.size_multiple = int(size_multiple)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._start = 0          # batches of self.epoch to skip (set by load_state_dict)
        self._consumed = 0       # batches of self.epoch handed out so far
        self._cache: Optional[tuple[int, list[list[int]]]] = None

    # -- epochs and batches ---------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (from its start)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"TokenBucketSampler.set_epoch: epoch: expected a non-negative int, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._start = 0
            self._consumed = 0
        self.epoch = int(epoch)

    def _fill(self, order: np.ndarray) -> tuple[list[list[int]], Optional[list[int]]]:
        """Greedy fill of one length-sorted bucket: full batches, and the tail (or None)."""
        W, m, budget, lens = self.world_size, self.size_multiple, self.batch_size, self._lens
        group = W * m
        batches: list[list[int]] = []
        cur: list[int] = []
        max_len = 0
        for s in range(0, len(order), group):
            g = order[s:s + group].tolist()
            new_max = max(max_len, int(lens[g].max()))
            if new_max * math.ceil((len(cur) + len(g)) / W) > budget:
                # cur is non-empty here: __init__ checked that one group always fits
                batches.append(cur)
                cur, max_len = g, int(lens[g].max())
            else:
                cur.extend(g)
                max_len = new_max
        return batches, (cur or None)

    def global_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The epoch's global batches (each sorted longest first), in iteration order."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self._lens)
        rng = np.random.default_rng([self.seed, epoch])
        ids = rng.permutation(n) if self.shuffle else np.arange(n)
        W = self.world_size
        batches: list[list[int]] = []
        pool: list[int] = []
        for s in range(0, n, self.bucket_size):
            bucket = ids[s:s + self.bucket_size]
            # longest first; ties keep the shuffled order (stable sort)
            bucket = bucket[np.argsort(-self._lens[bucket], kind="stable")]
            full, tail = self._fill(bucket)
            batches.extend(full)
            if tail is not None and not self.droplast:
                if len(tail) >= W:
                    batches.append(tail)
                else:
                    pool.extend(tail)
        if pool:
            arr = np.asarray(pool, dtype=np.int64)
            arr = arr[np.argsort(-self._lens[arr], kind="stable")]
            full, tail = self._fill(arr)
            batches.extend(full)
            if tail is not None:
                if len(tail) < W:
                    reps = (tail * W)[:W]          # top up by repeating its own samples
                    tail = sorted(reps, key=lambda i: -int(self._lens[i]))
                batches.append(tail)
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of the epoch (all of them, ignoring the resume position)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        out = [b[self.rank::self.world_size] for b in self.global_batches(epoch)]
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        start, self._start = self._start, 0
        self._consumed = start
        for b in batches[start:]:
            self._consumed += 1
            yield list(b)

    def __len__(self) -> int:
        return len(self.batches())

    # -- resume ---------------------------------------------------------------------

    def state_dict(self, consumed: Optional[int] = None) -> dict[str, Any]:
        """The data position: epoch and batches of it consumed, plus the settings that
        make it meaningful.

        ``consumed`` defaults to the batches this sampler has handed out in the current
        epoch, which is exact when the sampler is iterated directly or by a DataLoader
        with ``num_workers=0``; with worker processes the DataLoader prefetches ahead,
        so pass the number of batches the training loop actually consumed.
        """
        pos = self._consumed if consumed is None else int(consumed)
        if pos < 0:
            raise ValueError(f"TokenBucketSampler.state_dict: consumed: expected >= 0, got {pos}")
        return {"epoch": self.epoch, "consumed": pos, "num_samples": len(self._lens),
                "bucket_size": self.bucket_size, "batch_size": self.batch_size,
                "size_multiple": self.size_multiple, "droplast": self.droplast, "seed": self.seed,
                "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the recorded position: the next iteration yields the recorded
        epoch's batches from batch ``consumed`` on.  The settings must match (the
        rank may differ: all ranks share one position)."""
        for k in ("epoch", "consumed") + _STATE_KEYS:
            if k not in state:
                raise ValueError(f"TokenBucketSampler.load_state_dict: state: missing key {k!r}")
        mine = self.state_dict(0)
        for k in _STATE_KEYS:
            if state[k] != mine[k]:
                raise ValueError(f"TokenBucketSampler.load_state_dict: {k}: the state was saved with "
                                 f"{state[k]!r}, this sampler has {mine[k]!r}")
        self.set_position(int(state["epoch"]), int(state["consumed"]))

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from batch ``consumed`` on
        (the skipped batches are never materialised by a DataLoader)."""
        self.set_epoch(epoch)
        n = len(self.batches(epoch))
        if not isinstance(consumed, (int, np.integer)) or not 0 <= consumed <= n:
            raise ValueError(f"TokenBucketSampler.set_position: consumed: expected 0..{n} "
                             f"(batches in epoch {epoch}), got {consumed!r}")
        self._start = int(consumed)
        self._consumed = int(consumed)
