"""Read llama.cpp GGUF files into Hugging Face names and layouts, without torch.

``read_gguf`` parses a file with ``gguf.GGUFReader``, dequantizes every tensor with numpy
(``gguf.quants.dequantize``) and renames it to the ``transformers`` convention, undoing the
row permutation llama.cpp applies to Llama's q/k projections. ``tokenizer_from_gguf`` rebuilds
the tokenizer from the file's ``tokenizer.ggml.*`` metadata with ``tokenizers`` and wraps it in
a ``transformers.PreTrainedTokenizerFast``.

Both mirror what ``transformers`` does when handed ``gguf_file=`` (its GGUF loader needs torch),
so a GGUF loads into the same config, weights and token ids as it does there.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FedRAGJaxError,
    UnsupportedModelError,
    WeightMismatchError,
)

if TYPE_CHECKING:
    import gguf
    import transformers

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE: Llama 3, SmolLM, Qwen2/3, ...

# llama.cpp token_type values (gguf.TokenType)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


@dataclass
class GGUFCheckpoint:
    """A GGUF file in Hugging Face terms."""

    architecture: str
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    chat_template: str | None = field(default=None, repr=False)


# --- parsing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy / HF order (GGUF stores dimensions fastest-first)
    type_name: str  # ggml type, e.g. "Q4_1"


@dataclass(frozen=True)
class _Parsed:
    metadata: dict[str, Any]
    tensors: tuple[_TensorInfo, ...]


# GGUFReader walks every vocabulary string through numpy (~3 s for a 49k vocabulary), and a model
# is usually loaded together with its tokenizer, so keep the parsed metadata of the last few files.
_CACHE_SIZE = 2
_cache: OrderedDict[tuple, _Parsed] = OrderedDict()
_cache_lock = threading.Lock()


def _resolve(path: str | os.PathLike) -> Path:
    """The .gguf file ``path`` names; a folder holding exactly one .gguf also works."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            what = f"{len(found)} .gguf files" if found else "no .gguf file"
            raise CheckpointNotFoundError(
                f"{p} is a folder with {what}; pass the path of the .gguf file itself"
            )
        return found[0]
    if not p.is_file():
        raise CheckpointNotFoundError(
            f"GGUF file not found: tried {p.resolve()}; check the path (and that the model "
            "package or download is installed)"
        )
    return p


def _cache_key(p: Path) -> tuple:
    st = p.stat()  # a rewritten file gets a new mtime/ctime (or size or inode)
    return (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_reader(p: Path) -> gguf.GGUFReader:
    import gguf

    try:
        return gguf.GGUFReader(p, "r")
    except PermissionError:
        raise
    except Exception as e:  # the reader signals damage with whatever numpy/struct raise
        raise CorruptCheckpointError(
            f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
            "not a GGUF at all: re-download or re-export it"
        ) from e


def _parse(p: Path, reader: gguf.GGUFReader) -> _Parsed:
    """Metadata as Python values, and the tensor table."""
    try:
        metadata = {
            key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")
        }
        tensors = tuple(
            # GGUF lists dimensions fastest-moving first; numpy and HF the other way round
            _TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name)
            for t in reader.tensors
        )
    except Exception as e:
        raise CorruptCheckpointError(
            f"{p}: unreadable GGUF metadata ({type(e).__name__}: {e}); re-download the file"
        ) from e
    if not isinstance(metadata.get("general.architecture"), str):
        raise CorruptCheckpointError(f"{p} has no general.architecture in its metadata")
    return _Parsed(metadata, tensors)


def _remember(key: tuple, parsed: _Parsed) -> None:
    with _cache_lock:
        _cache[key] = parsed
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def _parsed(p: Path) -> _Parsed:
    """Parsed metadata of ``p``, from the cache when the file is unchanged."""
    key = _cache_key(p)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    parsed = _parse(p, _open_reader(p))
    _remember(key, parsed)
    return parsed


# --- config --------------------------------------------------------------------------------
def _check_architecture(p: Path, arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{p}: GGUF architecture {arch!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """transformers' rope_scaling from llama.cpp's rope.scaling.* keys, if the file sets one."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if factor is not None:
        scaling["factor"] = float(factor)
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _hf_config(p: Path, parsed: _Parsed) -> dict[str, Any]:
    """The transformers config dict the metadata describes (as transformers' loader builds it)."""
    meta = parsed.metadata
    arch = meta["general.architecture"]
    names = {t.name for t in parsed.tensors}

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise CorruptCheckpointError(f"{p}: GGUF metadata lacks {full!r}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models); fine only when uniform
        if len(set(kv_heads)) != 1:
            raise UnsupportedModelError(
                f"{p}: per-layer key/value head counts {sorted(set(kv_heads))} are not supported"
            )
        kv_heads = kv_heads[0]
    # head_dim: explicit key_length first (Qwen3), then Llama's rotary width, as transformers reads
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    if head_dim is None:
        head_dim = hidden // heads
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        else:
            embed = next((t for t in parsed.tensors if t.name == "token_embd.weight"), None)
            if embed is None:
                raise CorruptCheckpointError(f"{p}: cannot tell the vocabulary size")
            vocab = embed.shape[0]

    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        # kept at the file's float32 value, exactly as transformers reads it
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch in ("llama", "qwen3"):  # Qwen2 always has q/k/v biases; the others say so in tensors
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling = _rope_scaling(meta, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if "rope_freqs.weight" in names:
        # Llama 3.1+ bakes its "llama3" rope scaling into a per-frequency tensor; its parameters
        # cannot be read back exactly, and transformers' own GGUF loader drops it too.
        warnings.warn(
            f"{p} carries rope_freqs.weight (Llama 3 rope scaling); it is ignored, so positions "
            "use plain rope with rope_theta. Load the HF checkpoint for exact long-context rope.",
            stacklevel=3,
        )
    return config


# --- tensors -------------------------------------------------------------------------------
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_SKIPPED = {"rope_freqs.weight"}  # see the warning in _hf_config


def _hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; None when it is not one this module knows."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape."""
    v, h, i = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    arch = config["model_type"]
    bias = arch == "qwen2" or config.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        layer = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }
        if bias:
            layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)}
        if arch == "qwen3":
            layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
        shapes |= {pre + k: s for k, s in layer.items()}
    return shapes


def _check_tensor_table(p: Path, config: dict[str, Any], parsed: _Parsed) -> dict[str, str]:
    """{gguf name: HF name} for every tensor, after checking names and shapes against config."""
    expected = _expected_shapes(config)
    mapping: dict[str, str] = {}
    for t in parsed.tensors:
        if t.name in _SKIPPED:
            continue
        hf = _hf_name(t.name)
        if hf is None or hf not in expected:
            raise WeightMismatchError(
                f"{p}: unexpected tensor {t.name!r} for a {config['model_type']} model"
            )
        if t.shape != expected[hf]:
            raise WeightMismatchError(
                f"{p}: tensor {t.name!r} ({hf}) has shape {t.shape}, the metadata implies "
                f"{expected[hf]}"
            )
        mapping[t.name] = hf
    missing = sorted(set(expected) - set(mapping.values()))
    if missing:
        raise WeightMismatchError(
            f"{p}: {len(missing)} tensors missing, e.g. {missing[:3]}; the file is incomplete"
        )
    return mapping


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute).

    llama.cpp rotates adjacent pairs (GPT-J style) where HF rotates the two halves of each head,
    so it interleaves each head's rows; this restores the halves. Works for biases too.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_tensors(
    p: Path, reader: gguf.GGUFReader, config: dict[str, Any], mapping: dict[str, str]
) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    permute = config["model_type"] == "llama"  # Qwen2/3 are converted without the permutation
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name not in mapping:
            continue
        hf = mapping[t.name]
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{p}: tensor {t.name!r} is stored as ggml type {t.tensor_type.name}, which "
                f"gguf.quants cannot dequantize ({e})"
            ) from e
        except Exception as e:
            raise CorruptCheckpointError(f"{p}: cannot decode tensor {t.name!r} ({e})") from e
        # np.array copies: F32 tensors come back as views of the file's memory map
        w = np.array(w, dtype=np.float32).reshape(shape)
        module = hf.split(".")[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
        if permute and module in heads:
            w = np.ascontiguousarray(_unpermute(w, heads[module]))
        out[hf] = w
    return out


def read_gguf(path: str | os.PathLike, *, load_tensors: bool = True) -> GGUFCheckpoint:
    """Config, float32 tensors in HF naming/layout, and chat template of a GGUF file.

    ``load_tensors=False`` reads only the metadata (``tensors`` is then empty).
    Raises CheckpointNotFoundError, CorruptCheckpointError, UnsupportedModelError or
    WeightMismatchError.
    """
    p = _resolve(path)
    key = _cache_key(p)
    with _cache_lock:
        parsed = _cache.get(key)
    reader = None
    if parsed is None or load_tensors:
        reader = _open_reader(p)
        if parsed is None:
            parsed = _parse(p, reader)
            _remember(key, parsed)
    arch = parsed.metadata["general.architecture"]
    _check_architecture(p, arch)
    config = _hf_config(p, parsed)
    mapping = _check_tensor_table(p, config, parsed)
    tensors: dict[str, np.ndarray] = {}
    if load_tensors:
        assert reader is not None
        try:
            tensors = _load_tensors(p, reader, config, mapping)
        except FedRAGJaxError:
            raise
        except (ValueError, IndexError) as e:  # a data section shorter than the table says
            raise CorruptCheckpointError(f"{p}: tensor data unreadable ({e})") from e
    return GGUFCheckpoint(
        architecture=arch,
        hf_config=config,
        tensors=tensors,
        chat_template=parsed.metadata.get("tokenizer.chat_template"),
    )


# --- tokenizer -----------------------------------------------------------------------------
# How llama.cpp's tokenizer.ggml.pre names map to the split regex the merges were learned
# with; a name not listed gets GPT-2's (ByteLevel's built-in regex). Same table as transformers'
# integrations/gguf/gguf_tokenizer_mapping.py (GGUF_PRE_TOKENIZER_SPLITS).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_backend(meta: dict[str, Any]) -> Any:
    """The ``tokenizers.Tokenizer`` of a byte-level BPE ("gpt2") GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token spelled outside the byte alphabet (some converters write a few raw) is respelled
    # byte by byte, as transformers does.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        # GPT-2's regex (transformers' GPT2Tokenizer). llama.cpp's add_space_prefix is a
        # sentencepiece option; transformers ignores it for byte-level vocabularies.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # CONTROL tokens (<|im_start|>, ...) are special; USER_DEFINED ones (<think>) plain added
    # tokens. Either must match whole, or BPE cuts them into pieces. A "control" token outside
    # the byte alphabet is a llama.cpp mislabel and is skipped (transformers does the same).
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types, strict=False)
               if kind == _TOKEN_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _TOKEN_USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def tokenizer_from_gguf(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, as a fast HF tokenizer (built without torch)."""
    from transformers import PreTrainedTokenizerFast

    p = _resolve(path)
    meta = _parsed(p).metadata
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CorruptCheckpointError(
            f"{p} has no tokenizer.ggml.tokens, so it carries no tokenizer (every llama.cpp model "
            "file does); load the tokenizer from the original Hugging Face folder instead"
        )
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{p}: GGUF tokenizer model {model!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE)"
        )
    backend = _byte_level_backend(meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs: dict[str, Any] = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
        # passed explicitly so the wrapper (re)builds the bos/eos post-processor from them
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
