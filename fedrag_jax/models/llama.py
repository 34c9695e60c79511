"""Decoder-only causal LM: the Llama family (Llama 2/3, SmolLM2, Mistral) and Qwen2 / Qwen3.

    h_0     = E[x]
    a_l     = h_{l-1} + W_o Attn(RoPE(W_q n(h)), RoPE(W_k n(h)), W_v n(h))     n = RMSNorm
    h_l     = a_l + W_down (silu(W_gate n(a_l)) * W_up n(a_l))
    logits  = W_lm RMSNorm(h_L)          (W_lm = E^T when embeddings are tied)

Variants are settings, not subclasses: Qwen2 adds q/k/v biases, Qwen3 adds an RMSNorm on
each query and key head before RoPE.

Packed training rows (``segment_ids``): several sequences share a row, token t attends to
token s iff s <= t and seg(s) = seg(t) != 0 (causal and block-diagonal), and RoPE positions
restart at 0 where each segment starts, so every sequence is computed as if it were alone.
Sequences that all begin with the same p tokens (a RAG template's instructions) can leave
them out of the rows (``prefix_ids``): the prefix runs once, on its own, and every segment
of every row attends to its keys and values as well, with positions starting at p; each
sequence is still computed exactly as prefix + its own tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..errors import UnsupportedModelError
from .layers import RMSNorm, causal_blockwise_attention, embedding, linear, masked_softmax_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
PACKED_ATTENTION_BLOCK = 128  # queries per block in packed rows (causal_blockwise_attention)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # Mistral v0.1
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> LlamaConfig:
        """From a ``transformers`` config object (or its dict)."""
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a supported causal LM; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        heads = get("num_attention_heads")
        window = None
        if model_type == "mistral" or get("use_sliding_window", False):
            window = get("sliding_window")
        fields = dict(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            rms_norm_eps=get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            max_position_embeddings=get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            model_type=model_type,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self):
        """The equivalent ``transformers`` config object (no torch needed)."""
        import transformers

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.param_dtype,
        )
        if self.model_type == "llama":
            cls, kwargs["attention_bias"] = transformers.LlamaConfig, self.qkv_bias
            kwargs["architectures"] = ["LlamaForCausalLM"]
        elif self.model_type == "mistral":
            cls, kwargs["sliding_window"] = transformers.MistralConfig, self.sliding_window
            kwargs["architectures"] = ["MistralForCausalLM"]
        elif self.model_type == "qwen2":
            cls, kwargs["architectures"] = transformers.Qwen2Config, ["Qwen2ForCausalLM"]
            kwargs["use_sliding_window"] = self.sliding_window is not None
            kwargs["sliding_window"] = self.sliding_window
        else:
            cls, kwargs["architectures"] = transformers.Qwen3Config, ["Qwen3ForCausalLM"]
            kwargs["attention_bias"] = self.qkv_bias
        return cls(**kwargs)


Rope = tuple[jax.Array, jax.Array]  # (cos, sin), see rope_tables


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """theta_i = base^(-2i/d), adjusted by the checkpoint's rope scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, blended, scaled)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype: Any) -> Rope:
    """cos and sin of pos * theta_i for every token, [B, T, 1, d]: computed once per forward
    and shared by all layers (recomputed in each layer, they cost SmolLM2-135M's packed
    scoring about a tenth of its time on CPU)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos * theta_i (the "rotate half" convention)."""
    cos, sin = rope
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


@struct.dataclass
class KVCache:
    """Keys and values of every layer, written at slot ``index`` onwards.

    Slots are shared across the batch (prompts are left-padded to one length), so a query
    in slot i attends to slots j <= i whose ``valid`` flag is set.
    """

    keys: tuple[jax.Array, ...]  # per layer [B, S_max, Hkv, d]
    values: tuple[jax.Array, ...]
    valid: jax.Array  # [B, S_max] bool
    index: jax.Array  # int32 scalar: next slot to write

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_length: int,
              dtype: Any = None) -> KVCache:
        dtype = dtype or config.dtype
        shape = (batch, max_length, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(zeros, zeros, jnp.zeros((batch, max_length), bool), jnp.array(0, jnp.int32))


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.config = c
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim, ("embed", "heads"),
                             use_bias=c.qkv_bias, **kw)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"),
                             use_bias=c.qkv_bias, **kw)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"),
                             use_bias=c.qkv_bias, **kw)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, ("heads", "embed"),
                             use_bias=False, **kw)
        if c.qk_norm:
            norm_kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm_kw)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm_kw)

    def __call__(self, x: jax.Array, rope: Rope, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 block: int | None = None, prefix_kv: tuple[jax.Array, jax.Array] | None = None):
        """kv = (cache_keys, cache_values, write_index) for the decoding path; ``block``:
        attend block by block (a causal mask over the row's own slots, no cache), after the
        keys and values [1, p, Hkv, d] of a shared prefix when ``prefix_kv`` is given."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        new_kv = None
        if kv is not None:
            cache_k, cache_v, index = kv
            write = jax.lax.dynamic_update_slice_in_dim
            cache_k = write(cache_k, k.astype(cache_k.dtype), index, 1)
            cache_v = write(cache_v, v.astype(cache_v.dtype), index, 1)
            k, v, new_kv = cache_k, cache_v, (cache_k, cache_v)
        offset = 0
        if prefix_kv is not None:  # every row continues the same prefix
            pk, pv = (jnp.broadcast_to(a.astype(k.dtype), (b, *a.shape[1:])) for a in prefix_kv)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            offset = pk.shape[1]
        scale = 1.0 / math.sqrt(c.head_dim)
        if block is None:
            out = masked_softmax_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)
        else:
            out = causal_blockwise_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                             scale, block, key_offset=offset)
        return self.o_proj(out), new_kv


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm_kw)
        self.attn = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm_kw)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h, rope, mask, kv=None, block=None, prefix_kv=None):
        a, new_kv = self.attn(self.input_norm(h), rope, mask, kv, block, prefix_kv)
        h = h + a
        return h + self.mlp(self.post_attention_norm(h)), new_kv


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (left padding -> 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: t - (first slot of the segment at t).

    Segments are contiguous runs of one id; a new segment starts wherever the id changes.
    """
    t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids.ndim - 1)
    return t - first


class CausalLM(nnx.Module):
    """Llama-family decoder with an LM head. See the module docstring for the equations."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size, ("vocab", "embed"),
                                      dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype,
                            param_dtype=c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = linear(c.hidden_size, c.vocab_size, ("embed", "vocab"),
                                  use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                                  rngs=rngs)

    # HF-style surface ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, param_dtype: str | None = None,
                        mesh=None, rules=None) -> CausalLM:
        """Load a HF folder (safetensors) or a ``.gguf`` file, sharded over ``mesh``."""
        from .hf import load_causal_lm

        return load_causal_lm(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)

    def save_pretrained(self, out_dir, *, tokenizer=None, max_shard_bytes: int = 2 << 30) -> None:
        from .hf import save_pretrained

        save_pretrained(self, out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)

    def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
        return KVCache.empty(self.config, batch, max_length, dtype)

    def prefix_cache(self, prefix_ids: jax.Array, batch: int, max_length: int,
                     dtype: Any = None) -> KVCache:
        """A cache of ``batch`` rows that all begin with ``prefix_ids`` [p], run once: its
        keys and values are copied into slots [0, p) of every row, ``index`` = p.

        What follows (a left-padded prompt, then decoding) sees the prefix as real tokens at
        positions 0..p-1 and its own tokens from position p on (positions count valid slots):
        each row is computed as prefix + its own tokens. With a sliding window the padding
        between the two would count as distance (the window is over slots): do not use it then.
        """
        p = prefix_ids.shape[-1]
        _, one = self.hidden_states(prefix_ids.reshape(1, p), cache=self.init_cache(1, p, dtype))
        cache = self.init_cache(batch, max_length, dtype)

        def put(full: jax.Array, part: jax.Array) -> jax.Array:
            return full.at[:, :p].set(jnp.broadcast_to(part, (batch, *part.shape[1:])))

        return KVCache(tuple(map(put, cache.keys, one.keys)),
                       tuple(map(put, cache.values, one.values)),
                       cache.valid.at[:, :p].set(True), jnp.array(p, jnp.int32))

    # forward ------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None, cache: KVCache | None = None, *,
                      segment_ids: jax.Array | None = None,
                      prefix_ids: jax.Array | None = None):
        """Final-norm hidden states [B, T, D] (and the updated cache when one is given).

        ``segment_ids`` [B, T] (int, 0 = padding) instead of ``attention_mask``: packed rows
        (no cache), see the module docstring; with ``prefix_ids`` [p], the tokens every
        segment continues, run once (their hidden states are not returned).
        """
        c = self.config
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids (packed rows) replace attention_mask and take no "
                                 "KV cache: pass one or the other")
            return self._packed_hidden_states(input_ids, segment_ids, positions,
                                              prefix_ids), None
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(attention_mask)
            if cache is not None:  # continue from the real tokens already in the cache
                positions = positions + jnp.sum(cache.valid, axis=-1, keepdims=True)
        query_slots = jnp.arange(t)
        if cache is None:
            key_valid, key_slots = attention_mask, jnp.arange(t)
        else:
            query_slots = query_slots + cache.index
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask,
                                                            cache.index, 1)
            key_slots = jnp.arange(key_valid.shape[1])
        allowed = key_slots[None, :] <= query_slots[:, None]  # causal, [T, S]
        if c.sliding_window is not None:
            allowed &= key_slots[None, :] > query_slots[:, None] - c.sliding_window
        mask = allowed[None] & key_valid[:, None, :]  # [B, T, S]

        rope = rope_tables(positions, rope_inverse_frequencies(c), c.dtype)
        h = self.embed_tokens(input_ids)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
            h, new_kv = layer(h, rope, mask, kv)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        h = self.norm(h)
        if cache is None:
            return h, None
        new_cache = KVCache(tuple(new_keys), tuple(new_values), key_valid, cache.index + t)
        return h, new_cache

    def _packed_hidden_states(self, input_ids: jax.Array, segment_ids: jax.Array,
                              positions: jax.Array | None,
                              prefix_ids: jax.Array | None) -> jax.Array:
        c = self.config
        t = input_ids.shape[1]
        p = 0 if prefix_ids is None else prefix_ids.shape[-1]
        prefix_kv = [None] * c.num_layers
        if p:  # the shared prefix, once: its keys and values in every layer
            _, cache = self.hidden_states(prefix_ids.reshape(1, p), cache=self.init_cache(1, p))
            prefix_kv = list(zip(cache.keys, cache.values, strict=True))
        if positions is None:
            positions = segment_positions(segment_ids) + p
        slots = jnp.arange(t)
        allowed = slots[None, :] <= slots[:, None]  # causal, [T, T]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # block-diagonal
        mask = allowed[None] & same & (segment_ids[:, None, :] != 0)  # [B, T, T]
        key_positions = positions
        if p:  # every real token also sees the whole prefix: [B, T, p + T]
            sees_prefix = jnp.broadcast_to((segment_ids != 0)[:, :, None], (*segment_ids.shape, p))
            mask = jnp.concatenate([sees_prefix, mask], axis=-1)
            key_positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (positions.shape[0], p)),
                 positions], axis=-1)
        if c.sliding_window is not None:  # by position: the prefix is nearer than its slots
            mask &= key_positions[:, None, :] > positions[:, :, None] - c.sliding_window
        rope = rope_tables(positions, rope_inverse_frequencies(c), c.dtype)
        h = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, prefix_kv, strict=True):
            h, _ = layer(h, rope, mask, block=PACKED_ATTENTION_BLOCK, prefix_kv=kv)
        return self.norm(h)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: hidden [..., D] -> logits [..., V] (float32)."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None, *,
                 segment_ids: jax.Array | None = None, prefix_ids: jax.Array | None = None):
        """logits [B, T, V]; with ``cache``, returns ``(logits, updated_cache)``."""
        h, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache,
                                          segment_ids=segment_ids, prefix_ids=prefix_ids)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def hf_parameter_names(config: LlamaConfig) -> dict[tuple, str]:
    """Our parameter path -> the Hugging Face tensor name (``...kernel`` is transposed)."""
    names: dict[tuple, str] = {("embed_tokens", "embedding"): "model.embed_tokens.weight",
                               ("norm", "weight"): "model.norm.weight"}
    if not config.tie_word_embeddings:
        names[("lm_head", "kernel")] = "lm_head.weight"
    for i in range(config.num_layers):
        p, hf = ("layers", i), f"model.layers.{i}"
        names[p + ("input_norm", "weight")] = f"{hf}.input_layernorm.weight"
        names[p + ("post_attention_norm", "weight")] = f"{hf}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[p + ("attn", proj, "kernel")] = f"{hf}.self_attn.{proj}.weight"
            if config.qkv_bias and proj != "o_proj":
                names[p + ("attn", proj, "bias")] = f"{hf}.self_attn.{proj}.bias"
        if config.qk_norm:
            names[p + ("attn", "q_norm", "weight")] = f"{hf}.self_attn.q_norm.weight"
            names[p + ("attn", "k_norm", "weight")] = f"{hf}.self_attn.k_norm.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[p + ("mlp", proj, "kernel")] = f"{hf}.mlp.{proj}.weight"
    return names
