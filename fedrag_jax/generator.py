"""The generator: batched decoding on a KV cache, and log p(target | prompt) scoring.

``generate`` left-pads the prompts to a length bucket, runs one jit-compiled program (prefill
then a ``while_loop`` of single-token steps on the cache) and stops each row at EOS.
``score`` puts every (prompt, target) pair in one forward and evaluates the LM head only at
the target positions: LSR (``finetune``) is built on it.
``generate_ensemble`` / ``score_ensemble`` are the REPLUG ensemble (RA-DIT's parallel
retrieval augmentation): one prompt per retrieved passage, the next-token distributions (or
the sequence probabilities) mixed with the retrieval weights P_R(d | x).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import DataError
from .models.llama import CausalLM

# Every 64 tokens up to 1024, then coarser: a few more compilations than powers of two, but
# about 1.5x instead of 2.2x padding on RALT/LSR scoring batches (scripts/bench_finetune.py).
DEFAULT_LENGTH_BUCKETS = (32, *range(64, 1025, 64), 1280, 1536, 2048, 3072, 4096)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (or n rounded up to a multiple of 128 past the last)."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // 128) * 128


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        row = list(row)[-length:]
        if row:
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = True
    return ids, mask


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``prompts`` share, each keeping at least one of its own
    (its last prompt token predicts the first new one)."""
    return max(0, min(_common_prefix_length(prompts), min(len(x) for x in prompts) - 1))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis, float64."""
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def sample_next(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float):
    """Greedy when temperature == 0, else nucleus sampling from softmax(logits / T)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_p"))
def _decode(graphdef, state, ids, mask, rng, stop_ids, pad_id, *, max_new_tokens: int,
            temperature: float, top_p: float):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    hidden, cache = model.hidden_states(ids, mask, cache=cache)
    rng, step_rng = jax.random.split(rng)
    # the LM head at the last prompt position only (not [B * L, V])
    token = sample_next(model.logits(hidden[:, -1]), step_rng, temperature, top_p)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out, rng = carry
        logits, cache = model(token[:, None], jnp.ones((batch, 1), bool), cache=cache)
        rng, step_rng = jax.random.split(rng)
        nxt = sample_next(logits[:, -1], step_rng, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, i].set(nxt)
        return i + 1, nxt, cache, done | jnp.isin(nxt, stop_ids), out, rng

    _, _, _, _, out, _ = jax.lax.while_loop(cond, body, (1, token, cache, done, out, rng))
    return out


def fusion_log_weights(scores, temperature: float) -> np.ndarray:
    """log P_R(d | x) = log softmax_k(s(x, d) / tau), float64 [B, k]: the ensemble's mixture
    weights from the store's similarity scores (the P_R that LSR trains at its tau)."""
    if not temperature > 0:
        raise DataError(f"the fusion temperature must be > 0, got {temperature!r}")
    z = np.asarray(scores, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_p", "keep_logprobs"))
def _decode_ensemble(graphdef, state, prefix_ids, ids, mask, log_weights, rng, stop_ids, pad_id,
                     *, max_new_tokens: int, temperature: float, top_p: float,
                     keep_logprobs: bool):
    """REPLUG ensemble decoding: rows [B * k] are the k passage prompts of B queries (query
    b's in rows b*k .. b*k+k-1), left-padded after ``prefix_ids`` [p], the start they all
    share (run once, see ``CausalLM.prefix_cache``). At every step the k next-token
    distributions of a query are mixed in float32 log space,
        log p(y_t | y_<t, x) = logsumexp_d(log P_R(d | x) + log p(y_t | y_<t, d, x)),
    one token is chosen from the mixture and fed to all k rows. Returns the tokens and their
    mixture log-probs [B, T] (and the whole mixture [B, T, V] with ``keep_logprobs``)."""
    model = nnx.merge(graphdef, state)
    rows, length = ids.shape
    batch, k = log_weights.shape
    p = prefix_ids.shape[0]
    total = p + length + max_new_tokens
    cache = model.prefix_cache(prefix_ids, rows, total) if p else model.init_cache(rows, total)
    log_weights = log_weights.astype(jnp.float32)[:, :, None]

    def step(tokens, valid, cache):
        hidden, cache = model.hidden_states(tokens, valid, cache=cache)
        logp = jax.nn.log_softmax(model.logits(hidden[:, -1]), axis=-1)  # [B*k, V] float32
        return jax.nn.logsumexp(log_weights + logp.reshape(batch, k, -1), axis=1), cache

    def choose(mixed, rng, done):
        token = sample_next(mixed, rng, temperature, top_p)
        token_logp = jnp.take_along_axis(mixed, token[:, None], axis=-1)[:, 0]
        return jnp.where(done, pad_id, token), jnp.where(done, 0.0, token_logp)

    vocab = model.config.vocab_size
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    out_logp = jnp.zeros((batch, max_new_tokens), jnp.float32)
    dists = jnp.zeros((batch, max_new_tokens if keep_logprobs else 0, vocab), jnp.float32)

    def record(i, token, token_logp, mixed, out, out_logp, dists):
        out, out_logp = out.at[:, i].set(token), out_logp.at[:, i].set(token_logp)
        if keep_logprobs:
            dists = dists.at[:, i].set(mixed)
        return out, out_logp, dists

    mixed, cache = step(ids, mask, cache)
    rng, step_rng = jax.random.split(rng)
    no = jnp.zeros((batch,), bool)
    token, token_logp = choose(mixed, step_rng, no)
    out, out_logp, dists = record(0, token, token_logp, mixed, out, out_logp, dists)
    done = jnp.isin(token, stop_ids)

    def cond(carry):
        i, done = carry[0], carry[3]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out, out_logp, dists, rng = carry
        fed = jnp.repeat(token, k)[:, None]  # the query's chosen token, to each of its rows
        mixed, cache = step(fed, jnp.ones((rows, 1), bool), cache)
        rng, step_rng = jax.random.split(rng)
        nxt, nxt_logp = choose(mixed, step_rng, done)
        out, out_logp, dists = record(i, nxt, nxt_logp, mixed, out, out_logp, dists)
        return i + 1, nxt, cache, done | jnp.isin(nxt, stop_ids), out, out_logp, dists, rng

    carry = jax.lax.while_loop(cond, body, (1, token, cache, done, out, out_logp, dists, rng))
    return carry[4], carry[5], carry[6]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _target_logprobs(graphdef, state, ids, mask, target_index, target_ids, target_mask):
    """log p of each target token: hidden states at the positions that predict targets only."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(ids, mask)
    picked = jnp.take_along_axis(hidden, target_index[..., None], axis=1)  # [B, Tt, D]
    logp = jax.nn.log_softmax(model.logits(picked), axis=-1)
    token_logp = jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]
    return jnp.where(target_mask, token_logp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _packed_target_logprobs(graphdef, state, ids, segment_ids, prefix_ids, instance_row,
                            target_index, target_ids, target_mask):
    """As :func:`_target_logprobs`, over packed rows after a shared prefix: instance i's
    targets are predicted at ``target_index[i]`` of row ``instance_row[i]``."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(ids, segment_ids=segment_ids,
                                    prefix_ids=prefix_ids if prefix_ids.shape[0] else None)
    picked = hidden[instance_row[:, None], target_index]  # [N, Tt, D]
    logp = jax.nn.log_softmax(model.logits(picked), axis=-1)
    token_logp = jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]
    return jnp.where(target_mask, token_logp, 0.0)


class Generator:
    """A causal LM with its tokenizer: ``generate`` and ``score``."""

    def __init__(self, model: CausalLM, tokenizer, *, use_chat_template: bool | None = None,
                 length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS):
        self.model = model
        self.tokenizer = tokenizer
        self.length_buckets = tuple(length_buckets)
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template
        eos = model.config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.stop_ids = np.asarray(eos or [-1], np.int32)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (eos[0] if eos else 0))

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, mesh=None,
                        **kwargs) -> Generator:
        from .models.hf import load_tokenizer

        return cls(CausalLM.from_pretrained(path, dtype=dtype, mesh=mesh), load_tokenizer(path),
                   **kwargs)

    # --- text <-> ids ---------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        if not self.use_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        texts = [self.format_prompt(p) for p in prompts]
        # a chat template already holds the special tokens it wants
        return self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]

    # --- generate ----------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
        """New token ids [B, max_new_tokens], padded with the pad id after each row's EOS."""
        if not prompt_ids:
            return np.zeros((0, max_new_tokens), np.int32)
        length = bucket_length(max(len(p) for p in prompt_ids), self.length_buckets)
        ids, mask = left_pad(prompt_ids, length, self.pad_id)
        graphdef, state = nnx.split(self.model)
        out = _decode(graphdef, state, ids, mask, jax.random.key(seed), self.stop_ids,
                      np.int32(self.pad_id), max_new_tokens=int(max_new_tokens),
                      temperature=float(temperature), top_p=float(top_p))
        return np.asarray(out)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
        new = self.generate_ids(self.encode_prompts(prompts), max_new_tokens, temperature,
                                top_p, seed)
        return self.decode_new(new)

    def decode_new(self, new: np.ndarray) -> list[str]:
        """Text of each row of new token ids, up to its first stop token."""
        texts = []
        for row in new:
            stops = np.flatnonzero(np.isin(row, self.stop_ids))
            row = row[: stops[0]] if stops.size else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    # --- ensemble (REPLUG / RA-DIT parallel retrieval augmentation) --------------------------
    def generate_ensemble_ids(self, prompt_ids: Sequence[Sequence[Sequence[int]]], log_weights,
                              max_new_tokens: int = 64, temperature: float = 0.0,
                              top_p: float = 1.0, seed: int = 0, *, share_prefix: bool = True,
                              return_logprobs: bool = False):
        """Decode each query from the mixture of its k prompts (one per retrieved passage):
        p(y_t | y_<t, x) = sum_d P_R(d | x) p(y_t | y_<t, d, x), ``prompt_ids[b][d]`` the
        tokens of query b's prompt with passage d, ``log_weights`` [B, k] log P_R(d | x)
        (normalized here; see :func:`fusion_log_weights`).

        All B x k prompts decode in one batched KV-cache loop; a query's rows all take the
        token chosen from its mixture (its argmax, or sampled from p_mix^(1/temperature),
        nucleus-filtered at ``top_p``, as :meth:`generate_ids` samples), and it stops at
        EOS. ``share_prefix``: the tokens every prompt begins with (the chat template and
        instructions before the passage) run once for all rows.
        Returns new token ids [B, max_new_tokens] (pad after EOS); with ``return_logprobs``
        also their mixture log-probs [B, T] and the whole mixture log p [B, T, V].
        """
        log_weights = self._ensemble_weights(prompt_ids, log_weights)
        batch, k = log_weights.shape
        if batch == 0:
            empty = np.zeros((0, max_new_tokens), np.int32)
            vocab = self.model.config.vocab_size
            return (empty, empty.astype(np.float32),
                    np.zeros((0, max_new_tokens, vocab), np.float32)) if return_logprobs else empty
        flat = [list(p) for ps in prompt_ids for p in ps]
        # the window counts the padding between the prefix and a row's tokens as distance
        shared = share_prefix and self.model.config.sliding_window is None
        prefix = shared_prefix_length(flat) if shared else 0
        length = bucket_length(max(len(x) - prefix for x in flat), self.length_buckets)
        ids, mask = left_pad([x[prefix:] for x in flat], length, self.pad_id)
        graphdef, state = nnx.split(self.model)
        tokens, token_logp, dists = _decode_ensemble(
            graphdef, state, np.asarray(flat[0][:prefix], np.int32), ids, mask,
            log_weights.astype(np.float32), jax.random.key(seed), self.stop_ids,
            np.int32(self.pad_id), max_new_tokens=int(max_new_tokens),
            temperature=float(temperature), top_p=float(top_p), keep_logprobs=return_logprobs)
        if return_logprobs:
            return np.asarray(tokens), np.asarray(token_logp), np.asarray(dists)
        return np.asarray(tokens)

    def generate_ensemble(self, prompts: Sequence[Sequence[str]], log_weights,
                          max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int = 0) -> list[str]:
        """Text answers, one per query, from the mixture of its prompts (see
        :meth:`generate_ensemble_ids`)."""
        new = self.generate_ensemble_ids(self.encode_prompt_groups(prompts), log_weights,
                                         max_new_tokens, temperature, top_p, seed)
        return self.decode_new(new)

    def score_ensemble_ids(self, prompt_ids: Sequence[Sequence[Sequence[int]]],
                           target_ids: Sequence[Sequence[int]], log_weights,
                           reduction: Literal["sum", "mean"] = "sum", *,
                           pack: bool = False) -> np.ndarray:
        """log sum_d P_R(d | x) p(y | d, x) per query: REPLUG's ensemble likelihood of the
        target, a mixture of sequence probabilities (``reduction="mean"``: divided by the
        target's length). The B x k pairs are scored as by :meth:`score_ids`, in float64."""
        log_weights = self._ensemble_weights(prompt_ids, log_weights)
        batch, k = log_weights.shape
        if len(target_ids) != batch:
            raise DataError(f"{batch} queries but {len(target_ids)} targets")
        if batch == 0:
            return np.zeros((0,), np.float64)
        flat = [p for ps in prompt_ids for p in ps]
        per_pair = self.score_ids(flat, [t for t in target_ids for _ in range(k)], "sum",
                                  pack=pack).reshape(batch, k)
        total = _logsumexp(log_weights + per_pair)
        if reduction == "mean":
            return total / np.array([len(t) for t in target_ids], np.float64)
        return total

    def score_ensemble(self, prompts: Sequence[Sequence[str]], targets: Sequence[str],
                       log_weights, reduction: Literal["sum", "mean"] = "sum") -> np.ndarray:
        """:meth:`score_ensemble_ids` on text (targets tokenized as in :meth:`score`)."""
        target_ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        return self.score_ensemble_ids(self.encode_prompt_groups(prompts), target_ids, log_weights,
                                       reduction)

    def encode_prompt_groups(self, prompts: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """:meth:`encode_prompts` of each query's prompts, in one tokenizer call."""
        flat = self.encode_prompts([p for ps in prompts for p in ps])
        out, start = [], 0
        for ps in prompts:
            out.append(flat[start:start + len(ps)])
            start += len(ps)
        return out

    @staticmethod
    def _ensemble_weights(prompt_ids, log_weights) -> np.ndarray:
        """log_weights as float64 [B, k], normalized, after checking they fit the prompts."""
        lw = np.asarray(log_weights, np.float64)
        if lw.ndim != 2 or lw.shape[0] != len(prompt_ids):
            raise DataError(f"log_weights must be [queries={len(prompt_ids)}, k], got shape "
                            f"{lw.shape}")
        if lw.shape[0] and lw.shape[1] == 0:
            raise DataError("every query needs at least one prompt")
        for b, ps in enumerate(prompt_ids):
            if len(ps) != lw.shape[1]:
                raise DataError(f"query {b} has {len(ps)} prompts, expected k={lw.shape[1]} "
                                "(the same number for every query of a call)")
            if any(len(p) == 0 for p in ps):
                raise DataError(f"query {b} has an empty prompt")
        if not np.all(np.isfinite(lw)):
            raise DataError("log_weights must be finite")
        return lw - _logsumexp(lw)[:, None] if lw.size else lw

    # --- score -------------------------------------------------------------------------------
    def score_ids(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                  reduction: Literal["sum", "mean"] = "sum", *,
                  pack: bool = False) -> np.ndarray:
        """log p(target | prompt) per pair, summed (or averaged) over target tokens only.

        ``pack``: the pairs share rows (block-diagonal attention, see models/llama.py) after
        the prompts' common prefix, run once, instead of each pair being left-padded to the
        longest: the same numbers up to float order, for less padding and less work.
        """
        if len(prompt_ids) != len(target_ids):
            raise DataError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
        if any(len(t) == 0 for t in target_ids):
            raise DataError("every target needs at least one token")
        if pack and len(prompt_ids) > 1:
            return self._score_packed(prompt_ids, target_ids, reduction)
        t_len = max(len(t) for t in target_ids)
        length = bucket_length(max(len(p) + len(t) for p, t in zip(prompt_ids, target_ids,
                                                                    strict=True)),
                               self.length_buckets)
        rows = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids, strict=True)]
        ids, mask = left_pad(rows, length, self.pad_id)
        target = np.zeros((len(rows), t_len), np.int32)
        index = np.zeros((len(rows), t_len), np.int32)
        tmask = np.zeros((len(rows), t_len), bool)
        for i, t in enumerate(target_ids):
            n = len(t)
            target[i, :n] = t
            index[i, :n] = np.arange(length - n - 1, length - 1)  # the position before each
            tmask[i, :n] = True
        graphdef, state = nnx.split(self.model)
        logp = np.asarray(_target_logprobs(graphdef, state, ids, mask, index, target, tmask),
                          np.float64)
        total = logp.sum(-1)
        return total / tmask.sum(-1) if reduction == "mean" else total

    def _score_packed(self, prompt_ids: Sequence[Sequence[int]],
                      target_ids: Sequence[Sequence[int]], reduction: str) -> np.ndarray:
        batch = self.pack_pairs(prompt_ids, target_ids)
        graphdef, state = nnx.split(self.model)
        logp = np.asarray(_packed_target_logprobs(
            graphdef, state, batch["input_ids"], batch["segment_ids"], batch["prefix_ids"],
            batch["instance_row"], batch["target_index"], batch["target_ids"],
            batch["target_mask"]), np.float64)
        total = logp.sum(-1)
        return total / batch["target_mask"].sum(-1) if reduction == "mean" else total

    def pack_pairs(self, prompt_ids: Sequence[Sequence[int]],
                   target_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The packed rows ``score_ids(pack=True)`` runs (see ``packed_target_arrays``): the
        prompts' common start (a RAG template's instructions before the passage) is run once
        for all of them (``prefix_ids``), the rest packed a few pairs to a row."""
        from .finetune.batches import common_prefix_length, packed_target_arrays

        prompts, targets = [list(p) for p in prompt_ids], [list(t) for t in target_ids]
        # each pair keeps a prompt token of its own: it predicts the first target token
        prefix = max(0, min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1))
        lengths = [len(p) - prefix + len(t) for p, t in zip(prompts, targets, strict=True)]
        rows = self._packed_rows(lengths, prefix)
        return packed_target_arrays(prompts, targets, rows, self.length_buckets, self.pad_id,
                                    prefix_length=prefix)

    def _packed_rows(self, lengths: Sequence[int], prefix: int) -> int:
        """The number of packed rows (a power of two) that costs least: fewer, longer rows
        waste less on the bucket's round-up, but every query token of a row attends to all the
        row's earlier slots (up to its 128-query block's end) and to the prefix."""
        from .finetune.batches import packed_layout
        from .models.llama import PACKED_ATTENTION_BLOCK

        c = self.model.config
        per_token = 2.0 * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                           + c.num_heads * c.head_dim * c.hidden_size
                           + 3 * c.hidden_size * c.intermediate_size)
        # scores and their softmax per key: matmul FLOPs, twice for the elementwise work,
        # which on a CPU runs slower than the matmuls
        per_key = 2.0 * 4 * c.num_heads * c.head_dim

        def cost(rows: int) -> float:
            length, _ = packed_layout(lengths, rows, self.length_buckets)
            keys = prefix + min(length, length / 2 + PACKED_ATTENTION_BLOCK / 2)
            return rows * length * (per_token + per_key * keys)

        # powers of two only: a dataset's many scoring calls then compile a few shapes
        options = [1 << i for i in range(len(lengths).bit_length()) if 1 << i <= len(lengths)]
        return min(options, key=lambda rows: (cost(rows), rows))

    def score(self, prompts: Sequence[str], targets: Sequence[str],
              reduction: Literal["sum", "mean"] = "sum") -> np.ndarray:
        """log p(target | prompt), the target tokenized on its own (no special tokens)."""
        prompt_ids = self.encode_prompts(prompts)
        target_ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        return self.score_ids(prompt_ids, target_ids, reduction)
