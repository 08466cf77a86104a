"""The routing policies on scripted workloads (lmforge/serve/policies.py): no servers, just choices."""

from __future__ import annotations

import random

import pytest

from lmforge.serve.policies import CacheAware, Route, Session, make_policy

A, B, C = "http://a", "http://b", "http://c"
SYSTEM = "You are a careful assistant who answers questions about Python. " * 4  # ~260 characters


def test_round_robin_takes_turns_over_the_routable_ones():
    p = make_policy("round_robin", [A, B, C])
    assert [p.choose(Route("x"), {A: 0, B: 0, C: 0}) for _ in range(6)] == [A, B, C, A, B, C]
    assert {p.choose(Route("x"), {A: 0, C: 0}) for _ in range(4)} == {A, C}  # B is out


def test_least_loaded_picks_the_fewest_in_flight():
    p = make_policy("least_loaded", [A, B, C])
    assert p.choose(Route("x"), {A: 3, B: 1, C: 2}) == B
    assert p.choose(Route("x"), {A: 0, B: 0, C: 0}) == A  # ties: a fixed order


def test_session_keeps_a_conversation_and_moves_only_the_lost_replicas_sessions():
    p = Session([A, B, C])
    keys = [f"user-{i}" for i in range(300)]
    before = {k: p.choose(Route("x", k), {A: 0, B: 0, C: 0}) for k in keys}
    assert all(p.choose(Route("y", k), {A: 9, B: 0, C: 5}) == before[k] for k in keys)  # load does not move it
    assert all(60 <= sum(v == r for v in before.values()) <= 140 for r in (A, B, C))  # spread about evenly
    after = {k: p.choose(Route("x", k), {A: 0, C: 0}) for k in keys}  # B is gone
    assert all(after[k] == before[k] for k in keys if before[k] != B)  # consistent: only B's sessions move
    assert {after[k] for k in keys if before[k] == B} == {A, C}
    assert p.choose(Route("x", None), {A: 2, B: 1, C: 3}) == B  # no key: the least loaded


def test_cache_aware_sends_a_repeated_prefix_to_the_same_replica():
    p = CacheAware([A, B])
    first = p.choose(Route(SYSTEM + "Q1"), {A: 0, B: 0})
    p.routed(first, Route(SYSTEM + "Q1"))
    other = p.choose(Route("an unrelated prompt of its own, long enough to count"), {A: 0, B: 0})
    assert other != first  # no match anywhere: the replica with the smaller tree
    p.routed(other, Route("an unrelated prompt of its own, long enough to count"))
    for turn in range(5):  # a conversation that grows: each turn starts with the last one
        text = SYSTEM + "".join(f"Q{i} A{i} " for i in range(turn + 1))
        chosen = p.choose(Route(text), {A: 1, B: 1})
        assert chosen == first
        p.routed(chosen, Route(text))
    assert p.matched_chars(first, SYSTEM + "Q0 A0 Q1") >= len(SYSTEM) - p.block_chars


def test_cache_aware_spills_to_the_least_loaded_under_imbalance():
    p = CacheAware([A, B], balance_abs=4, balance_rel=1.5)
    p.routed(A, Route(SYSTEM))
    assert p.choose(Route(SYSTEM + "more"), {A: 3, B: 0}) == A  # 3 over: still balanced enough, the cache wins
    assert p.choose(Route(SYSTEM + "more"), {A: 8, B: 1}) == B  # 7 over and 8× the load: spill
    assert p.choose(Route(SYSTEM + "more"), {A: 40, B: 30}) == A  # far apart in count, not in ratio


def test_cache_aware_passes_over_a_full_replica_while_another_has_a_free_slot():
    p = CacheAware([A, B])
    p.routed(A, Route(SYSTEM))
    assert p.choose(Route(SYSTEM + "more"), {A: 4, B: 0}) == A  # capacity unknown: the cache wins
    p.capacity.update({A: 4, B: 4})
    assert p.choose(Route(SYSTEM + "more"), {A: 3, B: 0}) == A  # a slot left on A: still A
    assert p.choose(Route(SYSTEM + "more"), {A: 4, B: 3}) == B  # A full, B has room: B, though it misses
    assert p.choose(Route(SYSTEM + "more"), {A: 4, B: 4}) == A  # both full: the cache again
    assert p.choose(Route("no match anywhere, long enough"), {A: 4, B: 3}) == B  # no match: room first too


def test_cache_aware_memory_is_bounded_and_evicts_leaves_first():
    p = CacheAware([A], block_chars=8, max_blocks=50)
    rng = random.Random(0)
    for _ in range(200):
        p.routed(A, Route("".join(rng.choice("abcdef") for _ in range(160))))
    assert len(p.trees[A]) == 50
    p.routed(A, Route("z" * 160))  # 20 nodes, the most recent
    assert p.matched_chars(A, "z" * 160) == 160  # a path is kept whole: ancestors outlive their leaves
    p.routed(A, Route("y" * 320))  # 40 more nodes: the oldest go, from the leaves of old paths
    assert p.matched_chars(A, "y" * 320) == 320


def test_an_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="round_robin, least_loaded, session, cache_aware"):
        make_policy("random", [A])
