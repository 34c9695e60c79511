"""Batch builders: shapes, labels on response + EOS only, truncation, deterministic order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrag_jax.errors import DataError
from fedrag_jax.finetune.batches import (
    PromptBuilder,
    assemble,
    build_lsr_dataset,
    build_ralt_dataset,
    load_records,
)
from tests.helpers import tiny_rag_parts

TEMPLATE = "w4 {context} w5 {query} w6"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_rag_parts(tmp_path_factory.mktemp("rag"))


def test_load_records_from_list_jsonl_and_dataset(tmp_path):
    rows = [{"query": "q1", "response": "r1"}, {"query": "q2", "response": "r2"}]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_records(f) == rows == load_records(rows)
    import datasets

    assert load_records(datasets.Dataset.from_list(rows)) == rows
    with pytest.raises(DataError, match="response"):
        load_records([{"query": "q"}])
    with pytest.raises(DataError, match="no training records"):
        load_records([])
    f.write_text('{"query": "q"\n')
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(f)


def test_ralt_labels_are_exactly_response_and_eos(parts):
    retriever, store, generator, records = parts
    data = build_ralt_dataset(records, retriever, store, generator, top_k=3, batch_size=2,
                              template=TEMPLATE, progress=False)
    batch = data.batch_at(0, 0)
    n = 2 * 3
    assert batch["input_ids"].shape[0] == n and batch["weights"].shape == (n,)
    order = np.random.default_rng([0, 0]).permutation(len(records))[:2]
    tok = generator.tokenizer
    for row in range(n):
        record = records[order[row // 3]]
        m = batch["target_mask"][row]
        labels = batch["target_ids"][row][m]
        expected = tok(" " + record["response"], add_special_tokens=False)["input_ids"] + [2]
        assert labels.tolist() == expected
        # the label at target_index + 1 is the next token of the sequence
        idx = batch["target_index"][row][m]
        assert batch["input_ids"][row][idx + 1].tolist() == expected
        # nothing before the response is labelled: the prompt ends right where labels start
        prompt = batch["input_ids"][row][batch["attention_mask"][row]][: -len(expected)]
        assert tok.decode(prompt).split()[-1] == "w6"


def test_packed_ralt_batches_hold_the_same_instances(parts):
    """ralt.pack: the same instances, labels and weights as the left-padded batch, each
    sequence contiguous in one row after the prompts' common prefix (run once per step),
    and the last (padded) batch of an epoch packs too."""
    retriever, store, generator, records = parts
    kw = dict(top_k=3, batch_size=4, template=TEMPLATE, progress=False)
    padded = build_ralt_dataset(records, retriever, store, generator, **kw)
    packed = build_ralt_dataset(records, retriever, store, generator, **kw).pack(4, 2)
    assert len(packed) == len(padded) == 2  # 6 records: the second batch is half padding
    for index in range(2):
        a, b = padded.batch_at(1, index), packed.batch_at(1, index)
        assert b["input_ids"].shape[0] == 4 and b["segment_ids"].shape == b["input_ids"].shape
        for key in ("target_ids", "target_mask", "weights"):
            np.testing.assert_array_equal(a[key], b[key])
        p = len(b["prefix_ids"])
        assert p == packed.prefix_length > 0  # the template's words before the context
        for i in range(12):
            sequence = a["input_ids"][i][a["attention_mask"][i]].tolist()
            row, m = b["instance_row"][i], b["target_mask"][i]
            end = b["target_index"][i][m][-1] + 2
            assert b["prefix_ids"].tolist() == sequence[:p]
            assert b["input_ids"][row, end - len(sequence) + p:end].tolist() == sequence[p:]
            assert row // 2 == i // 6  # micro-batch g's instances in micro-batch g's rows
    with pytest.raises(DataError, match="multiple of micro_batches"):
        padded.pack(3, 2)


def test_passage_is_truncated_never_the_response(parts):
    retriever, store, generator, records = parts
    builder = PromptBuilder(generator, TEMPLATE)
    left, right = builder.parts("w7 w8")
    passage = list(range(10, 60))
    target = builder.target_ids(["w9 w10 w11"])[0]
    ids = assemble(left, passage, right, target, max_length=len(left) + len(right) + 20)
    assert ids[:len(left)] == left and ids[-len(right):] == right
    kept = len(ids) - len(left) - len(right)
    assert kept == 20 - len(target) and ids[len(left):len(left) + kept] == passage[:kept]
    with pytest.raises(DataError, match="max_length"):
        assemble(left, passage, right, target, max_length=len(left) + 2)


def test_lsr_dataset_scores_every_pair_with_the_generator(parts):
    retriever, store, generator, records = parts
    data = build_lsr_dataset(records, retriever, store, generator, top_k=3, batch_size=4,
                             template=TEMPLATE, progress=False)
    assert len(data) == 2
    b = data.batch_at(1, 1)  # the second batch of 6 examples is padded to 4 with a mask
    assert b["example_mask"].tolist() == [True, True, False, False]
    assert b["passage_emb"].shape == (4, 3, 32) and b["lm_logprobs"].shape == (4, 3)
    np.testing.assert_array_equal(b["query_ids"], data.batch_at(1, 1)["query_ids"])
    assert not np.array_equal(data.batch_at(0, 0)["query_ids"], data.batch_at(1, 0)["query_ids"])
    # the store's embeddings and the LM's score of prompt(query, passage) for record 0
    node_ids = data.passage_ids[0]
    nodes = store.get([str(i) for i in node_ids])
    np.testing.assert_array_equal(data.arrays["passage_emb"][0],
                                  np.stack([n.embedding for n in nodes]))
    prompts = [TEMPLATE.format(context=n.text, query=records[0]["query"]) for n in nodes]
    expected = generator.score(prompts, [" " + records[0]["response"] + " <eos>"] * 3)
    np.testing.assert_allclose(data.arrays["lm_logprobs"][0], expected, atol=1e-4)


def test_train_context_reaches_the_context_tower(parts):
    import jax
    from flax import nnx

    from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
    from fedrag_jax.finetune.steps import Towers, TrainState, lsr_step

    retriever, store, generator, records = parts
    data = build_lsr_dataset(records, retriever, store, generator, top_k=3, batch_size=4,
                             template=TEMPLATE, progress=False, passage_tokens=True)
    batch = data.batch_at(0, 0)
    assert batch["passage_ids"].shape[:2] == (4, 3)
    assert batch["passage_mask"].sum() > 0
    towers = Towers(nnx.clone(retriever.query_encoder), nnx.clone(retriever.query_encoder))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=5))
    state = TrainState.create(towers, tx, nnx.Param)
    before = jax.tree.map(np.asarray, state.params["context_tower"])
    state, metrics = jax.jit(lsr_step)(state, batch)
    after = jax.tree.map(np.asarray, state.params["context_tower"])
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after), strict=True))


def test_lsr_training_scores_equal_search_time_scores_with_prefixes(parts):
    """e5 / bge style prefixes: the step must score the same text the retriever searches
    with, else LSR trains a different function from the one serving queries."""
    import jax.numpy as jnp

    from fedrag_jax.finetune.steps import Towers
    from fedrag_jax.retriever import DualEncoder

    plain, store, generator, records = parts
    retriever = DualEncoder(plain.query_encoder, plain.tokenizer, max_length=64, batch_size=8,
                            query_prefix="w7 ", context_prefix="w8 ")
    data = build_lsr_dataset(records, retriever, store, generator, top_k=3, batch_size=4,
                             template=TEMPLATE, progress=False, passage_tokens=True)
    batch = data.batch_at(0, 0)
    rows = data.indices(0, 0)[0]
    tower = retriever.query_encoder
    q = np.asarray(tower(jnp.asarray(batch["query_ids"]), jnp.asarray(batch["query_mask"])))
    expected_q = retriever.encode_query([records[i]["query"] for i in rows])
    np.testing.assert_allclose(q, expected_q, atol=1e-5)
    b, k, length = batch["passage_ids"].shape
    e = np.asarray(Towers(tower, tower).context_tower(
        jnp.asarray(batch["passage_ids"].reshape(b * k, length)),
        jnp.asarray(batch["passage_mask"].reshape(b * k, length))))
    texts = [n.text for n in store.get([str(i) for i in data.passage_ids[rows].reshape(-1)])]
    np.testing.assert_allclose(e, retriever.encode_context(texts, progress=False), atol=1e-5)


def test_jsonl_lines_that_are_not_objects_are_named_errors(tmp_path):
    from fedrag_jax.errors import DataError

    path = tmp_path / "records.jsonl"
    path.write_text('{"query": "q", "response": "r"}\n\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"records\.jsonl:3: each line must be a JSON object"):
        load_records(path)
    path.write_text('{"query": "q", "response": "r"}\n{broken\n')
    with pytest.raises(DataError, match=r"records\.jsonl:2: not valid JSON"):
        load_records(path)
