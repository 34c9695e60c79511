"""Split training records among clients: IID, non-IID by topic, or Dirichlet over topics.

Each scheme returns one sorted index array per client (indices into the records, which are
also the rows of a dataset built from them); :func:`subset` cuts a built LSR/RALT dataset
down to a client's rows, so the (expensive) retrieval and LM scoring run once.

    iid        a random equal split
    topic      whole topics per client (greedy: the largest topic to the smallest client)
    dirichlet  per topic, client shares ~ Dir(alpha): small alpha -> each topic on few clients
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..finetune.batches import LSRDataset, RALTDataset


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    _check(n, num_clients)
    order = np.random.default_rng([seed, 0]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def by_topic(topics: Sequence[str], num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Every topic goes whole to one client; sizes are balanced greedily."""
    _check(len(topics), num_clients)
    groups = _groups(topics)
    if len(groups) < num_clients:
        raise ConfigError(f"partition 'topic' needs at least one topic per client: "
                          f"{len(groups)} topics ({sorted(groups)}) for {num_clients} clients; "
                          "use fewer clients, or partition 'dirichlet' or 'iid'")
    rng = np.random.default_rng([seed, 1])
    names = sorted(groups)
    rng.shuffle(names)  # ties between equal-sized topics: broken by the seed
    names.sort(key=lambda t: -len(groups[t]))  # stable: keeps the shuffled order in ties
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for name in names:
        smallest = min(range(num_clients), key=lambda c: (len(parts[c]), c))
        parts[smallest].extend(groups[name])
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def dirichlet(topics: Sequence[str], num_clients: int, alpha: float, seed: int = 0,
              min_examples: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Per topic, the clients' shares are drawn from Dir(alpha, ..., alpha); redrawn until
    every client has at least ``min_examples`` records."""
    _check(len(topics), num_clients)
    if alpha <= 0:
        raise ConfigError(f"dirichlet_alpha={alpha} must be > 0 (small = more skewed)")
    groups = _groups(topics)
    rng = np.random.default_rng([seed, 2])
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for name in sorted(groups):
            members = rng.permutation(groups[name])
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for c, piece in enumerate(np.split(members, cuts)):
                parts[c].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_examples:
            return [np.sort(np.asarray(p, np.int64)) for p in parts]
    raise ConfigError(f"dirichlet partition with alpha={alpha} left a client with fewer than "
                      f"{min_examples} records in {max_tries} draws ({len(topics)} records, "
                      f"{num_clients} clients); raise dirichlet_alpha or use fewer clients")


def partition(records: Sequence[Mapping[str, Any]], num_clients: int, scheme: str = "iid", *,
              alpha: float = 0.5, seed: int = 0, topic_key: str = "topic") -> list[np.ndarray]:
    """Index arrays, one per client, by ``scheme`` in iid | topic | dirichlet."""
    if scheme == "iid":
        return iid(len(records), num_clients, seed)
    if scheme not in ("topic", "dirichlet"):
        raise ConfigError(f"unknown partition {scheme!r}; choose iid, topic or dirichlet")
    missing = [i for i, r in enumerate(records) if not r.get(topic_key)]
    if missing:
        raise DataError(f"partition {scheme!r} needs a {topic_key!r} field on every record; "
                        f"{len(missing)} records lack it (first: #{missing[0]}); use 'iid'")
    topics = [str(r[topic_key]) for r in records]
    if scheme == "topic":
        return by_topic(topics, num_clients, seed)
    return dirichlet(topics, num_clients, alpha, seed)


def partition_from_config(records: Sequence[Mapping[str, Any]], config: Any,
                          seed: int = 0) -> list[np.ndarray]:
    """:func:`partition` with a FederatedConfig's num_clients, partition, dirichlet_alpha."""
    return partition(records, config.num_clients, config.partition,
                     alpha=config.dirichlet_alpha, seed=seed)


def split_dataset(dataset: Any, records: Sequence[Mapping[str, Any]], config: Any,
                  seed: int = 0) -> list[Any]:
    """One dataset per client: ``dataset`` (built from ``records``, row i = record i) cut by
    the partition a FederatedConfig asks for."""
    if getattr(dataset, "n", len(records)) != len(records):
        raise DataError(f"the dataset has {dataset.n} rows but {len(records)} records were "
                        "given; build the dataset from exactly these records")
    return [subset(dataset, idx) for idx in partition_from_config(records, config, seed)]


def subset(dataset: Any, indices: np.ndarray) -> Any:
    """A client's share of a built dataset: the same arrays at ``indices``, same batch size,
    seed and (RALT) target length and packing (rows, shared prefix length), so every
    client's batches have one shape (packed: up to the row length, see
    ``local.client_batches``)."""
    idx = np.asarray(indices, np.int64)
    if idx.size == 0:
        raise DataError("a client received no training records; change the partition")
    if isinstance(dataset, LSRDataset):
        return LSRDataset({k: v[idx] for k, v in dataset.arrays.items()},
                          dataset.passage_ids[idx], batch_size=dataset.batch_size,
                          seed=dataset.seed, shuffle=dataset.shuffle)
    if isinstance(dataset, RALTDataset):
        sub = RALTDataset([dataset.prompts[i] for i in idx], [dataset.targets[i] for i in idx],
                          dataset.weights[idx], batch_size=dataset.batch_size,
                          pad_id=dataset.pad_id, buckets=dataset.buckets, seed=dataset.seed,
                          shuffle=dataset.shuffle)
        sub.target_length = dataset.target_length
        if dataset.pack_rows:
            sub.pack(dataset.pack_rows, dataset.pack_groups,
                     prefix_length=dataset.prefix_length)
        return sub
    raise DataError(f"cannot take a subset of a {type(dataset).__name__}; pass per-client "
                    "datasets yourself (anything with __len__ and batch_at(epoch, index))")


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be >= 1")
    if n < num_clients:
        raise ConfigError(f"{n} records cannot be split among {num_clients} clients; "
                          "use fewer clients or more data")


def _groups(topics: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(topics):
        groups.setdefault(t, []).append(i)
    return groups
