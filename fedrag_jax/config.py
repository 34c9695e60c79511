"""Configs as data: dataclasses, loaded from YAML, overridden with ``key=value`` pairs.

Every setting lives in one of the dataclasses below (the single reference of what can be
set; docs/config.md mirrors it). Unknown keys and values of the wrong type are rejected with
the key's dotted name.

    config = load_config("configs/lsr.yaml", ["lsr.steps=100", "mesh.data=2"])
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .types import DEFAULT_PROMPT_TEMPLATE


@dataclass
class ModelConfig:
    retriever: str = "bundled"  # HF/sentence-transformers folder; "bundled" = MiniLM-L6
    context_retriever: str | None = None  # a separate context tower (e.g. DRAGON+)
    generator: str = "bundled"  # HF folder or .gguf; "bundled" = SmolLM2-135M-Instruct
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # master weights and optimizer state
    retriever_max_length: int = 128  # tokens kept per passage / query by the retriever
    use_chat_template: bool | None = None  # None: when the tokenizer has one


@dataclass
class DataConfig:
    corpus: str = "bundled"  # "bundled" Wikipedia summaries or a JSONL of {id, title, text}
    corpus_limit: int | None = None  # index only the first N passages
    index: str | None = None  # a folder from `fedrag-jax index build` (skips encoding)
    train: str = "bundled"  # "bundled": QA pairs made from the corpus; or a JSONL file
    eval: str | None = "bundled"
    num_train: int = 256  # training questions (bundled: made from the corpus)
    num_eval: int = 64  # dev questions (disjoint articles)
    topics: list[str] | None = None  # restrict bundled QA pairs to these corpus topics
    # train: "questions" makes factoid questions of several kinds from the corpus
    # (fedrag_jax/questions, docs/questions.md): train and dev of train_kinds, and a test
    # split of every kind in test_kinds, so each run also reports kinds it never trained on
    train_kinds: list[str] = field(default_factory=lambda: ["title", "nationality", "place"])
    test_kinds: list[str] | None = None  # null: every kind
    num_test: int = 128  # test questions per kind (retrieval metrics on all of them)
    num_test_answered: int = 32  # of which answered per kind (generated-answer metrics)
    # what LSR scores and RALT trains on: the passage sentence that states the answer
    # (keeps the generator reading its context) or the bare answer
    target: Literal["answer", "sentence"] = "sentence"


@dataclass
class RetrievalConfig:
    top_k: int = 4  # passages retrieved per query
    backend: str = "auto"  # auto | scann | exact
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # must contain {context} and {query}
    max_context_tokens: int = 160  # per passage in prompts
    max_new_tokens: int = 32  # generated answer length
    # concat: the top-k passages in one prompt; ensemble (REPLUG): one prompt per passage, the
    # next-token distributions mixed with P_R(d|x) = softmax(s(x,d) / fusion_temperature)
    fusion: Literal["concat", "ensemble"] = "concat"  # how the top-k passages reach the LM
    fusion_temperature: float | None = None  # null: lsr.tau_retrieval (the P_R LSR trains)


@dataclass
class LSRConfig:
    steps: int = 40  # optimizer steps
    batch_size: int = 8  # queries per step (each with top_k passages)
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many
    learning_rate: float = 2e-5  # peak of warmup + cosine decay
    warmup_steps: int = 4
    weight_decay: float = 0.0  # AdamW
    max_grad_norm: float | None = 1.0  # global-norm clipping (null: none)
    tau_retrieval: float = 0.05  # MiniLM cosine scores live in [-1, 1]: sharpen them
    # temperature of Q_LM over log p(answer | prompt(query, passage)); per-token mean
    # log-probs of good and bad passages differ by ~1-2 nats, so tau_lm=1 gives a flat target
    # that LSR matches by *softening* the retriever (dev recall fell); 0.1 keeps it peaked
    tau_lm: float = 0.1
    lm_reduction: Literal["sum", "mean"] = "mean"  # log-prob over answer tokens: sum or mean
    max_length: int = 384  # prompt + answer tokens when the generator scores a passage
    score_batch_size: int = 32  # (query, passage) pairs per generator scoring forward
    pack: bool = True  # LM-score the pairs a few to a packed row, their common prefix once
    train_context: bool = False  # also train the context tower (then re-index)
    # RA-DIT retrieves with the *current* query tower: every N steps each training query's
    # top-k is re-retrieved (only new pairs are LM-scored); with train_context the store is
    # first re-encoded and re-indexed (REPLUG). Fixed candidates only constrain scores among
    # themselves, so without refreshes the query tower can drift until unscored passages
    # outrank them.
    refresh_every: int = 0  # steps between candidate refreshes (0: none; store re-indexed at end)
    # candidates per query (default: retrieval.top_k); more let LSR lift good passages from
    # below the cut into the top k
    top_k: int | None = None  # candidates per query (default: retrieval.top_k)


@dataclass
class RALTConfig:
    steps: int = 40  # optimizer steps
    batch_size: int = 2  # queries per step; each brings top_k instances
    micro_batches: int = 1  # gradient accumulation
    learning_rate: float = 3e-4  # peak of warmup + cosine decay
    warmup_steps: int = 4
    weight_decay: float = 0.0  # AdamW
    max_grad_norm: float | None = 1.0  # global-norm clipping (null: none)
    lora_rank: int = 16  # 0 = train every weight
    lora_alpha: float = 32.0  # LoRA scale is alpha / rank
    lora_targets: list[str] = field(  # projections that get adapters
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    max_length: int = 384  # prompt + response tokens; the passage is truncated to fit
    weighting: Literal["uniform", "retrieval"] = "uniform"  # instance weights: 1 or P_R(d|x)
    top_k: int | None = None  # passages per query in training (default: retrieval.top_k)
    # single: one instance per (query, passage), the layout of retrieval.fusion=ensemble;
    # concat: one per query with its top-k passages in one prompt, as fusion=concat infers
    context: Literal["single", "concat"] = "single"  # an instance per passage, or per query
    # Sequence packing (centralized and federated): a step's instances share a few rows, each
    # attending only within its own segment with RoPE positions from 0, instead of one
    # left-padded row each: the same loss and gradients on fewer padded tokens. The prompt
    # prefix every instance shares (the template's text before the passage) runs once per
    # micro-batch. On by default: scripts/bench_finetune.py (8 x ~240 tokens a step) measured
    # 1.3x the real tokens/s of the padded step without the shared prefix, 57% instead of 43%
    # of the CPU's fp32 matmul peak. Federated clients pack alike (rows, prefix); the SPMD
    # engine gives a step's batches the longest row length among its clients'.
    pack: bool = True  # pack each step's instances into pack_rows rows of one length bucket
    # rows per step: a multiple of micro_batches x data-parallel devices
    pack_rows: int | None = None  # rows of a packed step (null: about 2 instances a row)


@dataclass
class MeshSettings:
    data: int = -1  # data parallel (parameters replicated); -1 = the remaining devices
    fsdp: int = 1  # data parallel with parameters and optimizer state sharded
    tensor: int = 1  # tensor parallel inside matmuls


@dataclass
class FederatedConfig:
    num_clients: int = 3  # silos
    rounds: int = 2  # server rounds
    local_steps: int = 10  # optimizer steps per client per round
    partition: Literal["iid", "topic", "dirichlet"] = "topic"  # how records split
    dirichlet_alpha: float = 0.5  # non-IID strength for "dirichlet" (smaller = more skewed)
    # "partition": each client retrieves from its own shard of the store: the gold passages of
    # its records, its topics' passages, the rest dealt evenly (docs/federated.md)
    client_stores: Literal["shared", "partition"] = "shared"  # "shared" store, or a shard each
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg
    fraction_train: float = 1.0  # share of clients sampled per round
    min_clients: int = 2  # a round needs at least this many answers
    engine: Literal["spmd", "flower"] = "spmd"  # in-process device slices, or Flower + Ray
    proximal_mu: float = 0.0  # FedProx: weight of mu/2 ||w - w_global||^2 in the local loss
    server_learning_rate: float = 0.1  # FedAdam / FedYogi
    server_beta1: float = 0.9  # FedAdam / FedYogi
    server_beta2: float = 0.99  # FedAdam / FedYogi
    server_tau: float = 1e-3  # FedAdam / FedYogi adaptivity
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    devices_per_client: int | None = None  # SPMD engine: devices of each client's slice
    client_num_cpus: int = 1  # Flower engine: Ray resources per virtual client
    client_num_gpus: float = 0.0  # Flower engine: GPUs per client (a GPU each on a GPU host)
    # central DP, client-side clipping (Flower engine and deployment; docs/federated.md)
    dp_clipping_norm: float | None = None  # clip each update (params - global) to this L2 norm
    dp_noise_multiplier: float = 0.0  # server noise std: this * clipping norm / clients per round
    # secure aggregation, SecAgg+ (Flower simulation and deployment, FedAvg; docs/federated.md)
    secagg: bool = False  # the server sees only the masked sum of the weighted updates
    secagg_num_shares: int = 3  # shares of each client's key (> 2; 1: all sampled clients)
    secagg_reconstruction_threshold: int = 2  # shares that rebuild a dropped client's key
    secagg_clipping_range: float = 8.0  # params clipped to [-range, range] before quantizing
    secagg_quantization_range: int = 4194304  # integers per coordinate (2**22)
    secagg_max_weight: float = 1000.0  # largest client weight (num_examples) expected


@dataclass
class Config:
    mode: Literal["retriever", "generator", "both"] = "both"  # LSR, RALT, or LSR then RALT
    federated: bool = False  # the one switch from centralized to federated training
    output_dir: str = "runs/default"  # metrics, TensorBoard, checkpoints, plots
    seed: int = 0  # data order, initialisation, sampling
    eval_every: int = 0  # steps between dev evaluations (0: only at the end)
    # EM / F1 of answers generated by the current RAG system at each evaluation
    eval_generate: bool | None = None  # dev EM/F1 of generated answers: null = RALT only
    eval_generate_max: int = 32  # dev questions answered per evaluation (retrieval: all)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    progress: bool = True  # progress bars
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host TPU/GPU)
    # A NaN / inf loss or gradient in centralized training is never applied. "stop" ends the
    # run there with NonFiniteError (the checkpoints so far are good); "skip" goes on and
    # counts it (metrics: nonfinite, nonfinite_steps). Stop by default: in a fine-tune of
    # tens to thousands of steps a NaN means a bad setting or bad data, which a run that
    # quietly skips on would hide.
    nonfinite: Literal["skip", "stop"] = "stop"  # a NaN / inf step: stop the run, or skip it
    # use a loaded store (data.index, a silo's store-path) even when another retriever built
    # it (its embedding_model_hash differs from the retriever in use)
    allow_foreign_store: bool = False  # accept a store another retriever built
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    lsr: LSRConfig = field(default_factory=LSRConfig)
    ralt: RALTConfig = field(default_factory=RALTConfig)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    fed: FederatedConfig = field(default_factory=FederatedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- validation ----------------------------------------------------------------------------
def _check(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` if it is of that type, else ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; known keys "
                          f"{'under ' + prefix if prefix else 'at the top'}: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _override_value(raw: str) -> Any:
    """A value as YAML reads it (numbers, booleans, null, lists); text that is not valid
    YAML on its own (a prompt like "Q: {query} C: {context}") is taken as the string it is."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lsr.steps=10)")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), _override_value(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> Config:
    """A :class:`Config` from a YAML file (optional) and ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        from .paths import local_copy

        p = Path(local_copy(path, "config file"))  # local, or gs:// fetched once
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
    return _build(Config, _merge(data, parse_overrides(overrides)))


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A :class:`Config` from a nested dict (e.g. a preset) and ``key=value`` overrides."""
    return _build(Config, _merge(data, parse_overrides(overrides)))
