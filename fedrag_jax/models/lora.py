"""LoRA adapters (Hu et al., 2021): y = x W + (alpha / r) * x A B, with W frozen.

A starts random and B at zero, so an adapted model starts exactly where the base model
is. Adapters are ``nnx.LoRAParam`` variables: the trainer filters on that type to train,
checkpoint and exchange only them, and :func:`merge_lora` folds them into W for export.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import sharding_metadata

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        in_features, out_features = base.kernel.shape
        in_axis, out_axis = base.kernel.get_metadata().get("out_sharding", (None, None))
        dtype = base.kernel[...].dtype
        self.base = base
        self.scale = alpha / rank
        init = jax.random.normal(rngs.params(), (in_features, rank), dtype) / jnp.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(init, **sharding_metadata((in_axis, "lora_rank")))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype),
                                    **sharding_metadata(("lora_rank", out_axis)))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.base.dtype or x.dtype
        delta = (x.astype(dtype) @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return self.base(x) + self.scale * delta

    def merged_kernel(self) -> jax.Array:
        w = self.base.kernel[...]
        return (w + self.scale * (self.lora_a[...] @ self.lora_b[...])).astype(w.dtype)


def _targets(model: nnx.Module):
    """(parent module, attribute name) of every adaptable linear in a CausalLM."""
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name in vars(parent):
                yield parent, name


def apply_lora(model: nnx.Module, *, rank: int = 8, alpha: float = 16.0,
               target_modules: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> nnx.Module:
    """Wrap the targeted projections of every decoder layer in place; returns the model."""
    rngs = nnx.Rngs(seed)
    found = set()
    for parent, name in _targets(model):
        child = getattr(parent, name)
        if name in target_modules and isinstance(child, nnx.Linear):
            setattr(parent, name, LoRALinear(child, rank, alpha, rngs=rngs))
            found.add(name)
    missing = set(target_modules) - found
    if missing:
        from ..errors import ConfigError

        raise ConfigError(f"LoRA target modules {sorted(missing)} not found; choose from "
                          "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(getattr(p, n), LoRALinear) for p, n in _targets(model))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its base kernel."""
    merged = nnx.clone(model)
    for parent, name in _targets(merged):
        child = getattr(parent, name)
        if isinstance(child, LoRALinear):
            base = child.base
            base.kernel.set_value(child.merged_kernel())
            setattr(parent, name, base)
    return merged
