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
    method        lsr | ralt; empty: from ``mode`` (retriever -> lsr, generator -> ralt)

The server builds only the model (a deployed server holds no data), runs the rounds of
``server.serve`` and checkpoints every round to ``<output_dir>/federated_<method>/
checkpoints``; a second ``flwr run`` with the same output_dir resumes after the last
completed round. Each SuperNode is one client: ``--node-config "partition-id=<i>"`` picks
its share of the configured training records (``fed.partition``), as in simulation.

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

import json
import shlex
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..config import Config, load_config
from ..errors import ConfigError
from .client import dp_clipping_mod, handle_evaluate, handle_identify, handle_train
from .secagg import check_secagg, make_secagg_client_app, serve_secagg
from .server import ServerRun, ServerTask, serve

APP_DIR = Path(__file__).resolve().parents[2]  # the repository root, or the installed FAB
METHODS = ("lsr", "ralt")
# One task per process and run config (Ray actors keep theirs between messages).
_TASKS: dict[str, Any] = {}


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The fedrag-jax :class:`Config` a Flower run config names."""
    raw = str(run_config.get("config-path", "") or "")
    path = None
    if raw:
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
    method = str(run_config.get("method", "") or "").lower()
    if not method:
        if config.mode == "both":
            raise ConfigError("mode=both runs LSR then RALT, which a deployed run does one at "
                              "a time: set the run config's method to 'lsr' or 'ralt'")
        method = "lsr" if config.mode == "retriever" else "ralt"
    if method not in METHODS:
        raise ConfigError(f"run config method={method!r}; choose one of {METHODS}")
    return method


def checkpoint_dir(config: Config, method: str) -> Path:
    """Where the server writes its per-round checkpoints (as ``train_federated`` does)."""
    return Path(config.output_dir) / f"federated_{method}" / "checkpoints"


def _key(run_config: dict[str, Any]) -> str:
    return json.dumps({k: run_config[k] for k in sorted(run_config)}, default=str)


def client_task(run_config: dict[str, Any]) -> Any:
    """The client's :class:`FederatedTask`: the manager's own (same models, records,
    partition and objective as ``train_federated``)."""
    key = _key(run_config)
    if key not in _TASKS:
        from ..finetune.manager import FinetuneManager

        config = config_from_run_config(run_config)
        method = method_of(config, run_config)
        _TASKS[key] = FinetuneManager.from_config(config).get_federated_task(method)
    return _TASKS[key]


def server_task(run_config: dict[str, Any]) -> ServerTask:
    """The server's side of the task: the trainable params, built from the models alone."""
    from ..finetune.manager import _path, lsr_model, ralt_model
    from ..finetune.optimizer import make_optimizer
    from ..finetune.steps import TrainState
    from .aggregate import StrategyOptions

    config = config_from_run_config(run_config)
    m = config.model
    if method_of(config, run_config) == "lsr":
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
                      options=StrategyOptions.from_config(config.fed))


# --- the components Flower loads ------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    method = method_of(config, context.run_config)
    if config.fed.secagg:
        check_secagg(config.fed)  # before building the model
    task = server_task(context.run_config)
    run = ServerRun(checkpoint_dir=str(checkpoint_dir(config, method).resolve()))
    if config.fed.secagg:
        serve_secagg(grid, context, task, run)
    else:
        serve(grid, task, run)


client_app = ClientApp(mods=[dp_clipping_mod])


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    if config_from_run_config(context.run_config).fed.secagg:
        # SecAgg+ speaks Flower's legacy fit, behind secaggplus_mod (secagg.py)
        return secagg_client(context.run_config)(msg, context)
    return handle_train(client_task(context.run_config), msg, context)


def secagg_client(run_config: dict[str, Any]) -> ClientApp:
    """The legacy ClientApp (behind ``secaggplus_mod``) for this run's task, one a process."""
    key = "secagg:" + _key(run_config)
    if key not in _TASKS:
        _TASKS[key] = make_secagg_client_app(client_task(run_config))
    return _TASKS[key]


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(client_task(context.run_config), msg, context)


@client_app.query("identify")
def _client_identify(msg: Message, context: Context) -> Message:
    # the server asks before round 1: answer from the config alone, without building the task
    config = config_from_run_config(context.run_config)
    return handle_identify(config.fed.num_clients, msg, context)
