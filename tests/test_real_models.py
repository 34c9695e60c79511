"""Parity on the two bundled real models: MiniLM-L6 (retriever) and SmolLM2-135M (generator)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fedrag_jax import assets
from fedrag_jax.generator import Generator
from fedrag_jax.models.bert import Encoder
from fedrag_jax.models.hf import load_tokenizer
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.retriever import DualEncoder

pytestmark = pytest.mark.slow

SENTENCES = [
    "The capital of France is Paris.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Who wrote the novel War and Peace?",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
]


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_minilm_matches_transformers():
    path = assets.retriever_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path).eval()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    with torch.no_grad():
        hidden = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    ours = Encoder.from_pretrained(path)
    assert ours.config.pooling == "mean"  # read from the sentence-transformers files
    mine = np.asarray(ours.hidden_states(jnp.asarray(enc["input_ids"]),
                                         jnp.asarray(enc["attention_mask"]),
                                         jnp.asarray(enc["token_type_ids"])))
    real = enc["attention_mask"].astype(bool)
    assert relative_error(mine[real], hidden[real]) <= 1e-3


def test_minilm_retriever_embeddings_are_meaningful():
    retriever = DualEncoder.from_pretrained(assets.retriever_path())
    a, b, c = retriever.encode_query(["How tall is Mount Everest?",
                                      "What is the height of Everest?",
                                      "A recipe for banana bread."])
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert cos(a, b) > 0.8 and cos(a, c) < 0.3


@pytest.fixture(scope="module")
def smollm2():
    gguf = assets.generator_path()
    ours = CausalLM.from_pretrained(gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(gguf)
    return ours, ref, tokenizer


def test_smollm2_logits_match_transformers(smollm2):
    ours, ref, tokenizer = smollm2
    ids = tokenizer(SENTENCES[:2], padding=True, return_tensors="np", padding_side="left")
    mask = ids["attention_mask"]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
    mine = np.asarray(ours(jnp.asarray(ids["input_ids"]), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert relative_error(mine[real], theirs[real]) <= 1e-3


def test_smollm2_greedy_continuation_is_token_identical(smollm2):
    ours, ref, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=20, min_new_tokens=20, do_sample=False)
    theirs = theirs[0, len(prompt):].tolist()
    generator = Generator(ours, tokenizer, use_chat_template=False)
    generator.stop_ids = np.asarray([-1], np.int32)  # compare all 20 tokens, EOS or not
    mine = generator.generate_ids([prompt], max_new_tokens=20)[0].tolist()
    assert mine == theirs
    assert "Paris" in tokenizer.decode(mine)


def test_smollm2_chat_answer():
    generator = Generator.from_pretrained(assets.generator_path())
    assert generator.use_chat_template
    (answer,) = generator.generate(["What is the capital of France?"], max_new_tokens=24)
    assert "Paris" in answer
