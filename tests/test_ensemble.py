"""Ensemble fusion (REPLUG / RA-DIT parallel retrieval augmentation) against a hand-computed
mixture: every step's next-token distributions of the passage prompts from plain forwards
(no cache, no padding), mixed with P_R(d | x) in float64 NumPy, the token chosen from it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrag_jax.errors import ConfigError, DataError
from fedrag_jax.generator import Generator, fusion_log_weights
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.rag import RAGSystem
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_hf_causal_lm, tiny_rag_parts, tiny_tokenizer

TAU = 0.05


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path, _ = tiny_hf_causal_lm(tmp_path_factory.mktemp("ens"), "llama", seed=5,
                                eos_token_id=2, pad_token_id=0)
    gen = Generator(CausalLM.from_pretrained(path), tiny_tokenizer(), use_chat_template=False,
                    length_buckets=(8, 16, 32, 64))
    gen.stop_ids = np.asarray([-1], np.int32)  # no early stop: every step is compared
    return gen


def ragged_queries(seed: int, batch: int = 3, k: int = 3, prefix: int = 6):
    """``batch`` queries x ``k`` passage prompts of different lengths, all beginning with
    the same ``prefix`` tokens (a template's instructions), and retrieval-like scores."""
    rng = np.random.default_rng(seed)
    start = rng.integers(4, 96, size=prefix).tolist()
    prompts = [[start + rng.integers(4, 96, size=int(rng.integers(2, 12))).tolist()
                for _ in range(k)] for _ in range(batch)]
    scores = rng.uniform(0.3, 0.7, size=(batch, k))  # cosine-like; / TAU spreads them
    return prompts, scores


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_token_logprobs(model: CausalLM, ids: list[int]) -> np.ndarray:
    """log p(. | ids) from a plain forward (no cache, no padding), float64."""
    logits = model(jnp.asarray([ids], jnp.int32))
    return log_softmax64(np.asarray(logits[0, -1]))


def nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The top-p filter of ``sample_next``, in float64."""
    if top_p >= 1.0:
        return logits
    out = logits.copy()
    for b in range(len(logits)):
        order = np.sort(logits[b])[::-1]
        p = np.exp(order - order.max())
        cum = np.cumsum(p / p.sum())
        cutoff = order[int(np.sum(cum < top_p))]
        out[b][logits[b] < cutoff] = -np.inf
    return out


def reference_decode(model, prompts, scores, steps, temperature=0.0, top_p=1.0, seed=0):
    """Tokens and the mixture log p [B, steps, V], step by step, in float64."""
    weights = np.exp(log_softmax64(np.asarray(scores) / TAU))  # P_R(d | x)
    batch = len(prompts)
    generated = [[] for _ in range(batch)]
    mixtures, margins = [], []
    key = jax.random.key(seed)
    for _ in range(steps):
        mix = np.stack([np.log(sum(w * np.exp(next_token_logprobs(model, p + generated[b]))
                                   for w, p in zip(weights[b], prompts[b], strict=True)))
                        for b in range(batch)])  # log sum_d P_R(d|x) p(y_t | y_<t, d, x)
        key, step_key = jax.random.split(key)
        if temperature == 0.0:
            chosen = mix.argmax(-1)
            noisy = mix
        else:  # the same Gumbel draws as the decoder: the same key on the [B, V] logits
            logits = nucleus(mix / temperature, top_p)
            chosen = np.asarray(jax.random.categorical(step_key, jnp.asarray(logits,
                                                                              jnp.float32)))
            gumbel = np.asarray(jax.random.gumbel(step_key, logits.shape, jnp.float32))
            noisy = logits + gumbel
        top2 = np.sort(noisy, -1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        for b in range(batch):
            generated[b].append(int(chosen[b]))
        mixtures.append(mix)
    return np.array(generated), np.stack(mixtures, 1), np.min(margins)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 1.0), (1.3, 0.9)],
                         ids=["greedy", "temperature", "temperature-top-p"])
def test_ensemble_decoding_equals_the_hand_computed_mixture(generator, temperature, top_p):
    """3 queries x 3 ragged passage prompts, 3 steps: the decoder's tokens and its mixture
    log-probs at each step equal the float64 mixture of per-prompt plain forwards."""
    prompts, scores = ragged_queries(seed=11)
    lw = fusion_log_weights(scores, TAU)
    tokens, token_logp, mixed = generator.generate_ensemble_ids(
        prompts, lw, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=4,
        return_logprobs=True)
    ref_tokens, ref_mixed, margin = reference_decode(generator.model, prompts, scores, 3,
                                                     temperature, top_p, seed=4)
    assert margin > 1e-3  # no near-tie: a wrong mixture would change the choice
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(mixed, ref_mixed, atol=2e-5)
    np.testing.assert_allclose(token_logp, np.take_along_axis(ref_mixed, ref_tokens[..., None],
                                                              -1)[..., 0], atol=2e-5)
    # the mixture is not one of its parts: the weights and every passage matter
    first = np.stack([next_token_logprobs(generator.model, p[0]) for p in prompts])
    assert np.abs(ref_mixed[:, 0] - first).max() > 0.05
    assert np.ptp(np.exp(lw), axis=1).min() > 0.05  # the weights are far from uniform


def test_shared_prefix_equals_no_prefix(generator):
    """The prompts' common start run once (a cache broadcast to every row) or in every row:
    the same mixtures and tokens, greedy and sampled."""
    prompts, scores = ragged_queries(seed=12)
    lw = fusion_log_weights(scores, TAU)
    for temperature in (0.0, 0.8):
        with_prefix, without = (generator.generate_ensemble_ids(
            prompts, lw, 3, temperature=temperature, seed=2, share_prefix=share,
            return_logprobs=True) for share in (True, False))
        np.testing.assert_array_equal(with_prefix[0], without[0])
        np.testing.assert_allclose(with_prefix[2], without[2], atol=1e-5)


def test_one_passage_is_plain_decoding_and_one_hot_weights_pick_a_prompt(generator):
    prompts, scores = ragged_queries(seed=13)
    plain = generator.generate_ids([p[1] for p in prompts], max_new_tokens=3)
    alone = generator.generate_ensemble_ids([[p[1]] for p in prompts], np.zeros((3, 1)), 3)
    np.testing.assert_array_equal(alone, plain)
    one_hot = np.full((3, 3), -200.0)
    one_hot[:, 1] = 0.0
    tokens = generator.generate_ensemble_ids(prompts, one_hot, 3, return_logprobs=True)[0]
    np.testing.assert_array_equal(tokens, plain)


def test_each_query_stops_at_its_own_eos(generator):
    prompts, scores = ragged_queries(seed=14)
    lw = fusion_log_weights(scores, TAU)
    free = generator.generate_ensemble_ids(prompts, lw, 8)
    # a stop token that query 0 emits at step 2 and query 1 never emits in 8 steps
    step, stop = next((i, int(t)) for i, t in enumerate(free[0]) if i >= 1
                      and t not in free[1] and t not in free[0][:i])
    stopper = Generator(generator.model, generator.tokenizer, use_chat_template=False,
                        length_buckets=generator.length_buckets)
    stopper.stop_ids, stopper.pad_id = np.asarray([stop], np.int32), 0
    out = stopper.generate_ensemble_ids(prompts, lw, 8)
    assert out[0, :step + 1].tolist() == free[0, :step + 1].tolist()
    assert np.all(out[0, step + 1:] == 0)
    assert out[1].tolist() == free[1].tolist()  # the other query goes on, unchanged


def reference_sequence_logprob(model, prompt, target) -> float:
    logits = model(jnp.asarray([prompt + target], jnp.int32))
    logp = log_softmax64(np.asarray(logits[0]))
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target)))


def test_ensemble_score_is_logsumexp_of_weighted_pair_scores(generator):
    prompts, scores = ragged_queries(seed=15)
    rng = np.random.default_rng(15)
    targets = [rng.integers(4, 96, size=n).tolist() for n in (3, 1, 5)]
    lw = fusion_log_weights(scores, TAU)
    per_pair = np.array([[reference_sequence_logprob(generator.model, p, t) for p in ps]
                         for ps, t in zip(prompts, targets, strict=True)])
    weights = np.exp(log_softmax64(scores / TAU))
    expected = np.log((weights * np.exp(per_pair)).sum(1))  # log sum_d P_R(d|x) p(y|d,x)
    for pack in (False, True):
        got = generator.score_ensemble_ids(prompts, targets, lw, pack=pack)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        mean = generator.score_ensemble_ids(prompts, targets, lw, "mean", pack=pack)
        np.testing.assert_allclose(mean, expected / [3, 1, 5], atol=1e-4)
    # the weights matter: neither the best passage alone nor the uniform mixture
    assert np.abs(expected - per_pair.max(1)).min() > 1e-3
    uniform = np.log(np.exp(per_pair).mean(1))
    assert np.abs(expected - uniform).min() > 1e-2


def test_ensemble_input_errors(generator):
    prompts, scores = ragged_queries(seed=16)
    with pytest.raises(DataError, match="expected k=3"):
        generator.generate_ensemble_ids([prompts[0], prompts[1][:2]], np.zeros((2, 3)), 2)
    with pytest.raises(DataError, match="log_weights must be"):
        generator.generate_ensemble_ids(prompts, np.zeros((2, 3)), 2)
    with pytest.raises(DataError, match="finite"):
        generator.score_ensemble_ids(prompts, [[5]] * 3, np.full((3, 3), np.nan))
    with pytest.raises(DataError, match="targets"):
        generator.score_ensemble_ids(prompts, [[5]] * 2, np.zeros((3, 3)))
    with pytest.raises(DataError, match="temperature"):
        fusion_log_weights(scores, 0.0)
    with pytest.raises(ConfigError, match="fusion"):
        RAGConfig(fusion="mean")
    with pytest.raises(ConfigError, match="fusion_temperature"):
        RAGConfig(fusion_temperature=0)


# --- the RAG system -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def system(tmp_path_factory):
    retriever, store, generator, records = tiny_rag_parts(tmp_path_factory.mktemp("rag"))
    config = RAGConfig(top_k=3, prompt_template="w4 w7 w8 {context} w5 {query} w6",
                       fusion="ensemble", fusion_temperature=0.1)
    return RAGSystem(retriever, store, generator, config, max_new_tokens=5,
                     max_context_tokens=6), records


def test_rag_ensemble_query_end_to_end(system):
    rag, records = system
    queries = [r["query"] for r in records[:3]]
    responses = rag.batch_query(queries)
    sources = rag.batch_retrieve(queries)
    prompts = [rag.passage_prompts(q, s) for q, s in zip(queries, sources, strict=True)]
    assert prompts[0][0] == rag.build_prompt(queries[0], sources[0][:1])
    lw = fusion_log_weights([[s.score for s in row] for row in sources], 0.1)
    expected = rag.generator.generate_ensemble(prompts, lw, max_new_tokens=5)
    assert [r.answer for r in responses] == expected
    assert all(len(r.source_nodes) == 3 for r in responses)
    assert rag.query(queries[1]).answer == responses[1].answer  # batch of 1 == batch of 3
    # score: the mixture of the passages' sequence probabilities
    got = rag.score(queries, [r["response"] for r in records[:3]])
    expected = rag.generator.score_ensemble(prompts, [r["response"] for r in records[:3]], lw)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    concat = RAGSystem(rag.retriever, rag.store, rag.generator,
                       RAGConfig(top_k=3, prompt_template=rag.config.prompt_template),
                       max_new_tokens=5, max_context_tokens=6)
    concat_scores = concat.score(queries, [r["response"] for r in records[:3]])
    assert np.abs(concat_scores - got).min() > 1e-3  # a different system


def test_rag_saves_and_loads_the_fusion(system, tmp_path):
    rag, records = system
    rag.save_pretrained(tmp_path / "sys")
    saved = json.loads((tmp_path / "sys" / "rag_config.json").read_text())
    assert saved["rag"]["fusion"] == "ensemble" and saved["rag"]["fusion_temperature"] == 0.1
    again = RAGSystem.from_pretrained(tmp_path / "sys")
    assert again.config == rag.config
    queries = [r["query"] for r in records]
    assert [r.answer for r in again.batch_query(queries)] == \
        [r.answer for r in rag.batch_query(queries)]
    # a file written before the setting existed loads as concat
    del saved["rag"]["fusion"], saved["rag"]["fusion_temperature"]
    (tmp_path / "sys" / "rag_config.json").write_text(json.dumps(saved))
    old = RAGSystem.from_pretrained(tmp_path / "sys")
    assert old.config.fusion == "concat"
    assert [r.answer for r in old.batch_query(queries[:2])] == \
        [r.answer for r in RAGSystem(rag.retriever, rag.store, rag.generator,
                                     RAGConfig(top_k=3,
                                               prompt_template=rag.config.prompt_template),
                                     max_new_tokens=5, max_context_tokens=6)
         .batch_query(queries[:2])]


def test_config_fusion_reaches_the_rag_system(tmp_path):
    """retrieval.fusion / fusion_temperature from a config; the temperature defaults to
    lsr.tau_retrieval."""
    from fedrag_jax.config import load_config
    from fedrag_jax.finetune.manager import build_rag_system
    from tests.helpers import tiny_rag_files

    files = tiny_rag_files(tmp_path)
    base = [f"model.retriever={files['retriever']}", f"model.generator={files['generator']}",
            f"data.corpus={files['corpus']}", "retrieval.backend=exact", "progress=false",
            "model.use_chat_template=false"]
    rag, _ = build_rag_system(load_config(None, base + ["retrieval.fusion=ensemble",
                                                        "lsr.tau_retrieval=0.2"]))
    assert rag.config.fusion == "ensemble" and rag.config.fusion_temperature == 0.2
    rag, _ = build_rag_system(load_config(None, base + ["retrieval.fusion_temperature=0.3"]))
    assert rag.config.fusion == "concat" and rag.config.fusion_temperature == 0.3
    with pytest.raises(ConfigError, match="retrieval.fusion"):
        load_config(None, ["retrieval.fusion=sum"])


def test_prefill_computes_the_lm_head_at_the_last_prompt_position_only():
    """Both decodes need the next-token logits of each row's last prompt token: the LM head
    over every prompt position ([rows * L, V], 49152 columns for SmolLM2) is wasted work."""
    import re

    from flax import nnx

    from fedrag_jax.generator import _decode, _decode_ensemble
    from fedrag_jax.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=997, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    graphdef, state = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)))
    rows, length = 6, 40
    ids, mask = np.ones((rows, length), np.int32), np.ones((rows, length), bool)
    common = dict(max_new_tokens=4, temperature=0.0, top_p=1.0)
    stop, pad = np.array([2], np.int32), np.int32(0)
    programs = {
        "concat": _decode.lower(graphdef, state, ids, mask, jax.random.key(0), stop, pad,
                                **common),
        "ensemble": _decode_ensemble.lower(graphdef, state, np.ones(5, np.int32), ids, mask,
                                           np.zeros((2, 3), np.float32), jax.random.key(0),
                                           stop, pad, keep_logprobs=False, **common)}
    for name, lowered in programs.items():
        hlo = lowered.compile().as_text()
        head_rows = [int(m) for m in re.findall(r"f32\[(\d+),997\]\S* dot\(", hlo)]
        assert head_rows and max(head_rows) == rows, (name, head_rows)
