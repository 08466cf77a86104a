"""How the router picks a replica for a request (`lmforge router --policy P`): pure logic, no I/O, so each policy
is tested on scripted workloads.

    policy = make_policy("cache_aware", ["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
    url = policy.choose(Route(text=rendered_prompt, session=None), load={url: in_flight, ...})
    policy.routed(url, route)                    # after the choice: cache_aware remembers the prompt there

- `round_robin`: each healthy replica in turn.
- `least_loaded`: the fewest requests in flight (the router's own counts, or a replica's scraped running + waiting
  when higher: another router may be sending it work too).
- `session`: a consistent hash of the session key (the `X-Session-Id` header or the request's `user`) onto a ring
  of virtual nodes, so one conversation keeps landing where its KV prefix is cached, and a replica leaving moves
  only its own sessions; requests without a key go to the least loaded.
- `cache_aware` (SGLang's router, Zheng et al. 2024, "SGLang: Efficient Execution of Structured Language Model
  Programs", §4): per replica, an approximate radix tree of the prompt text it was sent. When the load is balanced,
  a request goes to the replica whose tree holds the longest prefix of its prompt if that prefix covers more than
  `cache_threshold` of it (0.5), else to the replica with the smallest tree (the most room); when imbalanced (the
  busiest has more than `balance_abs` (32) requests above the idlest and more than `balance_rel` (1.0001) times its
  load), to the least loaded. Unlike SGLang's router, which has no notion of a replica's batch, a replica that is
  full (its load at its `--max-batch`, read from its /metrics) is passed over while another has a free slot:
  waiting for a slot costs a whole reply's decoding, recomputing a prefix one prefill. The tree works at
  `block_chars` granularity and is stored as the hashes of its root-to-node paths (each hash names one tree node,
  as vLLM names KV blocks), in LRU order, at most `max_blocks` per replica: bounded memory, O(prompt length /
  block_chars) per request.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

POLICIES = ("round_robin", "least_loaded", "session", "cache_aware")


@dataclass(frozen=True)
class Route:
    text: str  # the full rendered prompt (all messages of a chat, in order), not the first message
    session: str | None = None


class Policy:
    def __init__(self, replicas: list[str]):
        if not replicas:
            raise ValueError("a router needs at least one --backend")
        self.replicas = list(replicas)
        self.capacity: dict[str, int] = {}  # requests each replica decodes at once, when the router has read it

    def choose(self, route: Route, load: dict[str, int]) -> str:
        """One of `load`'s keys (the healthy, routable replicas, with their loads)."""
        raise NotImplementedError

    def routed(self, replica: str, route: Route) -> None:
        """The request went to `replica` (called once per request that was sent)."""


def least_loaded(load: dict[str, int]) -> str:
    return min(load, key=lambda r: (load[r], r))


class RoundRobin(Policy):
    def __init__(self, replicas):
        super().__init__(replicas)
        self._turn = itertools.count()

    def choose(self, route, load):
        order = [r for r in self.replicas if r in load]
        return order[next(self._turn) % len(order)]


class LeastLoaded(Policy):
    def choose(self, route, load):
        return least_loaded(load)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Session(Policy):
    VIRTUAL_NODES = 64  # per replica: sessions spread evenly, and a leaving replica's share moves to all others

    def __init__(self, replicas):
        super().__init__(replicas)
        self._ring = sorted((_hash(f"{r}#{v}"), r) for r in self.replicas for v in range(self.VIRTUAL_NODES))
        self._points = [p for p, _ in self._ring]

    def owner(self, key: str, routable) -> str | None:
        """The first routable replica clockwise from the key's point on the ring."""
        start = bisect.bisect(self._points, _hash(key))
        for i in range(len(self._ring)):
            replica = self._ring[(start + i) % len(self._ring)][1]
            if replica in routable:
                return replica
        return None

    def choose(self, route, load):
        if route.session is None:
            return least_loaded(load)
        return self.owner(route.session, load)


class CacheAware(Policy):
    # cache_threshold and the balance thresholds are SGLang router's defaults (0.5, 32, 1.0001): spill to the
    # least loaded only when a replica is far behind; a lower balance_abs trades hits for evenness
    def __init__(self, replicas, *, cache_threshold: float = 0.5, balance_abs: int = 32, balance_rel: float = 1.0001,
                 block_chars: int = 32, max_blocks: int = 65536):  # fmt: skip
        super().__init__(replicas)
        self.cache_threshold, self.balance_abs, self.balance_rel = cache_threshold, balance_abs, balance_rel
        self.block_chars, self.max_blocks = block_chars, max_blocks
        self.trees: dict[str, OrderedDict[int, None]] = {r: OrderedDict() for r in self.replicas}

    def _paths(self, text: str) -> list[int]:
        """The hash of each block-aligned prefix of `text`: the tree nodes its path passes through."""
        out, h = [], b""
        for start in range(0, len(text) - self.block_chars + 1, self.block_chars):
            h = hashlib.blake2b(h + text[start : start + self.block_chars].encode(), digest_size=8).digest()
            out.append(int.from_bytes(h, "big"))
        return out

    def matched_chars(self, replica: str, text: str, paths: list[int] | None = None) -> int:
        """How much of `text`'s beginning the replica's tree holds (to block granularity); `paths`: the text's
        `_paths`, when already hashed."""
        tree, n = self.trees[replica], 0
        for node in self._paths(text) if paths is None else paths:
            if node not in tree:
                break
            n += 1
        return n * self.block_chars

    def imbalanced(self, load: dict[str, int]) -> bool:
        hi, lo = max(load.values()), min(load.values())
        return hi - lo > self.balance_abs and hi > self.balance_rel * lo

    def choose(self, route, load):
        if len(load) == 1 or self.imbalanced(load):
            return least_loaded(load)
        # a full replica (load at its batch) is passed over while another has a free slot
        room = {r: n for r, n in load.items() if n < self.capacity.get(r, 1 << 30)} or load
        paths = self._paths(route.text)  # hashed once, matched against every tree
        matched = {r: self.matched_chars(r, route.text, paths) for r in room}
        best = max(room, key=lambda r: (matched[r], -room[r]))
        if route.text and matched[best] > self.cache_threshold * len(route.text):
            return best
        return min(room, key=lambda r: (len(self.trees[r]), room[r], r))

    def routed(self, replica, route):
        tree = self.trees[replica]
        # insert, or refresh, deepest node first: an ancestor is always more recent than its descendants, so
        # LRU eviction takes leaves first and never orphans a path's tail
        for node in reversed(self._paths(route.text)):
            tree[node] = None
            tree.move_to_end(node)
        while len(tree) > self.max_blocks:  # LRU eviction: the least recently used nodes go first
            tree.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica that restarted has lost its KV cache: its tree starts empty."""
        self.trees[replica].clear()


def make_policy(name: str, replicas: list[str], **options) -> Policy:
    kinds = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "session": Session, "cache_aware": CacheAware}
    if name not in kinds:
        raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    return kinds[name](replicas, **options)
