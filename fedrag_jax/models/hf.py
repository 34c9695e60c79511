"""Hugging Face checkpoints in and out.

In: a HF folder (config.json + model.safetensors, or shards + model.safetensors.index.json)
or a GGUF file. Each tensor is memory-mapped and every device copies only its own slice
(``jax.make_array_from_callback``), so a sharded model never needs a full host copy per
device. Out: config.json, safetensors (sharded past ``max_shard_bytes``, with the index),
generation_config.json and the tokenizer files, loadable by ``transformers``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ..errors import CheckpointNotFoundError, UnsupportedModelError, WeightMismatchError
from ..outputs import staged_directory
from ..paths import local_copy
from ..sharding import DEFAULT_RULES, LogicalRules, named_sharding
from . import bert, llama
from .safetensors_io import open_tensors, save_file

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def numpy_dtype(name: str | Any) -> np.dtype:
    if isinstance(name, str) and name in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    if isinstance(name, str) and name in ("fp32", "float32"):
        return np.dtype(np.float32)
    return np.dtype(name)


# --- reading -------------------------------------------------------------------------------
def existing_checkpoint(path: str | os.PathLike) -> Path:
    p = local_copy(path, "checkpoint")  # a local path, or a gs:// one fetched once
    if not p.exists():
        raise CheckpointNotFoundError(
            f"no checkpoint at {str(p)!r}: pass a Hugging Face model folder (config.json + "
            "*.safetensors) or a .gguf file"
        )
    return p


def read_hf_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointNotFoundError(f"{folder} has no config.json; is it a HF model folder?")
    return json.loads(cfg.read_text())


def open_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF folder, memory-mapped (single file or sharded with an index)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointNotFoundError(f"{folder / shard} is listed in {SAFE_INDEX} but "
                                              "missing; the download is incomplete")
            tensors.update(open_tensors(folder / shard))
        return tensors
    if (folder / SAFE_SINGLE).is_file():
        return open_tensors(folder / SAFE_SINGLE)
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointNotFoundError(
            f"{folder} holds only PyTorch pickle weights; fedrag-jax never unpickles. Convert "
            "them once with transformers: AutoModel.from_pretrained(dir).save_pretrained(out)"
        )
    raise CheckpointNotFoundError(f"{folder} has no model.safetensors or {SAFE_INDEX}")


def _strip_prefix(tensors: dict[str, np.ndarray], expected: str,
                  prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Checkpoints of task heads nest the base model (``bert.``, ``model.``): strip it."""
    if expected in tensors:
        return tensors
    for prefix in prefixes:
        if prefix + expected in tensors:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def materialize(module_fn: Callable[[], nnx.Module], names: Mapping[tuple, str],
                tensors: Mapping[str, np.ndarray], *, mesh: Mesh | None = None,
                rules: LogicalRules | None = None,
                ignore_unexpected: Callable[[str], bool] = lambda name: False) -> nnx.Module:
    """Build a module whose parameters come from HF ``tensors`` (straight onto the mesh)."""
    rules = rules or DEFAULT_RULES
    abstract = nnx.eval_shape(module_fn)
    graphdef, state = nnx.split(abstract)
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise WeightMismatchError(
            f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
            "is the config.json from the same model as the weights?"
        )
    unexpected = sorted(set(tensors) - set(names.values()))
    unexpected = [n for n in unexpected if not ignore_unexpected(n)]
    if unexpected:
        log.warning("ignoring %d checkpoint tensors the model does not use: %s",
                    len(unexpected), unexpected[:5])
    default_device = SingleDeviceSharding(jax.devices()[0])
    for path, var in nnx.to_flat_state(state):
        if path not in names:
            raise WeightMismatchError(f"no checkpoint tensor is mapped to parameter {path}")
        name = names[path]
        source = tensors[name]
        source = source.T if path[-1] == "kernel" else source  # HF [out, in] -> ours [in, out]
        target = var.get_value()
        if tuple(source.shape) != tuple(target.shape):
            raise WeightMismatchError(
                f"tensor {name!r} has shape {tuple(source.shape)} but the config implies "
                f"{tuple(target.shape)}; the config.json and weights disagree"
            )
        sharding = (named_sharding(mesh, var.get_metadata().get("out_sharding"), target.shape,
                                   rules) if mesh is not None else default_device)
        dtype = np.dtype(target.dtype)
        value = jax.make_array_from_callback(
            target.shape, sharding,
            lambda index, src=source, dt=dtype: np.asarray(src[index], dtype=dt))
        var.set_value(value)
    return nnx.merge(graphdef, state)


def _dtypes(dtype: str | None, param_dtype: str | None) -> dict[str, str]:
    param_dtype = param_dtype or dtype or "float32"
    return {"dtype": dtype or param_dtype, "param_dtype": param_dtype}


def load_causal_lm(path, *, dtype=None, param_dtype=None, mesh=None, rules=None):
    p = existing_checkpoint(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointNotFoundError(f"{p} is a file but not .gguf; pass the HF folder")
        from .gguf import read_gguf

        ckpt = read_gguf(p)
        hf_config, tensors = ckpt.hf_config, ckpt.tensors
    else:
        hf_config = read_hf_config(p)
        tensors = open_safetensors(p)
    if hf_config.get("model_type") not in llama.SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{p}: model_type {hf_config.get('model_type')!r} is not a supported causal LM; "
            f"supported: {', '.join(llama.SUPPORTED_MODEL_TYPES)}"
        )
    if p.is_dir():  # let transformers normalise legacy keys (rope_scaling, rope_theta, ...)
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(p)
    config = llama.LlamaConfig.from_hf(hf_config, **_dtypes(dtype, param_dtype))
    names = llama.hf_parameter_names(config)
    tensors = _strip_prefix(tensors, "model.norm.weight", ("language_model.",))
    ignore = lambda n: n.endswith("rotary_emb.inv_freq") or (
        n == "lm_head.weight" and config.tie_word_embeddings)
    return materialize(lambda: llama.CausalLM(config, rngs=nnx.Rngs(0)), names, tensors,
                       mesh=mesh, rules=rules, ignore_unexpected=ignore)


def read_sentence_transformers_pooling(folder: Path) -> dict[str, Any]:
    """Pooling mode and normalisation from a sentence-transformers folder, if it is one."""
    out: dict[str, Any] = {}
    modules = folder / "modules.json"
    if not modules.is_file():
        return out
    for module in json.loads(modules.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = folder / module.get("path", "") / "config.json"
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text())
                if cfg.get("pooling_mode_cls_token"):
                    out["pooling"] = "cls"
                elif cfg.get("pooling_mode_mean_tokens"):
                    out["pooling"] = "mean"
                else:
                    raise UnsupportedModelError(
                        f"{cfg_file}: only mean and cls pooling are supported, got {cfg}")
        elif kind.endswith("Normalize"):
            out["normalize"] = True
    return out


def load_encoder(path, *, dtype=None, param_dtype=None, pooling=None, normalize=None,
                 mesh=None, rules=None):
    p = existing_checkpoint(path)
    if not p.is_dir():
        raise CheckpointNotFoundError(f"{p} is not a folder; encoders load from HF folders")
    hf_config = read_hf_config(p)
    if hf_config.get("model_type") not in bert.SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{p}: model_type {hf_config.get('model_type')!r} is not a supported encoder; "
            f"supported: {', '.join(bert.SUPPORTED_MODEL_TYPES)}"
        )
    tensors = _strip_prefix(open_safetensors(p), "embeddings.word_embeddings.weight",
                            ("bert.", "model."))
    head = read_sentence_transformers_pooling(p)
    if pooling is not None:
        head["pooling"] = pooling
    if normalize is not None:
        head["normalize"] = normalize
    config = bert.BertConfig.from_hf(hf_config, **head, **_dtypes(dtype, param_dtype),
                                     add_pooling_layer="pooler.dense.weight" in tensors)
    names = bert.hf_parameter_names(config)
    ignore = lambda n: n.endswith("position_ids")
    return materialize(lambda: bert.Encoder(config, rngs=nnx.Rngs(0)), names, tensors,
                       mesh=mesh, rules=rules, ignore_unexpected=ignore)


def load_tokenizer(path):
    """The tokenizer of a HF folder, or the one a GGUF file carries (built without torch)."""
    p = existing_checkpoint(path)
    if p.is_file() and p.suffix == ".gguf":
        from .gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(p)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(p)


# --- writing -------------------------------------------------------------------------------
def hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named host arrays (kernels transposed back).

    LoRA adapters, if any, are merged into their base kernels first.
    """
    from .lora import has_lora, merge_lora

    if isinstance(model, llama.CausalLM) and has_lora(model):
        model = merge_lora(model)
    names = (llama.hf_parameter_names(model.config) if isinstance(model, llama.CausalLM)
             else bert.hf_parameter_names(model.config))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(jax.device_get(var.get_value()))
        out[names[path]] = np.ascontiguousarray(arr.T) if path[-1] == "kernel" else arr
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: Path,
                      max_shard_bytes: int) -> None:
    total = sum(a.nbytes for a in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, folder / SAFE_SINGLE)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def write_sentence_transformers_files(config: bert.BertConfig, folder: Path,
                                      max_seq_length: int = 256) -> None:
    """modules.json + pooling config, so sentence-transformers loads the folder as is."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": config.pooling == "cls",
        "pooling_mode_mean_tokens": config.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *, tokenizer=None,
                    max_shard_bytes: int = 2 << 30) -> None:
    """Write a HF folder for ``model`` atomically (the old folder stays until it is done;
    a folder fedrag-jax did not write is refused: OutputExistsError), locally or on gs://."""
    import transformers

    tensors = hf_tensors(model)
    with staged_directory(out_dir, kind="hf-model") as tmp:
        model.config.to_hf().save_pretrained(tmp)
        write_safetensors(tensors, tmp, max_shard_bytes)
        if isinstance(model, llama.CausalLM):
            c = model.config
            transformers.GenerationConfig(
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                pad_token_id=c.pad_token_id).save_pretrained(tmp)
        else:
            write_sentence_transformers_files(model.config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
