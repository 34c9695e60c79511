"""The FedRAG-style entry point: one object, ``mode`` = retriever | generator | both.

    manager = FinetuneManager.from_config(load_config("configs/quickstart.yaml"))
    results = manager.train()          # centralized: LSR, then RALT (mode "both")

It owns the RAG system, the train/dev records and the mesh; each phase builds its dataset
(``batches.py``), its TrainState and jitted step (``steps.py``) and runs the ``Trainer``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from .. import assets
from ..config import Config
from ..evals.benchmarker import Benchmarker
from ..evals.benchmarks import BenchmarkExample
from ..generator import Generator
from ..indexing import build_store, load_corpus
from ..knowledge_store import load_store
from ..models.lora import apply_lora, merge_lora
from ..qa_data import make_qa_pairs
from ..rag import RAGSystem
from ..retriever import DualEncoder
from ..sharding import make_mesh
from ..types import RAGConfig
from .batches import build_lsr_dataset, build_ralt_dataset, load_records
from .optimizer import OptimizerConfig, make_optimizer
from .steps import QUERY_TOWER, Towers, TrainState, compile_step, lsr_step, place_state, ralt_step
from .trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)


def _path(value: str, which: str) -> str:
    if value != "bundled":
        return value
    return str(assets.retriever_path() if which == "retriever" else assets.generator_path())


def build_rag_system(config: Config, mesh=None) -> tuple[RAGSystem, list[dict]]:
    """The RAG system a config describes, and the corpus records it indexed."""
    m, r = config.model, config.retrieval
    retriever = DualEncoder.from_pretrained(
        _path(m.retriever, "retriever"), m.context_retriever, dtype=m.dtype, mesh=mesh,
        max_length=m.retriever_max_length)
    gen_path = _path(m.generator, "generator")
    from ..models.hf import load_tokenizer
    from ..models.llama import CausalLM

    generator = Generator(CausalLM.from_pretrained(gen_path, dtype=m.dtype,
                                                   param_dtype=m.param_dtype, mesh=mesh),
                          load_tokenizer(gen_path), use_chat_template=m.use_chat_template)
    corpus = load_corpus(config.data.corpus, limit=config.data.corpus_limit)
    if config.data.index:
        store = load_store(Path(config.data.index) / "store")
    else:
        store = build_store(corpus, retriever, backend=r.backend, progress=config.progress)
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=r.top_k, prompt_template=r.prompt_template),
                    max_new_tokens=r.max_new_tokens, max_context_tokens=r.max_context_tokens)
    return rag, corpus


def load_train_eval_records(config: Config, corpus: list[dict]) -> tuple[list[dict], list[dict]]:
    d = config.data
    if d.train == "bundled":
        train, dev = make_qa_pairs(corpus, d.num_train, d.num_eval, seed=config.seed,
                                   topics=d.topics)
        return train, (dev if d.eval == "bundled" else load_records(d.eval) if d.eval else [])
    train = load_records(d.train)[: d.num_train]
    dev = load_records(d.eval)[: d.num_eval] if d.eval and d.eval != "bundled" else []
    return train, dev


class FinetuneManager:
    def __init__(self, rag: RAGSystem, train_records: list[dict], eval_records: list[dict],
                 config: Config, *, mesh=None):
        self.rag = rag
        self.train_records = load_records(train_records)
        self.eval_records = list(eval_records)
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(vars(config.mesh))
        self.output_dir = Path(config.output_dir)
        self.results: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Config) -> FinetuneManager:
        mesh = make_mesh(vars(config.mesh))
        rag, corpus = build_rag_system(config, mesh)
        train, dev = load_train_eval_records(config, corpus)
        return cls(rag, train, dev, config, mesh=mesh)

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(self, name: str, records: list[dict] | None = None, *,
                 generate: bool = True) -> dict[str, float]:
        """Dev recall@k / MRR of the gold passage, and EM / F1 of the generated answers."""
        records = self.eval_records if records is None else records
        if not records:
            return {}
        start = time.perf_counter()
        k = self.rag.config.top_k
        metrics: dict[str, float] = {}
        if generate:
            examples = [BenchmarkExample(example_id=str(i), query=r["query"],
                                         answers=[r["response"]],
                                         gold_passage_id=r.get("gold_id"))
                        for i, r in enumerate(records)]
            result = Benchmarker(self.rag, examples, batch_size=16, recall_k=k,
                                 out_dir=self.output_dir / "eval" / name,
                                 progress=self.config.progress).run()
            metrics.update({key: float(v) for key, v in result.metrics.items()})
        elif records[0].get("gold_id") is not None:
            metrics["recall_at_k"] = self.recall([r["query"] for r in records],
                                                 [r["gold_id"] for r in records])
        metrics["seconds"] = time.perf_counter() - start
        self.results[name] = metrics
        log.info("%s: %s", name, metrics)
        return metrics

    def recall(self, queries: list[str], gold_ids: list[str],
               retriever: DualEncoder | None = None) -> float:
        retriever = retriever or self.rag.retriever
        _, ids = self.rag.store.search(retriever.encode_query(queries), self.rag.config.top_k)
        return float(np.mean([g in set(map(str, row)) for g, row in zip(gold_ids, ids,
                                                                         strict=True)]))

    # --- LSR -------------------------------------------------------------------------------
    def train_retriever(self) -> TrainState:
        c, lsr, rag = self.config, self.config.lsr, self.rag
        retriever = rag.retriever
        data = build_lsr_dataset(
            self.train_records, retriever, rag.store, rag.generator, top_k=rag.config.top_k,
            batch_size=lsr.batch_size, template=rag.config.prompt_template,
            max_length=lsr.max_length, max_passage_tokens=rag.max_context_tokens,
            score_batch_size=lsr.score_batch_size, reduction=lsr.lm_reduction, seed=c.seed,
            progress=c.progress)
        # RA-DIT trains the query tower only: untie a shared tower so that the store's
        # passage embeddings stay valid.
        context = retriever.context_encoder or retriever.query_encoder
        towers = Towers(nnx.clone(retriever.query_encoder), context)
        trainable = nnx.Param if lsr.train_context else QUERY_TOWER
        tx = make_optimizer(OptimizerConfig(
            learning_rate=lsr.learning_rate, warmup_steps=lsr.warmup_steps,
            total_steps=lsr.steps, weight_decay=lsr.weight_decay,
            max_grad_norm=lsr.max_grad_norm))
        state = place_state(TrainState.create(towers, tx, trainable, seed=c.seed), self.mesh)
        step = compile_step(lsr_step, state, data.batch_at(0, 0), self.mesh,
                            tau_retrieval=lsr.tau_retrieval, tau_lm=lsr.tau_lm,
                            micro_batches=lsr.micro_batches)
        dev = [r for r in self.eval_records if r.get("gold_id")]

        def eval_fn(state: TrainState) -> dict[str, float]:
            probe = DualEncoder(state.model().query_tower, retriever.tokenizer,
                                max_length=retriever.max_length, mesh=self.mesh)
            return {"recall_at_k": self.recall([r["query"] for r in dev],
                                               [r["gold_id"] for r in dev], probe)}

        trainer = Trainer(state, step, data, self._trainer_config("lsr", lsr.steps),
                          eval_fn=eval_fn if dev else None, mesh=self.mesh)
        state = trainer.train()
        trained = state.model()
        retriever.query_encoder = trained.query_tower
        retriever.context_encoder = trained.context_tower
        if lsr.train_context:  # the store's embeddings came from the old context tower
            corpus = [{"id": i, "text": n.text, "metadata": n.metadata}
                      for i, n in zip(rag.store.node_ids(), rag.store.get(rag.store.node_ids()),
                                      strict=True)]
            rag.store = build_store(corpus, retriever, backend=c.retrieval.backend,
                                    progress=c.progress)
        return state

    # --- RALT ------------------------------------------------------------------------------
    def train_generator(self) -> TrainState:
        c, ralt, rag = self.config, self.config.ralt, self.rag
        data = build_ralt_dataset(
            self.train_records, rag.retriever, rag.store, rag.generator,
            top_k=ralt.top_k or rag.config.top_k, batch_size=ralt.batch_size,
            template=rag.config.prompt_template, max_length=ralt.max_length,
            max_passage_tokens=rag.max_context_tokens, weighting=ralt.weighting, seed=c.seed,
            progress=c.progress)
        model = nnx.clone(rag.generator.model)
        if ralt.lora_rank > 0:
            model = apply_lora(model, rank=ralt.lora_rank, alpha=ralt.lora_alpha,
                               target_modules=tuple(ralt.lora_targets), seed=c.seed)
        trainable = nnx.LoRAParam if ralt.lora_rank > 0 else nnx.Param
        tx = make_optimizer(OptimizerConfig(
            learning_rate=ralt.learning_rate, warmup_steps=ralt.warmup_steps,
            total_steps=ralt.steps, weight_decay=ralt.weight_decay,
            max_grad_norm=ralt.max_grad_norm))
        state = place_state(TrainState.create(model, tx, trainable, seed=c.seed), self.mesh)
        step = compile_step(ralt_step, state, data.batch_at(0, 0), self.mesh,
                            micro_batches=ralt.micro_batches)
        trainer = Trainer(state, step, data, self._trainer_config("ralt", ralt.steps),
                          mesh=self.mesh)
        state = trainer.train()
        adapted = state.model()
        rag.generator.model = merge_lora(adapted) if ralt.lora_rank > 0 else adapted
        return state

    def _trainer_config(self, name: str, steps: int) -> TrainerConfig:
        c = self.config
        return TrainerConfig(total_steps=steps, output_dir=str(self.output_dir / name),
                             eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                             keep_checkpoints=c.keep_checkpoints, progress=c.progress, name=name)

    # --- the one call ------------------------------------------------------------------------
    def train(self, *, evaluate: bool = True) -> dict[str, Any]:
        mode = self.config.mode
        if evaluate:
            self.evaluate("before")
        if mode in ("retriever", "both"):
            self.train_retriever()
            if evaluate:
                self.evaluate("after_lsr", generate=mode == "retriever")
        if mode in ("generator", "both"):
            self.train_generator()
            if evaluate:
                self.evaluate("after_ralt" if mode == "both" else "after")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "results.json").write_text(json.dumps(self.results, indent=2))
        return self.results
