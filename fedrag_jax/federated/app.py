"""The deployable Flower app: ``flwr run . <superlink connection>`` from the repository root.

pyproject.toml names the two components for Flower's app loader::

    [tool.flwr.app.components]
    serverapp = "fedrag_jax.federated.app:server_app"
    clientapp = "fedrag_jax.federated.app:client_app"

Both build their side of the federated task from the run config (defaults in
``[tool.flwr.app.config]``; change them with ``flwr run ... --run-config``):

    config-path   a fedrag-jax YAML; a relative path is looked up in the working directory,
                  then in the app folder (the FAB carries ``configs/``)
    overrides     space-separated ``key=value`` fedrag-jax overrides, e.g.
                  "fed.rounds=5 output_dir=/data/fed-run model.retriever=/models/minilm"
    method        lsr | ralt | both; empty: from ``mode`` (retriever -> lsr, generator ->
                  ralt, both -> both). both: federated LSR, then federated RALT whose
                  messages carry the federated query tower (``RETRIEVER``): each client
                  retrieves its RALT contexts with it, as ``train_federated`` does

    evaluate      true: after every round the clients evaluate the global params on their
                  eval-path files (below); default false

The server builds only the model (a deployed server holds no data), runs the rounds of
``server.serve`` and checkpoints every round to ``<output_dir>/federated_<method>/
checkpoints`` (both: one folder per phase); a second ``flwr run`` with the same output_dir
resumes after the last completed round. Each SuperNode is one client, configured by its node config
(``--node-config "partition-id=0 data-path='/silo/train.jsonl'"``):

    partition-id  the client's index 0..num_clients-1 (required): its name in the history,
                  its rng stream and, without data-path, its share of the configured
                  training records (``fed.partition``), as in simulation
    data-path     the silo's own training records (JSONL {query, response, ...}): the client
                  trains on all of them, no partitioning
    store-path    the silo's own knowledge store (a folder ``KnowledgeStore.persist`` or
                  ``fedrag-jax index build`` wrote: ``<index>/store``); else the configured
                  store (its shard of it with ``fed.client_stores=partition`` and no data-path)
    eval-path     the silo's own eval records (JSONL), used when the run config's evaluate
                  is true

A missing or unreadable file is a :class:`~fedrag_jax.errors.SiloDataError`: that client's
reply is an error, and the round goes on with the others if ``fed.min_clients`` allows.

With ``fed.secagg`` set the server runs SecAgg+ (``secagg.serve_secagg``: Flower's legacy
workflow, FedAvg) and the ClientApp answers its train messages with the legacy client behind
``secaggplus_mod``.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so a client
rebuilds its task (models, store, LSR/RALT dataset) for every round; point
``JAX_COMPILATION_CACHE_DIR`` of the SuperNodes at a folder to keep the compiled steps
between those processes. Under Flower's simulation runtime (one long-lived actor per
worker) the task is built once per process and kept.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from flax import nnx
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..config import Config, load_config
from ..errors import ConfigError, DataError, FedRAGJaxError, SiloDataError
from ..outputs import out_path
from ..paths import is_remote, local_copy
from .client import (
    CONFIG,
    client_id_of_node,
    dp_clipping_mod,
    handle_evaluate,
    handle_identify,
    handle_train,
)
from .payload import to_arrayrecord
from .secagg import check_secagg, make_secagg_client_app, serve_secagg
from .server import ServerRun, ServerTask, serve

APP_DIR = Path(__file__).resolve().parents[2]  # the repository root, or the installed FAB
METHODS = ("lsr", "ralt", "both")
PHASE = "phase"  # train/evaluate config key: the method a both-run's round trains
RETRIEVER = "retriever"  # ArrayRecord of a both-run's RALT messages: the federated query tower
SILO_KEYS = ("data-path", "store-path", "eval-path")  # node-config keys naming a silo's files
# One task per process, run config and silo files (Ray actors keep theirs between messages).
_TASKS: dict[str, Any] = {}


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The fedrag-jax :class:`Config` a Flower run config names."""
    raw = str(run_config.get("config-path", "") or "")
    path = None
    if raw and is_remote(raw):
        path = local_copy(raw, "run config 'config-path'")  # gs:// fetched once
    elif raw:
        path = Path(raw).expanduser()
        if not path.is_absolute() and not path.is_file() and (APP_DIR / path).is_file():
            path = APP_DIR / path  # shipped inside the app (FAB) folder
        if not path.is_file():
            raise ConfigError(f"run config 'config-path' = {raw!r}: no such file in "
                              f"{Path.cwd()} nor in the app folder {APP_DIR}; give an "
                              "absolute path")
    try:
        overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    except ValueError as e:
        raise ConfigError(f"run config 'overrides' cannot be split into key=value items: "
                          f"{e}") from e
    return load_config(path, overrides)


def method_of(config: Config, run_config: dict[str, Any]) -> str:
    """lsr | ralt | both: the run config's method, or the config's mode."""
    method = str(run_config.get("method", "") or "").lower()
    if not method:
        method = {"retriever": "lsr", "generator": "ralt"}.get(config.mode, "both")
    if method not in METHODS:
        raise ConfigError(f"run config method={method!r}; choose one of {METHODS}")
    return method


def phases_of(config: Config, run_config: dict[str, Any]) -> tuple[str, ...]:
    """The methods a run trains, in order: both = federated LSR, then federated RALT whose
    clients retrieve with the federated query tower (as ``train_federated`` does)."""
    method = method_of(config, run_config)
    phases = ("lsr", "ralt") if method == "both" else (method,)
    if len(phases) > 1 and config.fed.secagg:
        raise ConfigError("fed.secagg runs one method per flwr run (SecAgg+ messages cannot "
                          "carry the query tower to the RALT phase): set the run config's "
                          "method to lsr, then ralt")
    return phases


def checkpoint_dir(config: Config, method: str) -> str:
    """Where the server writes its per-round checkpoints (as ``train_federated`` does): an
    absolute local folder, or a gs:// prefix kept as one (never a local ``gs:`` folder)."""
    return str(out_path(config.output_dir) / f"federated_{method}" / "checkpoints")


def evaluate_of(run_config: dict[str, Any]) -> bool:
    value = run_config.get("evaluate", False)
    if isinstance(value, str):
        if value.strip().lower() not in ("", "true", "false", "1", "0"):
            raise ConfigError(f"run config evaluate={value!r}; use true or false")
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _key(run_config: dict[str, Any]) -> str:
    return json.dumps({k: run_config[k] for k in sorted(run_config)}, default=str)


def silo_files(node_config: dict[str, Any]) -> dict[str, Path]:
    """The files a node config names (``SILO_KEYS``), each checked to exist."""
    files = {}
    for key in SILO_KEYS:
        raw = str(node_config.get(key, "") or "").strip()
        if not raw:
            continue
        if is_remote(raw):  # a silo's files on its own bucket: fetched once
            try:
                path = local_copy(raw, f"node config {key}")
            except FedRAGJaxError as e:
                raise SiloDataError(f"node config {key}={raw!r}: {e}") from e
        else:
            path = Path(raw).expanduser()
        if key == "store-path" and not path.is_dir():
            raise SiloDataError(f"node config {key}={raw!r}: no such folder; give the folder "
                                "a store was persisted to (for an index folder: <index>/store)")
        if key != "store-path" and not path.is_file():
            raise SiloDataError(f"node config {key}={raw!r}: no such file; give an absolute "
                                "path to a JSONL file of {query, response} records")
        files[key] = path.resolve()
    return files


def _silo_records(key: str, path: Path) -> list[dict]:
    from ..finetune.batches import load_records

    try:
        return load_records(path)
    except (OSError, DataError) as e:
        raise SiloDataError(f"node config {key}={str(path)!r} cannot be read: {e}") from e


def _silo_store(path: Path) -> Any:
    from ..knowledge_store import load_store

    try:
        return load_store(path)
    except (OSError, FedRAGJaxError) as e:
        raise SiloDataError(f"node config store-path={str(path)!r} cannot be loaded: {e}") from e


def client_task(run_config: dict[str, Any], node_config: dict[str, Any] | None = None, *,
                phase: str | None = None, retriever: Any = None) -> Any:
    """The client's :class:`FederatedTask`: the manager's own (same models, records,
    partition and objective as ``train_federated``). With a silo's own files in the node
    config (``SILO_KEYS``) it holds that client's data only, built from those files."""
    node_config = dict(node_config or {})
    files = silo_files(node_config)
    config = config_from_run_config(run_config)
    method = phase or method_of(config, run_config)
    if method not in ("lsr", "ralt"):
        raise ConfigError(f"a client trains lsr or ralt, got {method!r}")
    tuned = _digest(retriever) if retriever is not None else ""
    if not files:  # every client of this process: one task, as in simulation
        key = _key({**run_config, "phase": method, "retriever": tuned})
        if key not in _TASKS:
            from ..finetune.manager import FinetuneManager

            manager = FinetuneManager.from_config(config)
            if retriever is not None:
                install_query_tower(manager, retriever)
            _TASKS[key] = manager.get_federated_task(method)
        return _TASKS[key]
    cid = client_id_of_node(node_config, config.fed.num_clients)
    key = _key({**run_config, **{f"node:{k}": str(v) for k, v in files.items()},
                "node:partition-id": cid, "phase": method, "retriever": tuned})
    if key not in _TASKS:
        _TASKS[key] = silo_task(config, method, cid, files, retriever=retriever)
    return _TASKS[key]


def _digest(record: Any) -> str:
    """A name for an ArrayRecord's contents (the cache key of the task built from it)."""
    h = hashlib.blake2b(digest_size=16)
    for key in record.keys():
        h.update(key.encode())
        h.update(record[key].data)
    return h.hexdigest()


def install_query_tower(manager: Any, record: Any) -> None:
    """Put the federated LSR result (a both-run's RETRIEVER record) into ``manager``'s RAG
    system, so that its RALT data is retrieved by the tuned query tower."""
    from ..finetune.optimizer import make_optimizer
    from ..finetune.steps import TrainState
    from .payload import from_arrayrecord

    towers, trainable, opt = manager.lsr_model()
    template = TrainState.create(towers, make_optimizer(opt), trainable, manager.config.seed)
    params = from_arrayrecord(record, template.params)
    manager.install_retriever(nnx.merge(template.graphdef, params, template.frozen))


def silo_task(config: Config, method: str, client_id: int, files: dict[str, Path], *,
              retriever: Any = None) -> Any:
    """One silo's task from its own files: records from data-path (all of them) or its
    partition of the configured records, its store from store-path or the configured store
    (its shard with ``fed.client_stores=partition``), eval records from eval-path."""
    from ..federated.partition import partition_from_config
    from ..finetune.manager import FinetuneManager, build_rag_system, load_train_eval_records
    from ..sharding import make_mesh

    c = config.fed
    if "data-path" in files and "store-path" not in files and c.client_stores == "partition":
        raise ConfigError("fed.client_stores=partition cuts the store by every client's "
                          "records, which a silo with its own data-path does not see: give "
                          "the node a store-path, or set fed.client_stores=shared")
    store = _silo_store(files["store-path"]) if "store-path" in files else None
    mesh = make_mesh(vars(config.mesh))
    rag, corpus = build_rag_system(config, mesh, store=store)
    if "data-path" in files:
        records = _silo_records("data-path", files["data-path"])
    else:
        everyone, _ = load_train_eval_records(config, corpus)
        manager = FinetuneManager(rag, everyone, [], config, mesh=mesh)
        if retriever is not None:  # before the shards: the store may be re-encoded
            install_query_tower(manager, retriever)
            retriever = None
        parts = partition_from_config(manager.train_records, c, seed=config.seed)
        if store is None and c.client_stores == "partition":
            rag.store = manager.client_stores(parts, method)[client_id]
        records = [manager.train_records[i] for i in parts[client_id]]
    evals = _silo_records("eval-path", files["eval-path"]) if "eval-path" in files else None
    manager = FinetuneManager(rag, records, [], config, mesh=mesh)
    if retriever is not None:
        install_query_tower(manager, retriever)
    return manager.get_client_task(method, client_id, eval_records=evals)


def server_task(run_config: dict[str, Any], phase: str | None = None) -> ServerTask:
    """The server's side of the task (of ``phase``, default the run's one method): the
    trainable params, built from the models alone."""
    from ..finetune.manager import _path, lsr_model, ralt_model, run_settings
    from ..finetune.optimizer import make_optimizer
    from ..finetune.steps import TrainState
    from .aggregate import StrategyOptions

    config = config_from_run_config(run_config)
    m = config.model
    phase = phase or method_of(config, run_config)
    if phase == "lsr":
        from ..retriever import DualEncoder

        retriever = DualEncoder.from_pretrained(
            _path(m.retriever, "retriever"), m.context_retriever, dtype=m.dtype,
            max_length=m.retriever_max_length)
        model, trainable, opt = lsr_model(config, retriever)
    else:
        from ..models.llama import CausalLM

        generator = CausalLM.from_pretrained(_path(m.generator, "generator"), dtype=m.dtype,
                                             param_dtype=m.param_dtype)
        model, trainable, opt = ralt_model(config, generator)
    template = TrainState.create(model, make_optimizer(opt), trainable, config.seed)
    return ServerTask(template=template, config=config.fed,
                      options=StrategyOptions.from_config(config.fed),
                      has_eval=evaluate_of(run_config), seed=config.seed,
                      settings=run_settings(config, f"federated_{phase}"))


# --- the components Flower loads ------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    phases = phases_of(config, context.run_config)
    if config.fed.secagg:
        check_secagg(config.fed)  # before building the model
    tuned: Any = None  # a both-run's federated query tower, for the RALT phase's clients
    for phase in phases:
        task = server_task(context.run_config, phase)
        run = ServerRun(checkpoint_dir=checkpoint_dir(config, phase),
                        message_config={PHASE: phase},
                        message_arrays={RETRIEVER: tuned} if tuned is not None else {})
        if config.fed.secagg:
            serve_secagg(grid, context, task, run)
        else:
            serve(grid, task, run)
        if phase == "lsr" and len(phases) > 1:
            tuned = to_arrayrecord(run.params)


client_app = ClientApp(mods=[dp_clipping_mod])


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    if config_from_run_config(context.run_config).fed.secagg:
        # SecAgg+ speaks Flower's legacy fit, behind secaggplus_mod (secagg.py)
        return secagg_client(context.run_config, context.node_config)(msg, context)
    return handle_train(phase_task(msg, context), msg, context)


def secagg_client(run_config: dict[str, Any], node_config: dict[str, Any] | None = None
                  ) -> ClientApp:
    """The legacy ClientApp (behind ``secaggplus_mod``) for this node's task (one a task)."""
    task = client_task(run_config, node_config)
    key = f"secagg:{task.token}"
    if key not in _TASKS:
        _TASKS[key] = make_secagg_client_app(task)
    return _TASKS[key]


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(phase_task(msg, context), msg, context)


def phase_task(msg: Message, context: Context) -> Any:
    """The task a message asks for: its phase (a both-run) or the run's method, built with
    the federated query tower when the message carries one."""
    content = msg.content
    config = content.config_records.get(CONFIG, {})
    return client_task(context.run_config, context.node_config,
                       phase=str(config[PHASE]) if PHASE in config else None,
                       retriever=content.array_records.get(RETRIEVER))


@client_app.query("identify")
def _client_identify(msg: Message, context: Context) -> Message:
    # the server asks before round 1: answer from the config alone, without building the task
    config = config_from_run_config(context.run_config)
    return handle_identify(config.fed.num_clients, msg, context)
