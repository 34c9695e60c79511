"""Small fixtures shared by the tests: tiny random HF checkpoints written with torch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

TINY_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def perturb_(model, seed: int, scale: float = 0.05) -> None:
    """Random values everywhere (norm weights included): parity on ones/zeros proves little."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny_hf_causal_lm(tmp: Path, family: str, seed: int = 0, **overrides):
    """Write a random tiny HF causal LM of ``family`` to ``tmp``; return (path, torch model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = {**TINY_LLAMA, **overrides}
    if family == "llama":
        config = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(config)
    elif family == "llama3":
        kw.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32})
        kw.setdefault("rope_theta", 500000.0)
        kw.setdefault("tie_word_embeddings", True)
        config = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(config)
    elif family == "mistral":
        kw.setdefault("sliding_window", 5)
        config = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**kw)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        kw.setdefault("head_dim", 16)
        config = transformers.Qwen3Config(**kw)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        raise ValueError(family)
    perturb_(model, seed)
    model.eval()
    path = tmp / family
    model.save_pretrained(path)
    return path, model


def tiny_hf_bert(tmp: Path, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(config)
    perturb_(model, seed)
    model.eval()
    path = tmp / "bert"
    model.save_pretrained(path)
    return path, model


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int,
                 left_pad: bool = True):
    """Random ids with ragged (left- or right-padded) attention masks."""
    ids = rng.integers(1, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        pad = int(rng.integers(1, length // 2))
        if left_pad:
            mask[b, :pad] = 0
        else:
            mask[b, length - pad:] = 0
    return ids, mask


def tiny_tokenizer(vocab_size: int = 96):
    """A real fast tokenizer over words w0..w{n}: token id == word index, <eos> = 2."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>")


def tiny_rag_parts(tmp: Path, num_passages: int = 12, seed: int = 0):
    """A tiny retriever, an exact store of word passages, and a tiny generator.

    Every text is made of words w4..w95, so one WordLevel tokenizer serves both models.
    """
    import jax
    from flax import nnx

    from fedrag_jax.generator import Generator
    from fedrag_jax.knowledge_store import ExactKnowledgeStore
    from fedrag_jax.models.bert import BertConfig, Encoder
    from fedrag_jax.models.llama import CausalLM
    from fedrag_jax.retriever import DualEncoder
    from fedrag_jax.sharding import make_mesh
    from fedrag_jax.types import KnowledgeNode

    rng = np.random.default_rng(seed)
    tokenizer = tiny_tokenizer()
    bert = BertConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    retriever = DualEncoder(Encoder(bert, rngs=nnx.Rngs(seed)), tokenizer, max_length=64,
                            batch_size=8)
    path, _ = tiny_hf_causal_lm(tmp, "llama", seed=seed, eos_token_id=2, pad_token_id=0,
                                max_position_embeddings=512)
    generator = Generator(CausalLM.from_pretrained(path), tokenizer, use_chat_template=False,
                          length_buckets=(32, 64, 128))
    texts = [" ".join(f"w{i}" for i in rng.integers(4, 96, size=int(rng.integers(5, 15))))
             for _ in range(num_passages)]
    store = ExactKnowledgeStore(mesh=make_mesh(None, jax.devices()[:1]))
    emb = retriever.encode_context(texts, progress=False)
    store.add([KnowledgeNode(f"p{i}", t, e) for i, (t, e) in enumerate(zip(texts, emb,
                                                                          strict=True))])
    records = [{"query": " ".join(f"w{i}" for i in rng.integers(4, 96, size=4)),
                "response": " ".join(f"w{i}" for i in rng.integers(4, 96, size=3))}
               for _ in range(6)]
    return retriever, store, generator, records


def tiny_rag_files(tmp: Path, num_passages: int = 12, num_records: int = 8, seed: int = 0):
    """What a config can point at: tiny HF folders (a BERT retriever, a Llama generator, each
    with the WordLevel tokenizer), a corpus JSONL and a train JSONL. Returns the paths."""
    import json

    import transformers

    tokenizer = tiny_tokenizer()
    bert = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=128, type_vocab_size=2,
                                   pad_token_id=0)
    import torch

    torch.manual_seed(seed)
    retriever = transformers.BertModel(bert)
    perturb_(retriever, seed)
    retriever_path = tmp / "retriever"
    retriever.save_pretrained(retriever_path)
    tokenizer.save_pretrained(retriever_path)
    generator_path, _ = tiny_hf_causal_lm(tmp, "llama", seed=seed, eos_token_id=2,
                                          pad_token_id=0, max_position_embeddings=512)
    tokenizer.save_pretrained(generator_path)
    rng = np.random.default_rng(seed)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(4, 96, size=n))

    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": words(int(rng.integers(5, 15)))})
                              + "\n" for i in range(num_passages)))
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"query": words(4), "response": words(3)}) + "\n"
                             for _ in range(num_records)))
    return {"retriever": retriever_path, "generator": generator_path, "corpus": corpus,
            "train": train}


class LocalGrid:
    """An in-process Flower Grid: each message goes straight to its node's ClientApp (what
    the simulation engine does, without Ray), with that node's partition-id (and its
    ``node_configs[c]``, e.g. a silo's data-path); an exception becomes an error reply, as a
    deployed or simulated client's would."""

    def __init__(self, client_app, num_clients: int, run_config: dict | None = None,
                 node_configs: dict[int, dict] | None = None):
        from types import SimpleNamespace

        from flwr.app import RecordDict

        self.app, self.run_config = client_app, dict(run_config or {})
        self.nodes = {100 + c: c for c in range(num_clients)}
        self.node_configs = {c: dict((node_configs or {}).get(c, {}))
                             for c in range(num_clients)}
        # a node keeps its context state between messages (SecAgg+ keeps its keys there)
        self.states = {node: RecordDict() for node in self.nodes}
        self.run = SimpleNamespace(run_id=0)  # what Flower's legacy client manager reads
        self.pushed, self.ready = 0, []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Runs each message's ClientApp at once; its reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"local-{self.pushed}"  # as Flower's grids
            ids.append(msg.metadata.message_id)
            self.ready.extend(self.send_and_receive([msg]))
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        out = [m for m in self.ready if m.metadata.reply_to_message_id in wanted]
        self.ready = [m for m in self.ready if m.metadata.reply_to_message_id not in wanted]
        return out

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, Error, Message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=0, node_id=node, state=self.states[node],
                              run_config=self.run_config,
                              node_config={"partition-id": self.nodes[node],
                                           **self.node_configs[self.nodes[node]]})
            try:  # a copy, as if it had crossed the wire (SecAgg+'s mod edits its input)
                replies.append(self.app(copy.deepcopy(msg), context))
            except Exception as e:  # noqa: BLE001 (reported as the engine reports it)
                replies.append(Message(Error(code=0, reason=repr(e)), reply_to=msg))
        return replies
