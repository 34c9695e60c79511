"""The FedRAG-style entry point: one object, ``mode`` = retriever | generator | both.

    manager = FinetuneManager.from_config(load_config("configs/quickstart.yaml"))
    results = manager.train()          # centralized: LSR, then RALT (mode "both")

It owns the RAG system, the train/dev records and the mesh; each phase builds its dataset
(``batches.py``), its TrainState and jitted step (``steps.py``) and runs the ``Trainer``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from .. import assets, outputs
from ..config import Config
from ..errors import ConfigError
from ..evals.benchmarker import Benchmarker
from ..evals.benchmarks import BenchmarkExample
from ..evals.kinds import evaluate_by_kind, kinds_report, summarize
from ..evals.metrics import exact_match, mrr, recall_at_k, token_f1
from ..generator import Generator
from ..indexing import build_store, check_store_fingerprint, load_corpus, reencode_store
from ..knowledge_store import KnowledgeStore, load_store
from ..models.lora import apply_lora, has_lora, merge_lora
from ..paths import local_copy
from ..qa_data import make_qa_pairs
from ..questions import KINDS, QuestionSplits, make_question_splits
from ..questions.targets import with_targets
from ..rag import RAGSystem
from ..retriever import DualEncoder
from ..sharding import host_copy, make_mesh
from ..types import RAGConfig
from .batches import build_lsr_dataset, build_ralt_dataset, load_records
from .optimizer import OptimizerConfig, make_optimizer
from .reindex import IndexRefresher
from .steps import (
    QUERY_TOWER,
    Towers,
    TrainState,
    compile_step,
    lsr_step,
    place_state,
    ralt_objective,
    ralt_step,
)
from .trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)


def _path(value: str, which: str) -> str:
    if value != "bundled":
        return str(local_copy(value, f"model.{which}"))  # local, or gs:// fetched once
    return str(assets.retriever_path() if which == "retriever" else assets.generator_path())


def build_rag_system(config: Config, mesh=None,
                     store: KnowledgeStore | None = None) -> tuple[RAGSystem, list[dict]]:
    """The RAG system a config describes, and the corpus records it indexed (``store``: use
    this store instead of the configured one, e.g. a silo's own)."""
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
    if store is not None or config.data.index:  # made elsewhere: by this retriever?
        if store is None:
            store = load_store(local_copy(config.data.index, "data.index") / "store")
        check_store_fingerprint(store, retriever, allow_foreign=config.allow_foreign_store,
                                where=config.data.index or "the given store")
    else:
        store = build_store(corpus, retriever, backend=r.backend, progress=config.progress)
    tau = config.lsr.tau_retrieval if r.fusion_temperature is None else r.fusion_temperature
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=r.top_k, prompt_template=r.prompt_template, fusion=r.fusion,
                              fusion_temperature=tau),
                    max_new_tokens=r.max_new_tokens, max_context_tokens=r.max_context_tokens)
    return rag, corpus


def gold_answers(record: dict) -> list[str]:
    """The answers a generated answer is scored against: ``answers`` if the record has
    them, else its ``response`` (every evaluation uses this)."""
    return [str(a) for a in (record.get("answers") or [record["response"]])]


def run_settings(config: Config, name: str) -> dict[str, Any]:
    """What decides a phase's trajectory (``name``: lsr, ralt, federated_lsr or
    federated_ralt): resuming its checkpoints under other settings is refused
    (:class:`~fedrag_jax.errors.ResumeMismatchError`), centralized and federated alike.

    Left out: how often a run evaluates, checkpoints or logs, progress bars, and other
    layouts of the same math (pack, pack_rows, score_batch_size). ``steps`` is in: the
    cosine schedule spans it, so resuming with another value would re-stretch the schedule
    mid-run (start a new run to train longer). A federated phase compares the ``fed``
    settings too (its schedule spans rounds x local_steps), but not ``steps`` (unused there)
    nor the engine and its resources (both engines compute the same rounds).
    """
    c = config.to_dict()
    federated = name.startswith("federated_")
    method = "lsr" if name.removeprefix("federated_").startswith("lsr") else "ralt"
    free = {"pack", "pack_rows", "score_batch_size"} | ({"steps"} if federated else set())
    section = {k: v for k, v in c[method].items() if k not in free}
    if method == "ralt" and c["ralt"]["weighting"] == "retrieval":
        section["tau_retrieval"] = c["lsr"]["tau_retrieval"]  # P_R(d|x)'s temperature
    settings = {"seed": c["seed"], "model": c["model"], "data": c["data"],
                "retrieval": c["retrieval"], method: section}
    if federated:
        machine = {"engine", "devices_per_client", "client_num_cpus", "client_num_gpus"}
        settings["fed"] = {k: v for k, v in c["fed"].items() if k not in machine}
    return settings


def load_question_splits(config: Config, corpus: list[dict]) -> QuestionSplits:
    """``data.train: questions``: train / dev questions of ``data.train_kinds`` (their
    ``response`` the ``data.target``), and a test split of every kind in ``data.test_kinds``
    (``num_test`` each; ``response`` the bare answer), from disjoint articles. Test questions
    depend only on the corpus, the kinds, the seed and ``num_test``, never on the train size."""
    d = config.data
    train_kinds = list(dict.fromkeys(d.train_kinds))
    test_kinds = list(dict.fromkeys(d.test_kinds or KINDS))
    if not train_kinds:
        raise ConfigError("data.train_kinds is empty: name at least one question kind to train on")
    kinds = list(dict.fromkeys(train_kinds + test_kinds))
    per_train = -(-d.num_train // len(train_kinds))
    per_dev = -(-d.num_eval // len(train_kinds))
    splits = make_question_splits(
        corpus, kinds=kinds, seed=config.seed, allow_fewer=True,
        num_train={k: per_train if k in train_kinds else 0 for k in kinds},
        num_dev={k: per_dev if k in train_kinds else 0 for k in kinds},
        num_test={k: d.num_test if k in test_kinds else 0 for k in kinds})
    splits.train = with_targets(splits.train, d.target)[: d.num_train]
    splits.dev = with_targets(splits.dev, d.target)[: d.num_eval]
    for i, q in enumerate(splits.test):
        q["id"] = i
    return splits


def load_train_eval_records(config: Config, corpus: list[dict]) -> tuple[list[dict], list[dict]]:
    d = config.data
    if d.train == "questions":
        splits = load_question_splits(config, corpus)
        return splits.train, splits.dev
    if d.train == "bundled":
        train, dev = make_qa_pairs(corpus, d.num_train, d.num_eval, seed=config.seed,
                                   topics=d.topics)
        return train, (dev if d.eval == "bundled" else load_records(d.eval) if d.eval else [])
    train = load_records(d.train)[: d.num_train]
    dev = load_records(d.eval)[: d.num_eval] if d.eval and d.eval != "bundled" else []
    return train, dev


def lsr_model(config: Config, retriever: DualEncoder) -> tuple[Towers, Any, OptimizerConfig]:
    """The towers to train, the trainable filter and the optimizer settings.

    RA-DIT trains the query tower only: a shared tower is untied (copied) so that the
    store's passage embeddings, made by the context tower, stay valid.
    """
    lsr = config.lsr
    context = retriever.context_encoder or retriever.query_encoder
    towers = Towers(nnx.clone(retriever.query_encoder), context)
    trainable = nnx.Param if lsr.train_context else QUERY_TOWER
    return towers, trainable, OptimizerConfig(
        learning_rate=lsr.learning_rate, warmup_steps=lsr.warmup_steps,
        total_steps=lsr.steps, weight_decay=lsr.weight_decay,
        max_grad_norm=lsr.max_grad_norm)


def ralt_model(config: Config, generator: nnx.Module) -> tuple[nnx.Module, Any, OptimizerConfig]:
    """The generator to train (with LoRA adapters unless lora_rank=0), filter, optimizer."""
    ralt = config.ralt
    model = nnx.clone(generator)
    if ralt.lora_rank > 0:
        model = apply_lora(model, rank=ralt.lora_rank, alpha=ralt.lora_alpha,
                           target_modules=tuple(ralt.lora_targets), seed=config.seed)
    trainable = nnx.LoRAParam if ralt.lora_rank > 0 else nnx.Param
    return model, trainable, OptimizerConfig(
        learning_rate=ralt.learning_rate, warmup_steps=ralt.warmup_steps,
        total_steps=ralt.steps, weight_decay=ralt.weight_decay,
        max_grad_norm=ralt.max_grad_norm)


class FinetuneManager:
    def __init__(self, rag: RAGSystem, train_records: list[dict], eval_records: list[dict],
                 config: Config, *, mesh=None, dataset_cache: dict | None = None,
                 test_records: list[dict] | None = None):
        self.rag = rag
        self.train_records = load_records(train_records)
        self.eval_records = list(eval_records)
        # questions of several kinds (with "kind"): each evaluation scores them per kind
        self.test_records = list(test_records or [])
        self.kind_rows: dict[str, list[dict]] = {}
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(vars(config.mesh))
        self.output_dir = outputs.out_path(config.output_dir)  # local or gs://
        self.results: dict[str, Any] = {}
        # LSR datasets are costly (every (query, passage) pair is LM-scored) and depend only
        # on the records and the models that built them: managers may share this cache.
        self.dataset_cache = {} if dataset_cache is None else dataset_cache
        for key in ("eval_generate_max",):
            if getattr(config, key) < 1:
                raise ConfigError(f"{key}={getattr(config, key)}: answer at least 1 question")
        if config.lsr.refresh_every < 0:
            raise ConfigError(f"lsr.refresh_every={config.lsr.refresh_every}: use 0 (only "
                              "after the last step) or a positive number of steps")

    @classmethod
    def from_config(cls, config: Config) -> FinetuneManager:
        mesh = make_mesh(vars(config.mesh))
        rag, corpus = build_rag_system(config, mesh)
        if config.data.train == "questions":
            splits = load_question_splits(config, corpus)
            return cls(rag, splits.train, splits.dev, config, mesh=mesh,
                       test_records=splits.test)
        train, dev = load_train_eval_records(config, corpus)
        return cls(rag, train, dev, config, mesh=mesh)

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(self, name: str, records: list[dict] | None = None, *,
                 generate: bool = True) -> dict[str, float]:
        """Dev recall@k / MRR of the gold passage over every dev record that names one, and
        EM / F1 of generated answers over the first ``eval_generate_max`` of them.

        Retrieval is cheap (one query encoding each), generation is not: scoring retrieval on
        many more questions than are answered keeps its figure from moving by whole questions.
        """
        records = self.eval_records if records is None else records
        if not records:
            return {}
        start = time.perf_counter()
        k = self.rag.config.top_k
        metrics: dict[str, float] = {}
        answered = records[: self.config.eval_generate_max] if generate else []
        if answered:
            examples = [BenchmarkExample(example_id=str(i), query=r["query"],
                                         answers=gold_answers(r),
                                         gold_passage_id=r.get("gold_id"))
                        for i, r in enumerate(answered)]
            primary = outputs.is_primary()  # every host generates; one writes
            result = Benchmarker(self.rag, examples, batch_size=16, recall_k=k,
                                 out_dir=self.output_dir / "eval" / name if primary else None,
                                 progress=self.config.progress and primary).run()
            metrics.update({key: float(v) for key, v in result.metrics.items()})
            metrics["num_answered"] = len(answered)
        gold = [r for r in records if r.get("gold_id") is not None]
        if gold:
            metrics.update(self.retrieval_metrics([r["query"] for r in gold],
                                                  [r["gold_id"] for r in gold]))
            metrics["num_retrieval"] = len(gold)
        metrics["seconds"] = time.perf_counter() - start
        self.results[name] = metrics
        log.info("%s: %s", name, metrics)
        return metrics

    def evaluate_kinds(self, name: str, *, fusion: str | None = None,
                       answered_per_kind: int | None = None) -> dict[str, Any]:
        """The test questions per kind (:mod:`fedrag_jax.evals.kinds`): retrieval metrics on
        all, answer metrics on the first ``data.num_test_answered`` of each kind. Rows go to
        ``eval/<name>/kinds.jsonl``; the per-kind means to ``results["kinds"][name]``."""
        if not self.test_records:
            return {}
        rows = evaluate_by_kind(self.rag, self.test_records,
                                answered_per_kind=(self.config.data.num_test_answered
                                                   if answered_per_kind is None
                                                   else answered_per_kind),
                                fusion=fusion, progress=self.config.progress, desc=name)
        self.kind_rows[name] = rows
        summary = summarize(rows, self.test_kinds())
        self.results.setdefault("kinds", {})[name] = summary
        if outputs.is_primary():
            outputs.write_text(self.output_dir / "eval" / name / "kinds.jsonl", "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log.info("%s per kind: %s", name, {k: round(v.get("contained", float("nan")), 3)
                                           for k, v in summary.items()})
        return summary

    def test_kinds(self) -> list[str]:
        present = {r["kind"] for r in self.test_records}
        return [k for k in KINDS if k in present] + sorted(present - set(KINDS))

    def write_kinds_report(self, reference: str, names: list[str] | None = None) -> str:
        """Paired comparisons of each evaluated system with ``reference``, per kind, written
        to ``kinds_report.md`` / ``kinds_report.json``; returns the Markdown."""
        names = [n for n in (names or self.kind_rows) if n != reference]
        text, data = kinds_report(self.kind_rows, reference, names, kinds=self.test_kinds(),
                                  train_kinds=self.config.data.train_kinds,
                                  seed=self.config.seed)
        self.results["kinds_comparison"] = data
        if outputs.is_primary():
            outputs.write_text(self.output_dir / "kinds_report.md", text)
            outputs.write_text(self.output_dir / "kinds_report.json", json.dumps(data, indent=2))
        return text

    def retrieval_metrics(self, queries: list[str], gold_ids: list[str],
                          retriever: DualEncoder | None = None) -> dict[str, float]:
        """recall@k and MRR@k of the gold passages, k = the RAG system's top_k."""
        retriever = retriever or self.rag.retriever
        k = self.rag.config.top_k
        _, ids = self.rag.store.search(retriever.encode_query(queries), k)
        retrieved = [[str(i) for i in row] for row in ids]
        return {"recall_at_k": recall_at_k(retrieved, gold_ids, k),
                "mrr": mrr(retrieved, gold_ids, k)}

    def recall(self, queries: list[str], gold_ids: list[str],
               retriever: DualEncoder | None = None) -> float:
        retriever = retriever or self.rag.retriever
        _, ids = self.rag.store.search(retriever.encode_query(queries), self.rag.config.top_k)
        return float(np.mean([g in set(map(str, row)) for g, row in zip(gold_ids, ids,
                                                                         strict=True)]))

    def generation_metrics(self, retriever: DualEncoder, generator: Generator,
                           records: list[dict], out_file: Path | None = None,
                           chunk: int = 8) -> dict[str, float]:
        """SQuAD EM / token F1 of the answers that ``retriever`` + ``generator`` (over the
        current store) generate for ``records`` (gold: ``answers`` or ``response``).

        Queries go in fixed chunks (the last one padded by repetition) so that repeated
        evaluations reuse one compiled decode per prompt-length bucket. ``out_file``: the
        answers as JSONL, one {query, answer, golds, exact_match, f1} per record.
        """
        rag = RAGSystem(retriever, self.rag.store, generator, self.rag.config,
                        max_new_tokens=self.rag.max_new_tokens,
                        max_context_tokens=self.rag.max_context_tokens)
        queries = [r["query"] for r in records]
        answers: list[str] = []
        for start in range(0, len(queries), chunk):
            part = queries[start:start + chunk]
            padded = part + [part[-1]] * (chunk - len(part))
            answers += [r.answer for r in rag.batch_query(padded)][: len(part)]
        rows = []
        for r, answer in zip(records, answers, strict=True):
            golds = gold_answers(r)
            rows.append({"query": r["query"], "answer": answer, "golds": golds,
                         "exact_match": exact_match(answer, golds), "f1": token_f1(answer, golds)})
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {"exact_match": float(np.mean([row["exact_match"] for row in rows])),
                "f1": float(np.mean([row["f1"] for row in rows]))}

    def _generate_in_eval(self, phase: str) -> bool:
        flag = self.config.eval_generate
        return phase == "ralt" if flag is None else flag

    def _retriever_of(self, towers: Towers) -> DualEncoder:
        """A DualEncoder over (training) towers, with the RAG retriever's settings."""
        r = self.rag.retriever
        return DualEncoder(towers.query_tower, r.tokenizer, towers.context_tower,
                           max_length=r.max_length, batch_size=r.batch_size,
                           length_buckets=r.length_buckets, mesh=self.mesh,
                           query_prefix=r.query_prefix, context_prefix=r.context_prefix,
                           name=r.name)

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

    def _build_lsr_dataset(self, records: list[dict], retriever: DualEncoder | None = None,
                           lm_scores: dict | None = None, store: KnowledgeStore | None = None):
        c, lsr, rag = self.config, self.config.lsr, self.rag
        return build_lsr_dataset(
            records, retriever or rag.retriever, store or rag.store, rag.generator,
            top_k=lsr.top_k or rag.config.top_k, batch_size=lsr.batch_size,
            template=rag.config.prompt_template,
            max_length=lsr.max_length, max_passage_tokens=rag.max_context_tokens,
            score_batch_size=lsr.score_batch_size, reduction=lsr.lm_reduction, seed=c.seed,
            progress=c.progress, passage_tokens=lsr.train_context, pack=lsr.pack,
            lm_scores=lm_scores)

    def lsr_model(self) -> tuple[Towers, Any, OptimizerConfig]:
        return lsr_model(self.config, self.rag.retriever)

    def install_retriever(self, towers: Towers, *, reindex: bool = True) -> None:
        """Put trained towers into the RAG system; with ``lsr.train_context`` the store is
        re-encoded by the new context tower (unless ``reindex=False``: already done)."""
        rag = self.rag
        rag.retriever.query_encoder = towers.query_tower
        rag.retriever.context_encoder = towers.context_tower
        if reindex and self.config.lsr.train_context:
            self.reindex_store(towers)

    def reindex_store(self, towers: Towers) -> None:
        """Re-encode the store's passages with ``towers.context_tower``, rebuild its index."""
        c = self.config
        self.rag.store = reencode_store(self.rag.store, self._retriever_of(towers),
                                        backend=c.retrieval.backend, progress=c.progress)

    def train_retriever(self) -> TrainState:
        c, lsr = self.config, self.config.lsr
        data = self.lsr_dataset(self.train_records)
        towers, trainable, opt = self.lsr_model()
        state = place_state(TrainState.create(towers, make_optimizer(opt), trainable,
                                              seed=c.seed), self.mesh)
        step = compile_step(lsr_step, state, data.batch_at(0, 0), self.mesh,
                            tau_retrieval=lsr.tau_retrieval, tau_lm=lsr.tau_lm,
                            micro_batches=lsr.micro_batches)
        refresher = None
        if lsr.train_context or lsr.refresh_every:  # candidates (and store) follow the towers
            lm_scores = {(r["query"], r["response"], str(p)): float(s) for r, ids, lps in zip(
                self.train_records, data.passage_ids, data.arrays["lm_logprobs"], strict=True)
                for p, s in zip(ids, lps, strict=True)}
            refresher = IndexRefresher(
                data, every=lsr.refresh_every, total_steps=lsr.steps,
                reindex=self.reindex_store if lsr.train_context else None,
                rebuild=lambda towers: self._build_lsr_dataset(
                    self.train_records, self._retriever_of(towers), lm_scores))
        trainer = Trainer(state, step, refresher or data, self._trainer_config("lsr", lsr.steps),
                          eval_fn=self._eval_fn("lsr"), mesh=self.mesh,
                          hooks=(refresher,) if refresher else ())
        if refresher is not None:
            refresher.trainer = trainer
        state = trainer.train()
        # the refresher re-indexed from the final towers already
        self.install_retriever(state.model(), reindex=refresher is None)
        return state

    def _eval_fn(self, phase: str):
        """The periodic dev evaluation of a phase: RALT dev loss, recall@k of the gold passage
        (when known), EM / F1 of generated answers (``eval_generate``); None if nothing to
        evaluate. Answers are written to ``<phase>/eval_answers/step_<N>.jsonl``."""
        dev = self.eval_records
        gold = [r for r in dev if r.get("gold_id")]
        generate = self._generate_in_eval(phase) and bool(dev)
        # bounded like generation: every (question, passage) instance is a generator forward
        loss_fn = (self._ralt_dev_loss(dev[: self.config.eval_generate_max])
                   if phase == "ralt" and dev else None)
        if not (gold or generate or loss_fn):
            return None
        answered = dev[: self.config.eval_generate_max]

        def eval_fn(state: TrainState) -> dict[str, float]:
            model = state.model()
            if phase == "lsr":
                retriever, generator = self._retriever_of(model), self.rag.generator
            else:
                retriever, generator = self.rag.retriever, self._generator_of(model)
            out: dict[str, float] = {}
            if loss_fn is not None:
                out["eval_loss"] = loss_fn(state)
            if gold:
                out["recall_at_k"] = self.recall([r["query"] for r in gold],
                                                  [r["gold_id"] for r in gold], retriever)
            if generate:
                path = (self.output_dir / phase / "eval_answers" /
                        f"step_{int(jax.device_get(state.step))}.jsonl")
                out.update(self.generation_metrics(retriever, generator, answered, path))
            return out

        return eval_fn

    def _generator_of(self, model: nnx.Module) -> Generator:
        g = self.rag.generator
        return Generator(model, g.tokenizer, use_chat_template=g.use_chat_template,
                         length_buckets=g.length_buckets)

    def _ralt_dev_loss(self, records: list[dict]):
        """state -> mean RALT loss over the dev records (uniform weights, fixed order)."""
        c, ralt, rag = self.config, self.config.ralt, self.rag
        data = build_ralt_dataset(
            records, rag.retriever, rag.store, rag.generator,
            top_k=ralt.top_k or rag.config.top_k, batch_size=ralt.batch_size,
            template=rag.config.prompt_template, max_length=ralt.max_length,
            max_passage_tokens=rag.max_context_tokens, seed=c.seed, progress=False,
            context=ralt.context, context_separator=rag.config.context_separator)
        data.shuffle = False
        batches = [data.batch_at(0, i) for i in range(len(data))]

        @functools.partial(jax.jit, static_argnames="graphdef")
        def batch_loss(params, frozen, graphdef, batch):
            total, aux = ralt_objective(nnx.merge(graphdef, params, frozen), batch)
            return total, aux["weight"]

        def loss(state: TrainState) -> float:
            # the mean over every dev target token, as training averages (padding weighs 0)
            total = weight = 0.0
            for batch in batches:
                s, w = batch_loss(state.params, state.frozen, state.graphdef, batch)
                total, weight = total + float(s), weight + float(w)
            return total / weight if weight > 0 else float("nan")

        return loss

    # --- RALT ------------------------------------------------------------------------------
    def ralt_dataset(self, records: list[dict], store: KnowledgeStore | None = None):
        c, ralt, rag = self.config, self.config.ralt, self.rag
        return build_ralt_dataset(
            records, rag.retriever, store or rag.store, rag.generator,
            top_k=ralt.top_k or rag.config.top_k, batch_size=ralt.batch_size,
            template=rag.config.prompt_template, max_length=ralt.max_length,
            max_passage_tokens=rag.max_context_tokens, weighting=ralt.weighting,
            tau_retrieval=c.lsr.tau_retrieval, seed=c.seed, progress=c.progress,
            context=ralt.context, context_separator=rag.config.context_separator)

    def ralt_model(self) -> tuple[nnx.Module, Any, OptimizerConfig]:
        return ralt_model(self.config, self.rag.generator.model)

    def pack_rows(self, instances_per_step: int) -> int:
        """Rows of a packed RALT step: ``ralt.pack_rows``, or about two instances a row; a
        multiple of micro_batches x the data-parallel devices (every micro-batch's rows are
        split among them)."""
        ralt = self.config.ralt
        unit = ralt.micro_batches * self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if ralt.pack_rows is not None:
            if ralt.pack_rows < 1 or ralt.pack_rows % unit:
                raise ConfigError(f"ralt.pack_rows={ralt.pack_rows} must be a positive "
                                  f"multiple of micro_batches x data-parallel devices = {unit}")
            return ralt.pack_rows
        half = -(-instances_per_step // 2)
        return -(-half // unit) * unit  # rounded up to a multiple of unit

    def install_generator(self, model: nnx.Module) -> None:
        self.rag.generator.model = merge_lora(model) if has_lora(model) else model

    def ralt_train_data(self):
        """The RALT training batches: packed when ``ralt.pack`` (centralized training)."""
        ralt = self.config.ralt
        data = self.ralt_dataset(self.train_records)
        if ralt.pack:
            data.pack(self.pack_rows(data.batch_size * len(data.prompts[0])),
                      ralt.micro_batches)
        return data

    def train_generator(self) -> TrainState:
        c, ralt = self.config, self.config.ralt
        data = self.ralt_train_data()
        model, trainable, opt = self.ralt_model()
        state = place_state(TrainState.create(model, make_optimizer(opt), trainable,
                                              seed=c.seed), self.mesh)
        step = compile_step(ralt_step, state, data.batch_at(0, 0), self.mesh,
                            micro_batches=ralt.micro_batches)
        trainer = Trainer(state, step, data, self._trainer_config("ralt", ralt.steps),
                          eval_fn=self._eval_fn("ralt"), mesh=self.mesh)
        state = trainer.train()
        self.install_generator(state.model())
        return state

    # --- federated ---------------------------------------------------------------------------
    def get_federated_task(self, method: str = "lsr"):
        """The same model, trainable subset and objective as centralized training, with the
        training records partitioned among ``fed.num_clients`` clients; each retrieves from
        the shared store or (``fed.client_stores=partition``) from its own shard of it."""
        from ..federated.partition import partition_from_config, subset

        c = self.config
        parts = partition_from_config(self.train_records, c.fed, seed=c.seed)
        stores = self.client_stores(parts, method)
        if stores is None:
            if method == "lsr":
                full = self.lsr_dataset(self.train_records)  # LM-score once, then split
            else:
                full = self.ralt_dataset(self.train_records)
                if c.ralt.pack:  # the clients' subsets pack alike (rows, shared prefix)
                    self.pack_federated([full])
                elif c.fed.engine == "spmd":  # clients' batches are stacked: one shape
                    full.fix_length()
            clients = [subset(full, p) for p in parts]
        else:  # every client retrieves from its own shard
            clients = self._client_datasets(
                method, [[self.train_records[i] for i in p] for p in parts], stores)
        return self._federated_task(method, clients)

    def get_client_task(self, method: str, client_id: int, *,
                        eval_records: list[dict] | None = None):
        """One silo's task (deployment with the silo's own files): client ``client_id``
        trains on all of this manager's training records, retrieved from its store, and
        evaluates on ``eval_records``; the other clients' data live elsewhere (None)."""
        n = self.config.fed.num_clients
        if not 0 <= client_id < n:
            raise ConfigError(f"client id {client_id} is outside 0..{n - 1}")
        (data,) = self._client_datasets(method, [self.train_records], [self.rag.store])
        clients: list = [None] * n
        clients[client_id] = data
        evals = None
        if eval_records:
            (evals_c,) = self._client_datasets(method, [load_records(eval_records)],
                                               [self.rag.store])
            evals_c.shuffle = False
            evals = [None] * n
            evals[client_id] = evals_c
        return self._federated_task(method, clients, evals)

    def client_stores(self, parts: list[np.ndarray], method: str = "lsr"):
        """Each client's shard of the store (``fed.client_stores=partition``), or None when
        every client retrieves from the shared store."""
        c = self.config
        if c.fed.client_stores == "shared":
            return None
        if c.fed.client_stores != "partition":
            raise ConfigError(f"fed.client_stores={c.fed.client_stores!r}; choose shared or "
                              "partition")
        from ..federated.shards import client_stores

        phase = c.lsr if method == "lsr" else c.ralt
        return client_stores(self.rag.store, self.train_records, parts, c.fed, seed=c.seed,
                             min_size=phase.top_k or self.rag.config.top_k)

    def _client_datasets(self, method: str, records: list[list[dict]], stores: list) -> list:
        """A dataset per client from its records and store, all in one batch shape (the SPMD
        engine stacks them; the shared path gets this from splitting one dataset)."""
        if method == "lsr":
            datasets = [self._build_lsr_dataset(r, store=s)
                        for r, s in zip(records, stores, strict=True)]
            width = max(d.arrays["query_ids"].shape[1] for d in datasets)
            pad = self.rag.retriever.tokenizer.pad_token_id or 0
            for d in datasets:
                extra = width - d.arrays["query_ids"].shape[1]
                if extra:  # masked columns: the query tower ignores them
                    d.arrays["query_ids"] = np.pad(d.arrays["query_ids"], ((0, 0), (0, extra)),
                                                   constant_values=pad)
                    d.arrays["query_mask"] = np.pad(d.arrays["query_mask"],
                                                    ((0, 0), (0, extra)))
            return datasets
        datasets = [self.ralt_dataset(r, store=s) for r, s in zip(records, stores, strict=True)]
        target = max(d.target_length for d in datasets)
        for d in datasets:
            d.target_length = target
        if self.config.ralt.pack:  # packed batches line up per step (local.client_batches)
            return self.pack_federated(datasets)
        if self.config.fed.engine == "spmd":
            buckets = max(d.fix_length().buckets for d in datasets)
            for d in datasets:
                d.buckets = buckets
        return datasets

    def pack_federated(self, datasets: list) -> list:
        """Pack the clients' RALT datasets alike: the same rows per step (each of the
        ``ralt.micro_batches`` micro-batches in rows of its own, as centralized) and one
        shared prompt prefix, the shortest of theirs."""
        instances = datasets[0].batch_size * len(datasets[0].prompts[0])
        rows = self.pack_rows(instances)
        prefix = min(d.shared_prefix_length() for d in datasets)
        for d in datasets:
            d.pack(rows, self.config.ralt.micro_batches, prefix_length=prefix)
        return datasets

    def _federated_task(self, method: str, clients: list, evals: list | None = None):
        from ..federated.task import FederatedTask

        c = self.config
        # the task stretches the optimizer's schedule over rounds x local_steps
        common = dict(eval_data=evals, seed=c.seed,
                      settings=run_settings(c, f"federated_{method}"))
        if method == "lsr":
            towers, trainable, opt = self.lsr_model()
            return FederatedTask.lsr(towers, trainable, opt, clients, c.fed,
                                     tau_retrieval=c.lsr.tau_retrieval, tau_lm=c.lsr.tau_lm,
                                     micro_batches=c.lsr.micro_batches, **common)
        model, trainable, opt = self.ralt_model()
        return FederatedTask.ralt(model, trainable, opt, clients, c.fed,
                                  micro_batches=c.ralt.micro_batches, **common)

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
                             "failed": len(r.failed), "seconds": r.seconds,
                             "update_norm": r.update_norm,
                             # the rate of each local step, per client
                             "learning_rates": {str(c.client_id): c.learning_rates
                                                for c in r.clients}}) + "\n"
                 for r in history]
        if outputs.is_primary():
            outputs.write_text(self.output_dir / f"federated_{method}" / "metrics.jsonl",
                               "".join(lines))

    def save_system(self):
        """The tuned RAG system, as one folder: output_dir/rag (RAGSystem.from_pretrained).
        Written by the first process only; returns its path (local or gs://)."""
        target = self.output_dir / "rag"
        rag = self.rag
        if jax.process_count() > 1:  # parameters may span hosts: every process gathers
            rag = copy.copy(rag)
            rag.retriever = copy.copy(rag.retriever)
            rag.retriever.query_encoder = host_copy(rag.retriever.query_encoder)
            if rag.retriever.context_encoder is not None:
                rag.retriever.context_encoder = host_copy(rag.retriever.context_encoder)
            rag.generator = copy.copy(rag.generator)
            rag.generator.model = host_copy(rag.generator.model)
        if outputs.is_primary():
            rag.save_pretrained(target)
        return target

    def _trainer_config(self, name: str, steps: int) -> TrainerConfig:
        c = self.config
        return TrainerConfig(total_steps=steps, output_dir=str(self.output_dir / name),
                             eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                             keep_checkpoints=c.keep_checkpoints, progress=c.progress, name=name,
                             settings=self.run_settings(name), nonfinite=c.nonfinite)

    def run_settings(self, name: str) -> dict[str, Any]:
        """:func:`run_settings` of this manager's config."""
        return run_settings(self.config, name)

    # --- the one call ------------------------------------------------------------------------
    def train(self, *, evaluate: bool = True) -> dict[str, Any]:
        """Centralized, or federated when ``config.federated`` is set: nothing else changes."""
        mode = self.config.mode
        if evaluate:
            self.evaluate("before")
            self.evaluate_kinds("before")
        if self.config.federated:
            self.train_federated()
            if evaluate:
                self.evaluate("after_federated")
                self._report_kinds("after_federated")
            return self._write_results()
        if mode in ("retriever", "both"):
            self.train_retriever()
            if evaluate:
                self.evaluate("after_lsr", generate=mode == "retriever")
        if mode in ("generator", "both"):
            self.train_generator()
            if evaluate:
                self.evaluate("after_ralt" if mode == "both" else "after")
        if evaluate:
            self._report_kinds("after")
        return self._write_results()

    def _report_kinds(self, name: str) -> None:
        if self.test_records:
            self.evaluate_kinds(name)
            print(self.write_kinds_report("before", [name]), flush=True)

    def _write_results(self) -> dict[str, Any]:
        if outputs.is_primary():
            outputs.write_text(self.output_dir / "results.json",
                               json.dumps(self.results, indent=2))
        return self.results
