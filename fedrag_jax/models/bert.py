"""BERT-family encoder (BertModel: absolute positions, token types, post-LayerNorm).

    h_0 = LN(E_word[x] + E_pos[p] + E_type[t])
    a_l = LN(h_{l-1} + W_o Attn(W_q h, W_k h, W_v h))
    h_l = LN(a_l + W_2 gelu(W_1 a_l))
    e   = pool(h_L)  (mask-weighted mean or [CLS]), optionally L2-normalised

Covers the usual retrievers: MiniLM, Contriever, DRAGON+, e5, bge.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import ConfigError, UnsupportedModelError
from .layers import LayerNorm, embedding, linear, masked_softmax_attention

SUPPORTED_MODEL_TYPES = ("bert",)
Pooling = Literal["mean", "cls"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    add_pooling_layer: bool = True  # BertModel's tanh pooler (kept for faithful round trips)
    pooling: Pooling = "mean"
    normalize: bool = False
    model_type: str = "bert"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> BertConfig:
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a supported encoder; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if get("position_embedding_type", "absolute") not in (None, "absolute"):
            raise UnsupportedModelError("only absolute position embeddings are supported")
        fields = dict(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=get("num_attention_heads"),
            intermediate_size=get("intermediate_size"),
            max_position_embeddings=get("max_position_embeddings", 512),
            type_vocab_size=get("type_vocab_size", 2),
            layer_norm_eps=get("layer_norm_eps", 1e-12),
            hidden_act=get("hidden_act", "gelu"),
            pad_token_id=get("pad_token_id") or 0,
            model_type=model_type,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self):
        import transformers

        return transformers.BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            pad_token_id=self.pad_token_id,
            architectures=["BertModel"],
            dtype=self.param_dtype,
        )


def _activation(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    return lambda x: jax.nn.gelu(x, approximate=True)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        ln = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.config = c
        self.query = linear(c.hidden_size, c.hidden_size, ("embed", "heads"), **kw)
        self.key = linear(c.hidden_size, c.hidden_size, ("embed", "heads"), **kw)
        self.value = linear(c.hidden_size, c.hidden_size, ("embed", "heads"), **kw)
        self.attn_out = linear(c.hidden_size, c.hidden_size, ("heads", "embed"), **kw)
        self.attn_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, **ln)
        self.intermediate = linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.output = linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)
        self.output_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, **ln)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = h.shape
        split = lambda x: x.reshape(b, t, c.num_heads, c.head_dim)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        attn = masked_softmax_attention(q, k, v, mask, 1.0 / math.sqrt(c.head_dim))
        a = self.attn_norm(h + self.attn_out(attn))
        return self.output_norm(a + self.output(_activation(c.hidden_act)(self.intermediate(a))))


class Encoder(nnx.Module):
    """BERT encoder with pooling. ``model(ids, mask)`` -> pooled embeddings [B, D]."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        emb = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.config = c
        self.word_embeddings = embedding(c.vocab_size, c.hidden_size, ("vocab", "embed"), **emb)
        self.position_embeddings = embedding(c.max_position_embeddings, c.hidden_size,
                                             ("positions", "embed"), **emb)
        self.token_type_embeddings = embedding(c.type_vocab_size, c.hidden_size,
                                               ("token_types", "embed"), **emb)
        self.embeddings_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=c.dtype,
                                         param_dtype=c.param_dtype)
        self.layers = nnx.List([BertLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        if c.add_pooling_layer:
            self.pooler = linear(c.hidden_size, c.hidden_size, ("embed", None), use_bias=True,
                                 dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, param_dtype: str | None = None,
                        pooling: Pooling | None = None, normalize: bool | None = None,
                        mesh=None, rules=None) -> Encoder:
        """Load a HF / sentence-transformers folder; pooling and normalisation default to
        what the folder's sentence-transformers modules say (mean, no normalisation else)."""
        from .hf import load_encoder

        return load_encoder(path, dtype=dtype, param_dtype=param_dtype, pooling=pooling,
                            normalize=normalize, mesh=mesh, rules=rules)

    def save_pretrained(self, out_dir, *, tokenizer=None, max_shard_bytes: int = 2 << 30) -> None:
        from .hf import save_pretrained

        save_pretrained(self, out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """Last hidden states [B, T, D] (BertModel's ``last_hidden_state``)."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        h = (self.word_embeddings(input_ids)
             + self.position_embeddings(jnp.arange(t)[None, :])
             + self.token_type_embeddings(token_type_ids))
        h = self.embeddings_norm(h)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
        for layer in self.layers:
            h = layer(h, mask)
        return h

    def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        if self.config.pooling == "cls":
            pooled = hidden[:, 0].astype(jnp.float32)
        else:
            m = attention_mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(
                jnp.sum(m, axis=1), 1e-9)
        if self.config.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        return self.pool(self.hidden_states(input_ids, attention_mask, token_type_ids),
                         attention_mask)

    def pooler_output(self, hidden: jax.Array) -> jax.Array:
        """BertModel's ``pooler_output``: tanh(W h_[CLS] + b)."""
        return jnp.tanh(self.pooler(hidden[:, 0]))


def hf_parameter_names(config: BertConfig) -> dict[tuple, str]:
    """Our parameter path -> BertModel tensor name (``...kernel`` is transposed)."""
    names: dict[tuple, str] = {
        ("word_embeddings", "embedding"): "embeddings.word_embeddings.weight",
        ("position_embeddings", "embedding"): "embeddings.position_embeddings.weight",
        ("token_type_embeddings", "embedding"): "embeddings.token_type_embeddings.weight",
        ("embeddings_norm", "weight"): "embeddings.LayerNorm.weight",
        ("embeddings_norm", "bias"): "embeddings.LayerNorm.bias",
    }
    ours_to_hf = {
        "query": "attention.self.query", "key": "attention.self.key",
        "value": "attention.self.value", "attn_out": "attention.output.dense",
        "intermediate": "intermediate.dense", "output": "output.dense",
    }
    for i in range(config.num_layers):
        for ours, hf in ours_to_hf.items():
            names[("layers", i, ours, "kernel")] = f"encoder.layer.{i}.{hf}.weight"
            names[("layers", i, ours, "bias")] = f"encoder.layer.{i}.{hf}.bias"
        for ours, hf in (("attn_norm", "attention.output.LayerNorm"),
                         ("output_norm", "output.LayerNorm")):
            names[("layers", i, ours, "weight")] = f"encoder.layer.{i}.{hf}.weight"
            names[("layers", i, ours, "bias")] = f"encoder.layer.{i}.{hf}.bias"
    if config.add_pooling_layer:
        names[("pooler", "kernel")] = "pooler.dense.weight"
        names[("pooler", "bias")] = "pooler.dense.bias"
    return names
