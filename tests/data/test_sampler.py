"""TokenBucketSampler: hand-computed batches, token budget, sharding, determinism, resume."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from vlfast.data.sampler import TokenBucketSampler


def _lens(n: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 120, size=n)


def _all_ranks(lens, world_size, **kw):
    return [TokenBucketSampler(lens, rank=r, world_size=world_size, **kw) for r in range(world_size)]


# -- hand-computed ---------------------------------------------------------------------

def test_hand_computed_single_rank():
    # sorted longest first: 2(8) 4(7) 0(5) 1(3) 3(2) 5(1); budget 10 tokens, groups of 1:
    # [2]: 8; +4 -> 8*2=16 > 10 | [4]: 7; +0 -> 14 > 10 | [0]: 5; +1 -> 10 ok; +3 -> 15 > 10
    # | [3]: 2; +5 -> 4 ok -> tail [3, 5]
    s = TokenBucketSampler([5, 3, 8, 2, 7, 1], bucket_size=100, batch_size=10, size_multiple=1, shuffle=False)
    assert list(s) == [[2], [4], [0, 1], [3, 5]]
    assert len(s) == 4
    # UNITER's droplast drops the bucket's last batch
    s = TokenBucketSampler([5, 3, 8, 2, 7, 1], bucket_size=100, batch_size=10, size_multiple=1, shuffle=False,
                           droplast=True)
    assert list(s) == [[2], [4], [0, 1]]


def test_hand_computed_two_ranks():
    # global budget: max_len x ceil(n / 2) <= 10, groups of 2 = world_size x size_multiple:
    # [2, 4]: 8 x 1 = 8 ok; + [0, 1] -> 8 x 2 = 16 > 10 | [0, 1]: 5; + [3, 5] -> 5 x 2 = 10 ok
    # global batches [[2, 4], [0, 1, 3, 5]], dealt round-robin
    lens = [5, 3, 8, 2, 7, 1]
    s0, s1 = _all_ranks(lens, 2, bucket_size=100, batch_size=10, size_multiple=1, shuffle=False)
    assert s0.global_batches() == [[2, 4], [0, 1, 3, 5]]
    assert list(s0) == [[2], [0, 3]]
    assert list(s1) == [[4], [1, 5]]


def test_bucket_boundaries_and_size_multiple():
    # buckets of 4 (in order): [0..3] and [4..7]; batches never mix buckets
    lens = [10, 10, 10, 10, 1, 1, 1, 1]
    s = TokenBucketSampler(lens, bucket_size=4, batch_size=40, size_multiple=2, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # budget 30: groups of 2 -> [0,1] 20, +[2,3] 40 > 30 -> sizes are multiples of 2
    s = TokenBucketSampler(lens, bucket_size=4, batch_size=30, size_multiple=2, shuffle=False)
    assert list(s) == [[0, 1], [2, 3], [4, 5, 6, 7]]


# -- properties on random lengths ----------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_budget_coverage_disjoint(world_size):
    lens = _lens(700)
    budget, m = 1200, 4
    samplers = _all_ranks(lens, world_size, bucket_size=64, batch_size=budget, size_multiple=m, seed=3)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1                      # same number of batches per rank
    glob = samplers[0].global_batches()
    assert len(glob) == len(per_rank[0])
    seen = collections.Counter()
    for k, g in enumerate(glob):
        parts = [p[k] for p in per_rank]
        assert all(len(part) >= 1 for part in parts)                   # nobody empty-handed
        flat = [i for part in parts for i in part]
        assert sorted(flat) == sorted(g)                               # the ranks' parts make the global batch
        assert len(set(flat)) == len(flat)                             # and are disjoint
        for part in parts:
            assert lens[part].max() * len(part) <= budget              # padded tokens within budget
        seen.update(g)
    assert sorted(seen) == list(range(len(lens)))                      # every index ...
    assert set(seen.values()) == {1}                                   # ... exactly once per epoch
    # batches grow in groups of size_multiple per rank: with droplast (no bucket tails)
    # every per-rank batch is a multiple of it
    for s in _all_ranks(lens, world_size, bucket_size=64, batch_size=budget, size_multiple=m, seed=3,
                        droplast=True):
        assert all(len(b) % m == 0 and lens[b].max() * len(b) <= budget for b in s)


def test_round_robin_balances_lengths():
    lens = _lens(400, seed=5)
    s0, s1 = _all_ranks(lens, 2, bucket_size=400, batch_size=2000, size_multiple=8)
    for b0, b1 in zip(s0, s1):
        # rank 0 holds items 0, 2, 4, ... of the sorted global batch, rank 1 items 1, 3, ...
        assert len(b0) - len(b1) in (0, 1)
        assert all(lens[x] >= lens[y] for x, y in zip(b0, b1))
        assert all(lens[y] >= lens[x] for x, y in zip(b0[1:], b1))


def test_small_tail_is_topped_up():
    # 3 samples, 4 ranks: the only batch has fewer samples than ranks: every rank gets one,
    # one sample twice (documented); droplast drops it instead
    lens = [4, 9, 6]
    per = [list(s) for s in _all_ranks(lens, 4, bucket_size=10, batch_size=100, size_multiple=1)]
    assert all(len(p) == 1 and len(p[0]) == 1 for p in per)
    got = collections.Counter(p[0][0] for p in per)
    assert set(got) == {0, 1, 2} and sum(got.values()) == 4
    per = [list(s) for s in _all_ranks(lens, 4, bucket_size=10, batch_size=100, size_multiple=1, droplast=True)]
    assert all(p == [] for p in per)


def test_pooled_tails_are_all_covered():
    # buckets of 5 with 2 ranks and groups of 8: every bucket ends in a tail; tails with
    # fewer samples than ranks are pooled and re-batched, so still every index once
    lens = _lens(101, seed=7)
    samplers = _all_ranks(lens, 3, bucket_size=7, batch_size=10_000, size_multiple=8, seed=1)
    seen = collections.Counter(i for s in samplers for b in s for i in b)
    assert sorted(seen) == list(range(101)) and set(seen.values()) == {1}


def test_determinism_and_epochs():
    lens = _lens(300)
    a = TokenBucketSampler(lens, 50, 1500, seed=11)
    b = TokenBucketSampler(lens, 50, 1500, seed=11)
    assert list(a) == list(b)
    ep0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != ep0
    a.set_epoch(0)
    assert list(a) == ep0
    assert list(TokenBucketSampler(lens, 50, 1500, seed=12)) != ep0
    # global RNG state plays no part
    np.random.seed(0)
    torch.manual_seed(0)
    assert list(TokenBucketSampler(lens, 50, 1500, seed=11)) == ep0
    # every rank builds the same global batches
    r0, r1 = _all_ranks(lens, 2, bucket_size=50, batch_size=1500, seed=11)
    assert r0.global_batches(3) == r1.global_batches(3)


def test_resume_mid_epoch():
    lens = _lens(400)
    kw = dict(bucket_size=64, batch_size=1500, seed=2, rank=1, world_size=2)
    s = TokenBucketSampler(lens, **kw)
    s.set_epoch(2)
    full = s.batches()
    it = iter(s)
    first = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 5
    r = TokenBucketSampler(lens, **kw)
    r.load_state_dict(state)
    rest = list(r)
    assert first + rest == full
    # the next epoch starts from its beginning
    r.set_epoch(3)
    assert list(r) == s.batches(3)
    # an explicit position (the loop's own count, with a prefetching DataLoader)
    r = TokenBucketSampler(lens, **{**kw, "rank": 0})
    r.load_state_dict(s.state_dict(consumed=7))
    assert list(r) == r.batches(2)[7:]
    r.set_position(2, 3)
    assert list(r) == r.batches(2)[3:]


def test_resume_through_dataloader():
    lens = _lens(200)
    s = TokenBucketSampler(lens, 40, 1000, seed=4)
    data = list(range(len(lens)))
    dl = torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=list)
    got = []
    for k, b in enumerate(dl):
        got.append(b)
        if k == 2:
            state = s.state_dict()
            break
    assert state["consumed"] == 3
    s2 = TokenBucketSampler(lens, 40, 1000, seed=4)
    s2.load_state_dict(state)
    got += list(torch.utils.data.DataLoader(data, batch_sampler=s2, collate_fn=list))
    assert got == s.batches(0) and len(dl) == len(s)


def test_errors():
    with pytest.raises(ValueError, match="batch_size: expected at least max\\(lens\\) x size_multiple = 9 x 8 = 72"):
        TokenBucketSampler([3, 9], 10, 71)
    with pytest.raises(ValueError, match="rank: expected an int in \\[0, 2\\), got 2"):
        TokenBucketSampler([3, 9], 10, 100, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lens\\[1\\] = 0"):
        TokenBucketSampler([3, 0], 10, 100)
    with pytest.raises(ValueError, match="lens: expected integer lengths"):
        TokenBucketSampler([3.5, 2.0], 10, 100)
    s = TokenBucketSampler([3, 9, 4], 10, 100)
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size: the state was saved with 100, this sampler has 200"):
        TokenBucketSampler([3, 9, 4], 10, 200).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        TokenBucketSampler([3, 9, 4], 10, 100, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed: expected 0..1"):
        s.load_state_dict({**state, "consumed": 5})
    with pytest.raises(ValueError, match="missing key 'seed'"):
        s.load_state_dict({k: v for k, v in state.items() if k != "seed"})
