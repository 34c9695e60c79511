"""Flower's simulation engine: the ServerApp in a thread, ClientApps in Ray actors.

Each virtual client's messages run in an actor process with the resources of
``client_resources`` (on a multi-GPU host: ``{"num_cpus": 2, "num_gpus": 1}`` gives each
client a GPU). JAX's GPU preallocation is turned off for the actors, which would otherwise
each claim most of a shared device's memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax

from .client import make_client_app
from .history import FederatedResult
from .server import ServerRun, make_server_app

DEFAULT_CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set variables that the Ray processes started inside inherit; restore them after
    (PYTHONPATH too, which Flower's Ray backend rewrites in this process)."""
    old = {k: os.environ.get(k) for k in (*values, "PYTHONPATH")}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resources_from_config(config: Any) -> dict[str, float]:
    """Per-client Ray resources from a FederatedConfig's ``client_num_cpus`` /
    ``client_num_gpus`` where it has them (else one CPU, no GPU)."""
    return {"num_cpus": getattr(config, "client_num_cpus", None) or 1,
            "num_gpus": float(getattr(config, "client_num_gpus", None) or 0.0)}


def backend_settings(client_resources: dict[str, float] | None = None,
                     backend_config: dict | None = None) -> dict[str, Any]:
    """Flower's ``backend_config``: ``client_resources`` and, e.g., Ray ``init_args``."""
    config = {k: (dict(v) if isinstance(v, dict) else v)
              for k, v in (backend_config or {}).items()}
    config.setdefault("client_resources",
                      dict(client_resources or DEFAULT_CLIENT_RESOURCES))
    return config


def actor_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the actor processes: no GPU preallocation, the driver's matmul
    precision (so that clients compute what an in-process run computes), and ``extra``."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    precision = jax.config.jax_default_matmul_precision
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
    env.update(extra or {})
    return env


class RayShipping:
    """Sends a task to Flower's Ray actors once per simulation instead of once per message.

    Flower's Ray backend pickles the ClientApp into every message it hands an actor, and
    with it the task its handlers hold: models and data (261 MiB and ~0.6 s of pickling for
    the bundled MiniLM towers). While this is set on a task, the task pickles as its token
    and a reference into Ray's object store, where its state goes on the first message; an
    actor fetches it on its first message and keeps it (``client.shipped_task``).
    """

    def __init__(self) -> None:
        self.ref: Any = None

    def reduce(self, task: Any) -> tuple:
        import ray

        from .client import shipped_task

        if self.ref is None:  # Ray is up: Flower started it before the first message
            self.ref = ray.put(task.__getstate__())
        return shipped_task, (task.token, self.ref)


@contextlib.contextmanager
def _shipped_through_ray(task: Any) -> Iterator[None]:
    task._ray_shipping = RayShipping()
    try:
        yield
    finally:
        task._ray_shipping = None  # the reference dies with this simulation's Ray


def run_flower_simulation(task: Any, *, checkpoint_dir: str | None = None, resume: bool = True,
                          client_resources: dict[str, float] | None = None,
                          backend_config: dict | None = None, mods: list | None = None,
                          actor_env: dict[str, str] | None = None,
                          record_client_params: bool = False,
                          verbose: bool = False) -> FederatedResult:
    """Run ``task`` on ``task.config.num_clients`` virtual Flower SuperNodes.

    The actors inherit the environment at Ray's start: ``actor_env`` applies when this call
    starts Ray (not to a Ray instance the caller started).
    """
    from flwr.simulation import run_simulation

    run = ServerRun(checkpoint_dir=checkpoint_dir, resume=resume,
                    record_client_params=record_client_params)
    if getattr(task.config, "secagg", False):  # Flower's SecAgg+ lives on the legacy path
        from .secagg import make_secagg_client_app, make_secagg_server_app

        server_app = make_secagg_server_app(task, run)
        client_app = make_secagg_client_app(task)
    else:
        server_app = make_server_app(task, run)
        client_app = make_client_app(task, mods=mods)
    with _environment(**actor_environment(actor_env)), _shipped_through_ray(task):
        run_simulation(server_app, client_app, num_supernodes=task.config.num_clients,
                       backend_name="ray",
                       backend_config=backend_settings(
                           client_resources or resources_from_config(task.config),
                           backend_config),
                       verbose_logging=verbose)
    return FederatedResult(params=run.params, history=run.history, engine="flower",
                           strategy=task.strategy)
