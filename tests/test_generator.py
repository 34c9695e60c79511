"""Generator: batched KV-cache decoding and target scoring against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrag_jax.errors import DataError
from fedrag_jax.generator import Generator
from fedrag_jax.models.llama import CausalLM
from tests.helpers import tiny_hf_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, ref = tiny_hf_causal_lm(tmp_path_factory.mktemp("gen"), "qwen2", seed=3,
                                  eos_token_id=2, pad_token_id=0)
    gen = Generator(CausalLM.from_pretrained(path), tiny_tokenizer(), use_chat_template=False,
                    length_buckets=(8, 16, 32))
    return gen, ref


def reference_logprob(ref, prompt, target):
    """log p(target | prompt) with the PyTorch model in float64."""
    model = ref.double()
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1).numpy()
    ref.float()
    return sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target))


def test_score_equals_float64_reference(tiny):
    gen, ref = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 96, size=n).tolist() for n in (5, 11, 3)]
    targets = [rng.integers(4, 96, size=n).tolist() for n in (4, 1, 7)]
    total = gen.score_ids(prompts, targets)
    mean = gen.score_ids(prompts, targets, reduction="mean")
    expected = np.array([reference_logprob(ref, p, t) for p, t in zip(prompts, targets,
                                                                     strict=True)])
    np.testing.assert_allclose(total, expected, atol=1e-4)
    np.testing.assert_allclose(mean, expected / [4, 1, 7], atol=1e-4)


@pytest.mark.parametrize("prefix", [0, 9], ids=["no-common-start", "shared-prefix"])
def test_packed_scoring_equals_the_reference(tiny, prefix):
    """score_ids(pack=True): the pairs packed a few to a row after the prompts' common start,
    run once (``prefix``: a RAG template's instructions; one prompt is all prefix, so 8 of
    its 9 tokens are shared), give the float64 PyTorch reference's log-probs on each whole
    pair, and the left-padded path's."""
    gen, ref = tiny
    rng = np.random.default_rng(1 + prefix)
    start = rng.integers(4, 96, size=prefix).tolist()
    sizes = [(5, 4), (11, 1), (3, 7), (9, 2), (6, 6)] + ([(0, 2), (1, 3)] if prefix else [])
    prompts = [start + rng.integers(4, 96, size=p).tolist() for p, _ in sizes]
    targets = [rng.integers(4, 96, size=t).tolist() for _, t in sizes]
    assert len(gen.pack_pairs(prompts, targets)["prefix_ids"]) == (8 if prefix else 0)
    packed = gen.score_ids(prompts, targets, pack=True)
    expected = np.array([reference_logprob(ref, p, t) for p, t in zip(prompts, targets,
                                                                     strict=True)])
    np.testing.assert_allclose(packed, expected, atol=1e-4)
    np.testing.assert_allclose(packed, gen.score_ids(prompts, targets), atol=1e-5)
    mean = gen.score_ids(prompts, targets, reduction="mean", pack=True)
    np.testing.assert_allclose(mean, expected / [t for _, t in sizes], atol=1e-4)
    assert np.ptp(expected) > 1.0  # the pairs' scores differ: a mix-up would show


def test_score_text_api_and_errors(tiny):
    gen, _ = tiny
    out = gen.score(["w5 w6 w7", "w9"], ["w10 w11", "w12"])
    assert out.shape == (2,) and np.all(out < 0)
    with pytest.raises(DataError):
        gen.score_ids([[5]], [[]])
    with pytest.raises(DataError):
        gen.score_ids([[5], [6]], [[7]])


def test_greedy_batch_equals_one_by_one_and_transformers(tiny):
    gen, ref = tiny
    gen_noeos = Generator(gen.model, gen.tokenizer, use_chat_template=False,
                          length_buckets=(8, 16, 32))
    gen_noeos.stop_ids = np.asarray([-1], np.int32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 96, size=n).tolist() for n in (3, 9, 6)]
    batch = gen_noeos.generate_ids(prompts, max_new_tokens=10)
    for p, row in zip(prompts, batch, strict=True):
        alone = gen_noeos.generate_ids([p], max_new_tokens=10)[0]
        np.testing.assert_array_equal(row, alone)
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                                  max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        assert row.tolist() == theirs[0, len(p):].tolist()


def test_stops_at_eos_and_pads(tiny):
    gen, _ = tiny
    # generate freely, then declare the 3rd generated token a stop id: decoding must end
    # at its first occurrence and pad the rest
    prompt = [5, 6, 7]
    free = Generator(gen.model, gen.tokenizer, use_chat_template=False)
    free.stop_ids = np.asarray([-1], np.int32)
    tokens = free.generate_ids([prompt], max_new_tokens=8)[0]
    stopper = Generator(gen.model, gen.tokenizer, use_chat_template=False)
    stopper.stop_ids = np.asarray([tokens[2]], np.int32)
    stopper.pad_id = 0
    out = stopper.generate_ids([prompt], max_new_tokens=8)[0]
    first = int(np.flatnonzero(tokens == tokens[2])[0])
    assert out[: first + 1].tolist() == tokens[: first + 1].tolist()
    assert np.all(out[first + 1:] == 0)


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny):
    gen, _ = tiny
    free = Generator(gen.model, gen.tokenizer, use_chat_template=False)
    free.stop_ids = np.asarray([-1], np.int32)
    prompt = [[8, 9, 10, 11]]
    a = free.generate_ids(prompt, 12, temperature=1.0, seed=7)
    b = free.generate_ids(prompt, 12, temperature=1.0, seed=7)
    c = free.generate_ids(prompt, 12, temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = free.generate_ids(prompt, 12)
    nucleus = free.generate_ids(prompt, 12, temperature=1.0, top_p=1e-6, seed=3)
    np.testing.assert_array_equal(greedy, nucleus)
