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

from .. import assets, outputs
from ..config import Config
from ..evals.benchmarker import Benchmarker
from ..evals.benchmarks import BenchmarkExample
from ..generator import Generator
from ..indexing import build_store, load_corpus
from ..knowledge_store import load_store
from ..models.lora import apply_lora, has_lora, merge_lora
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
                 config: Config, *, mesh=None, dataset_cache: dict | None = None):
        self.rag = rag
        self.train_records = load_records(train_records)
        self.eval_records = list(eval_records)
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(vars(config.mesh))
        self.output_dir = outputs.out_path(config.output_dir)  # local or gs://
        self.results: dict[str, Any] = {}
        # LSR datasets are costly (every (query, passage) pair is LM-scored) and depend only
        # on the records and the models that built them: managers may share this cache.
        self.dataset_cache = {} if dataset_cache is None else dataset_cache

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
            primary = outputs.is_primary()  # every host generates; one writes
            result = Benchmarker(self.rag, examples, batch_size=16, recall_k=k,
                                 out_dir=self.output_dir / "eval" / name if primary else None,
                                 progress=self.config.progress and primary).run()
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
    def lsr_dataset(self, records: list[dict]):
        lsr, rag = self.config.lsr, self.rag
        key = ("lsr", tuple((r["query"], r["response"]) for r in records), repr(lsr),
               rag.config.top_k, rag.config.prompt_template, rag.max_context_tokens)
        models = (rag.retriever.query_encoder, rag.generator.model, rag.store)
        cached = self.dataset_cache.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[0], models, strict=True)):
            cached = self.dataset_cache[key] = (models, self._build_lsr_dataset(records))
        return cached[1]

    def _build_lsr_dataset(self, records: list[dict]):
        c, lsr, rag = self.config, self.config.lsr, self.rag
        return build_lsr_dataset(
            records, rag.retriever, rag.store, rag.generator,
            top_k=lsr.top_k or rag.config.top_k, batch_size=lsr.batch_size,
            template=rag.config.prompt_template,
            max_length=lsr.max_length, max_passage_tokens=rag.max_context_tokens,
            score_batch_size=lsr.score_batch_size, reduction=lsr.lm_reduction, seed=c.seed,
            progress=c.progress, passage_tokens=lsr.train_context)

    def lsr_model(self) -> tuple[Towers, Any, OptimizerConfig]:
        """The towers to train, the trainable filter and the optimizer settings.

        RA-DIT trains the query tower only: a shared tower is untied (copied) so that the
        store's passage embeddings, made by the context tower, stay valid.
        """
        lsr, retriever = self.config.lsr, self.rag.retriever
        context = retriever.context_encoder or retriever.query_encoder
        towers = Towers(nnx.clone(retriever.query_encoder), context)
        trainable = nnx.Param if lsr.train_context else QUERY_TOWER
        return towers, trainable, OptimizerConfig(
            learning_rate=lsr.learning_rate, warmup_steps=lsr.warmup_steps,
            total_steps=lsr.steps, weight_decay=lsr.weight_decay,
            max_grad_norm=lsr.max_grad_norm)

    def install_retriever(self, towers: Towers) -> None:
        c, rag = self.config, self.rag
        rag.retriever.query_encoder = towers.query_tower
        rag.retriever.context_encoder = towers.context_tower
        if c.lsr.train_context:  # the store's embeddings came from the old context tower
            ids = rag.store.node_ids()
            corpus = [{"id": i, "text": n.text, "metadata": n.metadata}
                      for i, n in zip(ids, rag.store.get(ids), strict=True)]
            rag.store = build_store(corpus, rag.retriever, backend=c.retrieval.backend,
                                    progress=c.progress)

    def train_retriever(self) -> TrainState:
        c, lsr, retriever = self.config, self.config.lsr, self.rag.retriever
        data = self.lsr_dataset(self.train_records)
        towers, trainable, opt = self.lsr_model()
        state = place_state(TrainState.create(towers, make_optimizer(opt), trainable,
                                              seed=c.seed), self.mesh)
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
        self.install_retriever(state.model())
        return state

    # --- RALT ------------------------------------------------------------------------------
    def ralt_dataset(self, records: list[dict]):
        c, ralt, rag = self.config, self.config.ralt, self.rag
        return build_ralt_dataset(
            records, rag.retriever, rag.store, rag.generator,
            top_k=ralt.top_k or rag.config.top_k, batch_size=ralt.batch_size,
            template=rag.config.prompt_template, max_length=ralt.max_length,
            max_passage_tokens=rag.max_context_tokens, weighting=ralt.weighting, seed=c.seed,
            progress=c.progress)

    def ralt_model(self) -> tuple[nnx.Module, Any, OptimizerConfig]:
        """The generator to train (with LoRA adapters unless lora_rank=0), filter, optimizer."""
        ralt = self.config.ralt
        model = nnx.clone(self.rag.generator.model)
        if ralt.lora_rank > 0:
            model = apply_lora(model, rank=ralt.lora_rank, alpha=ralt.lora_alpha,
                               target_modules=tuple(ralt.lora_targets), seed=self.config.seed)
        trainable = nnx.LoRAParam if ralt.lora_rank > 0 else nnx.Param
        return model, trainable, OptimizerConfig(
            learning_rate=ralt.learning_rate, warmup_steps=ralt.warmup_steps,
            total_steps=ralt.steps, weight_decay=ralt.weight_decay,
            max_grad_norm=ralt.max_grad_norm)

    def install_generator(self, model: nnx.Module) -> None:
        self.rag.generator.model = merge_lora(model) if has_lora(model) else model

    def train_generator(self) -> TrainState:
        c, ralt = self.config, self.config.ralt
        data = self.ralt_dataset(self.train_records)
        model, trainable, opt = self.ralt_model()
        state = place_state(TrainState.create(model, make_optimizer(opt), trainable,
                                              seed=c.seed), self.mesh)
        step = compile_step(ralt_step, state, data.batch_at(0, 0), self.mesh,
                            micro_batches=ralt.micro_batches)
        trainer = Trainer(state, step, data, self._trainer_config("ralt", ralt.steps),
                          mesh=self.mesh)
        state = trainer.train()
        self.install_generator(state.model())
        return state

    # --- federated ---------------------------------------------------------------------------
    def get_federated_task(self, method: str = "lsr"):
        """The same model, trainable subset and objective as centralized training, with the
        training records partitioned among ``fed.num_clients`` clients."""
        from ..federated.partition import partition_from_config, subset
        from ..federated.task import FederatedTask

        c = self.config
        parts = partition_from_config(self.train_records, c.fed, seed=c.seed)
        if method == "lsr":
            data = self.lsr_dataset(self.train_records)  # LM-score once, then split
            towers, trainable, opt = self.lsr_model()
            return FederatedTask.lsr(towers, trainable, opt, [subset(data, p) for p in parts],
                                     c.fed, tau_retrieval=c.lsr.tau_retrieval,
                                     tau_lm=c.lsr.tau_lm, seed=c.seed)
        data = self.ralt_dataset(self.train_records)
        if c.fed.engine == "spmd":  # clients' batches are stacked: one shape for all
            data.fix_length()
        model, trainable, opt = self.ralt_model()
        return FederatedTask.ralt(model, trainable, opt, [subset(data, p) for p in parts],
                                  c.fed, seed=c.seed)

    def train_federated(self) -> dict[str, Any]:
        """Federated LSR and/or RALT (per ``mode``) on the configured engine."""
        c = self.config
        histories = {}
        for method in (("lsr",) if c.mode == "retriever" else ("ralt",) if
                       c.mode == "generator" else ("lsr", "ralt")):
            task = self.get_federated_task(method)
            ckpt = str(self.output_dir / f"federated_{method}" / "checkpoints")
            result = (task.run_spmd(checkpoint_dir=ckpt) if c.fed.engine == "spmd"
                      else task.run_flower(checkpoint_dir=ckpt))
            model = nnx.merge(task.template.graphdef, result.params, task.template.frozen)
            if method == "lsr":
                self.install_retriever(model)
            else:
                self.install_generator(model)
            histories[method] = result.to_dict()
            self._write_rounds(method, result.history)
        self.results["federated_history"] = histories
        return histories

    def _write_rounds(self, method: str, history: list) -> None:
        """One line per round in federated_<method>/metrics.jsonl, like the trainers' logs."""
        lines = [json.dumps({"split": "round", "round": r.round, "aggregated": r.aggregated,
                             "train_loss": r.train_loss, "eval_loss": r.eval_loss,
                             "clients": len(r.clients), "rejected": len(r.rejected),
                             "failed": len(r.failed), "seconds": r.seconds}) + "\n"
                 for r in history]
        if outputs.is_primary():
            outputs.write_text(self.output_dir / f"federated_{method}" / "metrics.jsonl",
                               "".join(lines))

    def save_system(self):
        """The tuned RAG system, as one folder: output_dir/rag (RAGSystem.from_pretrained).
        Written by the first process only; returns its path (local or gs://)."""
        target = self.output_dir / "rag"
        if outputs.is_primary():
            self.rag.save_pretrained(target)
        return target

    def _trainer_config(self, name: str, steps: int) -> TrainerConfig:
        c = self.config
        return TrainerConfig(total_steps=steps, output_dir=str(self.output_dir / name),
                             eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                             keep_checkpoints=c.keep_checkpoints, progress=c.progress, name=name)

    # --- the one call ------------------------------------------------------------------------
    def train(self, *, evaluate: bool = True) -> dict[str, Any]:
        """Centralized, or federated when ``config.federated`` is set: nothing else changes."""
        mode = self.config.mode
        if evaluate:
            self.evaluate("before")
        if self.config.federated:
            self.train_federated()
            if evaluate:
                self.evaluate("after_federated")
            return self._write_results()
        if mode in ("retriever", "both"):
            self.train_retriever()
            if evaluate:
                self.evaluate("after_lsr", generate=mode == "retriever")
        if mode in ("generator", "both"):
            self.train_generator()
            if evaluate:
                self.evaluate("after_ralt" if mode == "both" else "after")
        return self._write_results()

    def _write_results(self) -> dict[str, Any]:
        if outputs.is_primary():
            outputs.write_text(self.output_dir / "results.json",
                               json.dumps(self.results, indent=2))
        return self.results
