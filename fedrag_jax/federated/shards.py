"""Per-client knowledge-store shards (``fed.client_stores: partition``).

Every passage of the store goes to exactly one client, by three rules in order:

    1. gold      a passage that a client's records name as their gold passage (``gold_id``)
                 goes to that client (named by several clients: the one with the most such
                 records, ties to the lower client id);
    2. topic     (partitions ``topic`` / ``dirichlet``) the other passages of a topic are
                 split among the clients in proportion to their records of that topic:
                 ``topic`` gives a whole topic to its one owner, ``dirichlet`` cuts the
                 topic's shuffled passages at the clients' shares (as it cuts the records);
    3. balance   what is left (``iid``, passages without a topic, topics no record has) is
                 shuffled by the seed and dealt, one at a time, to the smallest shard.

A silo's questions are about its own documents: without rule 1 a record's gold passage would
sit in another client's shard with probability (C-1)/C and LSR / RALT would learn from
distractors only. :func:`client_stores` cuts the store with ``KnowledgeStore.subset``: each
shard has its own index and the shards hold one copy of the embedding matrix between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..knowledge_store import KnowledgeStore

CLIENT_STORES = ("shared", "partition")


def shard_passages(passage_ids: Sequence[str], passage_topics: Sequence[str | None],
                   records: Sequence[Mapping[str, Any]], parts: Sequence[np.ndarray],
                   scheme: str = "iid", seed: int = 0, gold_key: str = "gold_id",
                   topic_key: str = "topic") -> list[np.ndarray]:
    """Indices into ``passage_ids``, one sorted array per client: disjoint, covering them all.

    ``parts[c]``: client c's record indices (``partition.partition``); ``scheme``: the
    partition that made them (its topic rule is followed for ``topic`` and ``dirichlet``).
    """
    num_clients, n = len(parts), len(passage_ids)
    owner = np.full(n, -1, np.int64)
    index = {str(p): i for i, p in enumerate(passage_ids)}
    # rule 1: gold passages follow the records that name them
    votes: dict[int, np.ndarray] = {}
    for c, rows in enumerate(parts):
        for r in np.asarray(rows, np.int64):
            gold = records[r].get(gold_key)
            if gold is not None and str(gold) in index:
                votes.setdefault(index[str(gold)], np.zeros(num_clients, np.int64))[c] += 1
    for i, v in votes.items():
        owner[i] = int(np.argmax(v))  # first maximum: ties go to the lower client id
    # rule 2: the rest of a topic follows the topic's records
    if scheme in ("topic", "dirichlet"):
        share: dict[str, np.ndarray] = {}
        for c, rows in enumerate(parts):
            for r in np.asarray(rows, np.int64):
                t = records[r].get(topic_key)
                if t:
                    share.setdefault(str(t), np.zeros(num_clients, np.int64))[c] += 1
        by_topic: dict[str, list[int]] = {}
        for i, t in enumerate(passage_topics):
            if owner[i] < 0 and t:
                by_topic.setdefault(str(t), []).append(i)
        rng = np.random.default_rng([seed, 3])
        for topic in sorted(share):
            if topic not in by_topic:
                continue
            members = rng.permutation(np.asarray(by_topic[topic], np.int64))
            weights = share[topic] / share[topic].sum()
            cuts = np.round(np.cumsum(weights)[:-1] * members.size).astype(int)
            for c, piece in enumerate(np.split(members, cuts)):
                owner[piece] = c
    # rule 3: the rest evens out the shard sizes
    sizes = np.bincount(owner[owner >= 0], minlength=num_clients)
    rest = np.random.default_rng([seed, 4]).permutation(np.flatnonzero(owner < 0))
    for i in rest:
        c = int(np.argmin(sizes))
        owner[i] = c
        sizes[c] += 1
    return [np.flatnonzero(owner == c) for c in range(num_clients)]


def client_stores(store: KnowledgeStore, records: Sequence[Mapping[str, Any]],
                  parts: Sequence[np.ndarray], config: Any, *, seed: int = 0,
                  min_size: int = 1) -> list[KnowledgeStore]:
    """One sub-store per client (rules above), each with at least ``min_size`` passages
    (the retrieval top-k: a smaller shard could not answer a search)."""
    ids = store.node_ids()
    topics = [m.get("topic") for m in store.node_metadata(ids)]
    shards = shard_passages(ids, topics, records, parts, getattr(config, "partition", "iid"),
                            seed)
    for c, rows in enumerate(shards):
        if len(rows) < min_size:
            raise ConfigError(
                f"client {c}'s knowledge-store shard holds {len(rows)} passages but retrieval "
                f"needs top_k={min_size}; with {len(ids)} passages and {len(parts)} clients "
                "use fewer clients, a smaller top_k, or fed.client_stores=shared")
    return [store.subset([ids[i] for i in rows]) for rows in shards]

