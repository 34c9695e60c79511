"""Where a batch is built: records {"query", "response"} -> fixed-shape arrays.

LSR (retriever):  for each query, its top-k passages from the store (ids + frozen
    embeddings), the retriever's query tokens, and log p_LM(response | prompt(query, d)) for
    every passage d, scored by the frozen generator in large batched forwards.
RALT (generator): one instance per (query, passage): prompt(query, passage) + response + EOS,
    left-padded to a length bucket, with the positions that predict response + EOS (the only
    labelled tokens). The passage is truncated to fit, never the response. With
    ``context="concat"``: one instance per query, all its passages in one prompt.
    Packed (``pack_rows``): instead of one left-padded row each, the instances of every
    micro-batch share a fixed number of rows (first-fit decreasing) at the smallest length
    bucket that holds them, with per-token segment ids; the labelled positions are the same
    per instance, now read from the instance's row.

Both datasets serve ``batch_at(epoch, index)``: a deterministic function of the data position
(shuffled by a per-epoch seed), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..generator import DEFAULT_LENGTH_BUCKETS, Generator, bucket_length, left_pad
from ..jsonl import read_jsonl
from ..paths import local_copy
from ..progress import progress_bar
from ..types import DEFAULT_PROMPT_TEMPLATE

_SLOT = "\x00CONTEXT\x00"


# --- records ---------------------------------------------------------------------------------
def load_records(source: Any) -> list[dict]:
    """Records from a list of dicts, an HF ``datasets.Dataset`` or a JSONL file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(local_copy(source, "JSONL file"))  # local, or gs:// fetched once
        if not path.is_file():
            raise DataError(f"no such JSONL file: {path}")
        records = [row for _, row in read_jsonl(path)]
    else:
        records = [dict(r) for r in source]
    if not records:
        raise DataError("no training records")
    for i, r in enumerate(records):
        for key in ("query", "response"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise DataError(f"record {i} needs a non-empty string {key!r}; got {r!r:.200}")
    return records


# --- prompts ---------------------------------------------------------------------------------
@dataclass
class PromptBuilder:
    """Token ids of prompt(query, passage) with the passage cut to a budget.

    The prompt is rendered once with a placeholder for the context (through the chat template
    for instruct models), split there, and the three parts are tokenized separately, so the
    passage can be truncated in tokens without touching the query or the response.
    """

    generator: Generator
    template: str = DEFAULT_PROMPT_TEMPLATE
    max_passage_tokens: int | None = None  # as RAGSystem(max_context_tokens=...) at inference

    def parts(self, query: str) -> tuple[list[int], list[int]]:
        rendered = self.generator.format_prompt(self.template.format(context=_SLOT, query=query))
        left, right = rendered.split(_SLOT)
        tok = self.generator.tokenizer
        special = not self.generator.use_chat_template
        left_ids = tok(left, add_special_tokens=special)["input_ids"]
        right_ids = tok(right, add_special_tokens=False)["input_ids"]
        return left_ids, right_ids

    def passage_ids(self, passages: Sequence[str]) -> list[list[int]]:
        ids = self.generator.tokenizer(list(passages), add_special_tokens=False)["input_ids"]
        return [p[: self.max_passage_tokens] for p in ids] if self.max_passage_tokens else ids

    def separator_ids(self, separator: str) -> list[int]:
        """Tokens of the separator that joins passages in a concat prompt."""
        return self.generator.tokenizer(separator, add_special_tokens=False)["input_ids"]

    def target_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """Response tokens + EOS (the labels of RALT, the target of LSR's LM score)."""
        eos = int(self.generator.stop_ids[0])
        # after "Answer:" a plain prompt continues with a space; a chat turn starts fresh
        lead = "" if self.generator.use_chat_template else " "
        ids = self.generator.tokenizer([lead + r.strip() for r in responses],
                                       add_special_tokens=False)["input_ids"]
        return [list(t) + [eos] for t in ids]


def assemble(left: list[int], passage: list[int], right: list[int], target: list[int],
             max_length: int) -> list[int]:
    """prompt + target within ``max_length`` tokens, cutting the passage only."""
    budget = max_length - len(left) - len(right) - len(target)
    if budget < 0:
        raise DataError(f"query + response take {len(left) + len(right) + len(target)} tokens, "
                        f"more than max_length={max_length}; raise max_length")
    return left + passage[:budget] + right


def _target_length(targets: Sequence[list[int]], target_length: int | None) -> int:
    """The label columns: ``target_length`` (refused if a target is longer: its labels would
    no longer line up with the positions that predict them) or the longest target."""
    longest = max(len(t) for t in targets)
    if target_length is not None and longest > target_length:
        raise DataError(f"a target has {longest} tokens, more than target_length="
                        f"{target_length}; the response is never truncated: raise "
                        "target_length (or leave it unset)")
    return target_length or longest


def assemble_concat(left: list[int], passages: Sequence[list[int]], separator: list[int],
                    right: list[int], target: list[int], max_length: int) -> list[int]:
    """prompt(query, all passages joined by ``separator``) + target within ``max_length``
    tokens (the concat prompt of ``RAGConfig.format_prompt``), cutting the passages only:
    the longest are cut to one common length (the best-ranked get any token left over), so
    every passage keeps a share."""
    fixed = len(left) + len(right) + len(target) + len(separator) * max(len(passages) - 1, 0)
    budget = max_length - fixed
    if budget < 0:
        raise DataError(f"query + response + separators take {fixed} tokens, more than "
                        f"max_length={max_length}; raise max_length")
    lengths = [len(p) for p in passages]
    keep = lengths
    if sum(lengths) > budget:
        lo, hi = 0, max(lengths)  # the largest common cap m with sum(min(len, m)) <= budget
        while lo < hi:
            m = (lo + hi + 1) // 2
            lo, hi = (m, hi) if sum(min(n, m) for n in lengths) <= budget else (lo, m - 1)
        keep = [min(n, lo) for n in lengths]
        extra = budget - sum(keep)
        for i, n in enumerate(lengths):
            if extra and n > keep[i]:
                keep[i], extra = keep[i] + 1, extra - 1
    context: list[int] = []
    for i, (p, n) in enumerate(zip(passages, keep, strict=True)):
        context += (separator if i else []) + list(p[:n])
    return left + context + right


def target_arrays(prompts: Sequence[list[int]], targets: Sequence[list[int]],
                  buckets: Sequence[int], pad_id: int, target_length: int | None = None):
    """Left-padded prompt+target ids and the positions that predict each target token."""
    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    length = bucket_length(max(len(r) for r in rows), buckets)
    ids, mask = left_pad(rows, length, pad_id)
    t_len = _target_length(targets, target_length)
    n = len(rows)
    target = np.zeros((n, t_len), np.int32)
    index = np.zeros((n, t_len), np.int32)
    tmask = np.zeros((n, t_len), bool)
    for i, t in enumerate(targets):
        target[i, :len(t)] = t
        index[i, :len(t)] = np.arange(length - len(t) - 1, length - 1)
        tmask[i, :len(t)] = True
    return {"input_ids": ids, "attention_mask": mask, "target_index": index,
            "target_ids": target, "target_mask": tmask}


def first_fit_decreasing(lengths: Sequence[int], rows: int, capacity: int) -> list[int] | None:
    """The row of each item when items longest first go to the first row with room, or None
    if ``rows`` rows of ``capacity`` cannot hold them that way."""
    free = [capacity] * rows
    row_of = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in order
        row = next((r for r in range(rows) if free[r] >= lengths[i]), None)
        if row is None:
            return None
        row_of[i], free[row] = row, free[row] - lengths[i]
    return row_of


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``seqs`` have in common."""
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n


def packed_layout(lengths: Sequence[int], rows: int, buckets: Sequence[int],
                  groups: int = 1, min_length: int = 0) -> tuple[int, list[list[int]]]:
    """The row length (the smallest bucket that fits, and at least ``min_length``) and each
    group's rows, when the sequences of ``groups`` equal consecutive groups go first-fit
    decreasing into ``rows / groups`` rows each."""
    n = len(lengths)
    if rows % groups or n % groups:
        raise DataError(f"{n} sequences in {rows} packed rows cannot form {groups} equal "
                        "micro-batches; make rows and sequences multiples of micro_batches")
    per_group, rows_per_group = n // groups, rows // groups
    group_lengths = [list(lengths[g * per_group:(g + 1) * per_group]) for g in range(groups)]
    length = bucket_length(max(min_length, max(lengths), max(
        -(-sum(x) // rows_per_group) for x in group_lengths)), buckets)
    while True:
        placed = [first_fit_decreasing(x, rows_per_group, length) for x in group_lengths]
        if all(p is not None for p in placed):
            return length, placed
        length = bucket_length(length + 1, buckets)


def packed_target_arrays(prompts: Sequence[list[int]], targets: Sequence[list[int]],
                         rows: int, buckets: Sequence[int], pad_id: int,
                         target_length: int | None = None, groups: int = 1,
                         prefix_length: int = 0, min_length: int = 0):
    """prompt+target sequences packed into ``rows`` rows of one length bucket (at least
    ``min_length``: several clients' batches stacked into one shape).

    The sequences are split into ``groups`` equal consecutive groups (the micro-batches of
    the step) and each group is packed into its own ``rows / groups`` rows, so that a
    micro-batch holds the same instances packed or not. With ``prefix_length`` = p > 0, the
    first p tokens, the same in every prompt, stay out of the rows (``prefix_ids``, run once
    and seen by every segment, see models/llama.py); every prompt must go on past them.
    Returns
      input_ids, segment_ids [rows, L]  (segment s >= 1 = the s-th sequence of the row,
                                         0 = padding at the row's end)
      prefix_ids [p]
      instance_row [N]                  the row holding each sequence
      target_index, target_ids, target_mask [N, T]  as in :func:`target_arrays`, with
                                         target_index a position in that row.
    """
    n, p = len(prompts), prefix_length
    prefix = list(prompts[0][:p])
    if p and (p >= min(len(x) for x in prompts) or any(list(x[:p]) != prefix for x in prompts)):
        raise DataError(f"the prompts do not all begin with the same {p} tokens and go on")
    seqs = [list(x[p:]) + list(t) for x, t in zip(prompts, targets, strict=True)]
    lengths = [len(x) for x in seqs]
    length, placed = packed_layout(lengths, rows, buckets, groups, min_length)
    per_group, rows_per_group = n // groups, rows // groups
    ids = np.full((rows, length), pad_id, np.int32)
    segments = np.zeros((rows, length), np.int32)
    instance_row = np.zeros(n, np.int32)
    t_len = _target_length(targets, target_length)
    target = np.zeros((n, t_len), np.int32)
    index = np.zeros((n, t_len), np.int32)
    tmask = np.zeros((n, t_len), bool)
    fill = [0] * rows  # next free slot of each row
    count = [0] * rows  # segments already in each row
    for g in range(groups):
        for local, local_row in enumerate(placed[g]):
            i, row = g * per_group + local, g * rows_per_group + local_row
            start, end = fill[row], fill[row] + lengths[i]
            count[row] += 1
            ids[row, start:end] = seqs[i]
            segments[row, start:end] = count[row]
            fill[row] = end
            instance_row[i] = row
            t = targets[i]
            target[i, :len(t)] = t
            index[i, :len(t)] = np.arange(end - len(t) - 1, end - 1)
            tmask[i, :len(t)] = True
    return {"input_ids": ids, "segment_ids": segments, "prefix_ids": np.asarray(prefix, np.int32),
            "instance_row": instance_row, "target_index": index, "target_ids": target,
            "target_mask": tmask}


def right_pad(rows: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int):
    """Right-padded ids and mask (as encoders expect) at the bucket of the longest row."""
    length = bucket_length(max(len(r) for r in rows), buckets)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        r = list(r)[:length]
        ids[i, :len(r)] = r
        mask[i, :len(r)] = True
    return ids, mask


# --- datasets with a deterministic order -----------------------------------------------------
class _Epochs:
    """Shuffled, fixed-size batches over ``n`` examples; the last one padded with masks."""

    n: int
    batch_size: int
    seed: int
    shuffle: bool

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def indices(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        valid = np.ones(self.batch_size, bool)
        valid[len(chosen):] = False
        padded = np.concatenate([chosen, np.repeat(chosen[:1], self.batch_size - len(chosen))])
        return padded, valid


class LSRDataset(_Epochs):
    """Arrays for LSR: query tokens, top-k passage embeddings and the LM's log-likelihoods."""

    def __init__(self, arrays: Mapping[str, np.ndarray], passage_ids: np.ndarray, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True):
        self.arrays = dict(arrays)
        self.passage_ids = passage_ids
        self.n = len(passage_ids)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        rows, valid = self.indices(epoch, index)
        batch = {k: v[rows] for k, v in self.arrays.items()}
        batch["example_mask"] = valid
        return batch


def build_lsr_dataset(records: Iterable[dict], retriever, store, generator: Generator, *,
                      top_k: int = 4, batch_size: int = 8, template: str = DEFAULT_PROMPT_TEMPLATE,
                      max_length: int = 512, max_passage_tokens: int | None = None,
                      score_batch_size: int = 32,
                      reduction: str = "sum", seed: int = 0, progress: bool = True,
                      query_length_buckets: Sequence[int] = (16, 32, 64, 128),
                      passage_tokens: bool = False, pack: bool = False,
                      lm_scores: dict[tuple[str, str, str], float] | None = None) -> LSRDataset:
    """Retrieve top-k for every query, then score every (query, passage) pair with the LM.

    ``passage_tokens``: also carry the passages' retriever tokens (``passage_ids``,
    ``passage_mask`` [N, k, L]) so that the step re-encodes them with the context tower and
    the gradient reaches it (``lsr.train_context``).
    ``lm_scores``: log p_LM by (query, response, passage id), read and filled in: the
    generator is frozen during LSR, so a re-retrieval after an index refresh only scores
    the pairs it has not seen (same template, lengths and reduction assumed).
    ``pack``: LM-score the pairs two to a packed row (``Generator.score_ids(pack=True)``).
    """
    records = load_records(records)
    queries = [r["query"] for r in records]
    q_emb = retriever.encode_query(queries, progress=progress)
    _, ids = store.search(q_emb, top_k)
    flat_ids = [str(i) for i in ids.reshape(-1)]
    nodes = {n.node_id: n for n in store.get(sorted(set(flat_ids)))}
    emb = np.stack([np.asarray(nodes[i].embedding, np.float32) for i in flat_ids])
    emb = emb.reshape(len(records), top_k, -1)

    prompts = PromptBuilder(generator, template, max_passage_tokens)
    targets = prompts.target_ids([r["response"] for r in records])
    keys = [(r["query"], r["response"], str(i)) for r, row in zip(records, ids, strict=True)
            for i in row]
    known = {} if lm_scores is None else lm_scores
    logprobs = np.array([known.get(key, np.nan) for key in keys], np.float64)
    pair_prompts, pair_targets = {}, {}  # flat pair index -> tokens, for unscored pairs only
    for q, (r, row, target) in enumerate(zip(records, ids, targets, strict=True)):
        if not np.isnan(logprobs[q * top_k:(q + 1) * top_k]).any():
            continue
        left, right = prompts.parts(r["query"])
        passages = prompts.passage_ids([nodes[str(i)].text for i in row])
        for j, passage in enumerate(passages):
            pair_prompts[q * top_k + j] = assemble(left, passage, right, target, max_length)
            pair_targets[q * top_k + j] = target
    todo = [p for p in pair_prompts if np.isnan(logprobs[p])]
    # similar lengths share a bucket
    order = [todo[i] for i in np.argsort([len(pair_prompts[p]) for p in todo])]
    bar = progress_bar(total=len(order), desc="LM-scoring passages", unit="pair",
                       disable=not progress)
    for start in range(0, len(order), score_batch_size):
        chunk = order[start:start + score_batch_size]
        logprobs[chunk] = generator.score_ids([pair_prompts[i] for i in chunk],
                                              [pair_targets[i] for i in chunk], reduction,
                                              pack=pack)
        bar.update(len(chunk))
    bar.close()
    if lm_scores is not None:
        lm_scores.update({keys[p]: float(logprobs[p]) for p in order})

    pad = retriever.tokenizer.pad_token_id or 0
    # the same text the retriever encodes at search time (e5 / bge style prefixes included)
    q_ids, q_mask = right_pad(retriever.tokenize([retriever.query_prefix + q for q in queries]),
                              query_length_buckets, pad)
    arrays = {"query_ids": q_ids, "query_mask": q_mask, "passage_emb": emb,
              "lm_logprobs": logprobs.reshape(len(records), top_k).astype(np.float32)}
    if passage_tokens:
        p_ids, p_mask = right_pad(retriever.tokenize([retriever.context_prefix + nodes[i].text
                                                      for i in flat_ids]),
                                  (retriever.max_length,), pad)
        arrays["passage_ids"] = p_ids.reshape(len(records), top_k, -1)
        arrays["passage_mask"] = p_mask.reshape(len(records), top_k, -1)
    return LSRDataset(arrays, ids, batch_size=batch_size, seed=seed)


class RALTDataset(_Epochs):
    """(query, passage) instances for RALT; a batch holds ``batch_size`` queries x k passages."""

    def __init__(self, prompts: list[list[list[int]]], targets: list[list[int]],
                 weights: np.ndarray, *, batch_size: int, pad_id: int,
                 buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS, seed: int = 0,
                 shuffle: bool = True):
        self.prompts, self.targets, self.weights = prompts, targets, weights
        self.pad_id, self.buckets = pad_id, tuple(buckets)
        self.target_length = max(len(t) for t in targets)  # fixed: one shape per bucket
        self.n = len(prompts)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.pack_rows: int | None = None  # set by pack()
        self.pack_groups = 1
        self.prefix_length = 0

    def pack(self, rows: int, micro_batches: int = 1, *, share_prefix: bool = True,
             prefix_length: int | None = None) -> RALTDataset:
        """Serve packed batches: each step's instances in ``rows`` rows (a multiple of
        ``micro_batches``; each micro-batch's instances packed into its own rows).

        ``share_prefix``: the tokens every prompt of the dataset begins with (the template's
        instructions before the passage) leave the rows and run once per micro-batch
        (``prefix_ids``; the same loss and gradients: the prefix's activations are the same
        in every instance). One length for the whole dataset: steps share one shape.
        ``prefix_length``: share this many tokens instead (at most the common prefix; the
        clients of a federation share one, see :meth:`shared_prefix_length`)."""
        if rows < 1 or rows % micro_batches:
            raise DataError(f"pack rows={rows} must be a positive multiple of "
                            f"micro_batches={micro_batches}")
        common = self.shared_prefix_length() if share_prefix else 0
        if prefix_length is not None and not 0 <= prefix_length <= common:
            raise DataError(f"prefix_length={prefix_length}: this dataset's prompts share "
                            f"{common} leading tokens (each keeping one of its own)")
        self.pack_rows, self.pack_groups = rows, micro_batches
        self.prefix_length = common if prefix_length is None else prefix_length
        return self

    def shared_prefix_length(self) -> int:
        """How many leading tokens every prompt shares, each prompt keeping one of its own
        (it predicts the first target token)."""
        prompts = [p for ps in self.prompts for p in ps]
        return max(0, min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1))

    def packed_length(self, epoch: int, index: int) -> int:
        """The row length :meth:`batch_at` packs batch ``index`` of ``epoch`` into."""
        rows, _ = self.indices(epoch, index)
        p = self.prefix_length
        lengths = [len(x) - p + len(self.targets[i]) for i in rows for x in self.prompts[i]]
        return packed_layout(lengths, self.pack_rows, self.buckets, self.pack_groups)[0]

    def fix_length(self) -> RALTDataset:
        """One sequence length for every batch (the bucket of the longest instance): what a
        program that stacks several clients' batches (the SPMD simulator) needs."""
        longest = max(len(p) + len(t) for ps, t in zip(self.prompts, self.targets, strict=True)
                      for p in ps)
        self.buckets = (bucket_length(longest, self.buckets),)
        return self

    def batch_at(self, epoch: int, index: int, length: int = 0) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``; packed, its rows at least ``length`` long."""
        rows, valid = self.indices(epoch, index)
        prompts = [p for i in rows for p in self.prompts[i]]
        targets = [self.targets[i] for i in rows for _ in self.prompts[i]]
        if self.pack_rows:
            batch = packed_target_arrays(prompts, targets, self.pack_rows, self.buckets,
                                         self.pad_id, self.target_length, self.pack_groups,
                                         self.prefix_length, length)
            if not self.prefix_length:  # every row holds whole sequences
                del batch["prefix_ids"]
        else:
            batch = target_arrays(prompts, targets, self.buckets, self.pad_id,
                                  self.target_length)
        weights = self.weights[rows] * valid[:, None]  # padding examples weigh nothing
        batch["weights"] = weights.reshape(-1).astype(np.float32)
        return batch


def build_ralt_dataset(records: Iterable[dict], retriever, store, generator: Generator, *,
                       top_k: int = 4, batch_size: int = 2,
                       template: str = DEFAULT_PROMPT_TEMPLATE, max_length: int = 512,
                       max_passage_tokens: int | None = None, weighting: str = "uniform",
                       tau_retrieval: float = 1.0, seed: int = 0,
                       buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                       progress: bool = True, context: str = "single",
                       context_separator: str = "\n") -> RALTDataset:
    """weighting: "uniform" (each instance 1) or "retrieval" (P_R(d | x) of the passage).

    context: "single", one instance per (query, passage) (the layout of ensemble inference);
    "concat", one instance per query, its top-k passages joined by ``context_separator`` in
    one prompt (the RAG system's concat prompt), cut to fit by :func:`assemble_concat`.
    """
    if context not in ("single", "concat"):
        raise DataError(f"context must be 'single' or 'concat', got {context!r}")
    if context == "concat" and weighting == "retrieval":
        raise ConfigError("ralt.weighting='retrieval' weighs each (query, passage) instance by "
                          "P_R(d | x); ralt.context='concat' makes one instance of all the "
                          "passages: use weighting='uniform' or context='single'")
    records = load_records(records)
    q_emb = retriever.encode_query([r["query"] for r in records], progress=progress)
    scores, ids = store.search(q_emb, top_k)
    nodes = {n.node_id: n for n in store.get(sorted({str(i) for i in ids.reshape(-1)}))}
    builder = PromptBuilder(generator, template, max_passage_tokens)
    targets = builder.target_ids([r["response"] for r in records])
    separator = builder.separator_ids(context_separator)
    prompts = []
    for r, row, target in zip(records, ids, targets, strict=True):
        left, right = builder.parts(r["query"])
        passages = builder.passage_ids([nodes[str(i)].text for i in row])
        if context == "concat":
            prompts.append([assemble_concat(left, passages, separator, right, target,
                                            max_length)])
            continue
        prompts.append([assemble(left, p, right, target, max_length) for p in passages])
    if context == "concat":
        weights = np.ones((len(records), 1), np.float32)
    elif weighting == "retrieval":  # P_R(d | x) = softmax(s / tau_R), as LSR's
        z = scores / tau_retrieval
        z = np.exp(z - z.max(-1, keepdims=True))
        weights = (z / z.sum(-1, keepdims=True)) * top_k  # mean weight 1 per instance
    elif weighting == "uniform":
        weights = np.ones(ids.shape, np.float32)
    else:
        raise DataError(f"weighting must be 'uniform' or 'retrieval', got {weighting!r}")
    return RALTDataset(prompts, targets, weights.astype(np.float32), batch_size=batch_size,
                       pad_id=generator.pad_id, buckets=buckets, seed=seed)
