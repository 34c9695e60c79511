"""Building blocks shared by the decoder and the encoder.

Every parameter is created through :func:`param` so that it carries its logical axis names
(see :mod:`fedrag_jax.sharding`). Linear kernels are stored ``[in, out]``; Hugging Face
stores ``weight`` as ``[out, in]``, and :mod:`fedrag_jax.models.hf` transposes at the border.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


def sharding_metadata(logical_axes: Sequence[str | None]) -> dict:
    """Metadata that records logical axis names without sharding eagerly at creation."""
    return {"out_sharding": tuple(logical_axes), "eager_sharding": False}


def param(value: jax.Array, logical_axes: Sequence[str | None]) -> nnx.Param:
    return nnx.Param(value, **sharding_metadata(logical_axes))


def linear(in_features: int, out_features: int, logical_axes: tuple[str, str], *,
           use_bias: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
           init_std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(init_std),
        kernel_metadata=sharding_metadata(logical_axes),
        bias_metadata=sharding_metadata(logical_axes[1:]),
        rngs=rngs,
    )


def embedding(num: int, features: int, logical_axes: tuple[str, str], *, dtype: Dtype,
              param_dtype: Dtype, rngs: nnx.Rngs, init_std: float = 0.02) -> nnx.Embed:
    return nnx.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(init_std),
        embedding_metadata=sharding_metadata(logical_axes),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, normalised in float32 (as Llama does)."""

    def __init__(self, dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, statistics in float32 (BERT)."""

    def __init__(self, dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             scale: float) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, d]; k, v: [B, S, Hkv, d] with H a multiple of Hkv; mask: [B, T, S] (True =
    attend). Softmax in float32. A fully masked row (a left-padding query) gets uniform
    weights instead of NaN; its output is never used.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def causal_blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                               scale: float, block: int, key_offset: int = 0) -> jax.Array:
    """:func:`masked_softmax_attention` for a causal ``mask`` (queries and keys on the same
    slots, after ``key_offset`` keys every query may see), ``block`` queries at a time
    against only the keys up to the block's end.

    The skipped keys are masked anyway (exp(-inf) = 0 in the softmax), so the result is the
    same; the work on the [T, T] scores, which on a CPU costs more than their matmuls, about
    halves, and each block's scores stay in cache. The G query heads that share a KV head
    are one [G * block, d] matrix, so each score matmul is one larger product.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, d]
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        n = end - start
        qb = q[:, :, :, start:end].reshape(b, kv_heads, g * n, d)
        keys = key_offset + end
        scores = jnp.einsum("bkmd,bskd->bkms", qb, k[:, :keys],
                            preferred_element_type=jnp.float32) * scale  # [B, Hkv, G*n, S]
        m = jnp.broadcast_to(mask[:, None, None, start:end, :keys], (b, 1, g, n, keys))
        scores = jnp.where(m.reshape(b, 1, g * n, keys), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        block_out = jnp.einsum("bkms,bskd->bkmd", probs, v[:, :keys])
        out.append(block_out.reshape(b, kv_heads, g, n, d))
    out = jnp.concatenate(out, axis=3)  # [B, Hkv, G, T, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
