"""The federated task: one model, one trainable filter, one optimizer, N clients' data.

    task = FederatedTask(towers, QUERY_TOWER, OptimizerConfig(...), client_datasets,
                         FederatedConfig(num_clients=4, rounds=3, local_steps=10),
                         objective=functools.partial(lsr_objective, tau_retrieval=0.05,
                                                     tau_lm=1.0))
    result = task.run_spmd()      # clients on device slices of one program (TPU, CPU)
    result = task.run_flower()    # Flower's simulation engine (Ray actors)

Both engines return a :class:`FederatedResult` (final params + per-round history) and, for
the same seeds and data, the same FedAvg parameters. The task is what a Flower ClientApp
carries to its actors, so it holds plain data and recompiles lazily in each process.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from ..config import FederatedConfig
from ..errors import ConfigError
from ..finetune.optimizer import OptimizerConfig, make_optimizer
from ..finetune.steps import TrainState, lsr_objective, ralt_objective
from .aggregate import StrategyOptions, check_dp_strategy, check_strategy, clients_per_round
from .history import FederatedResult
from .local import BatchSource, ClientStep, client_state, evaluate_loss, local_train


class FederatedTask:
    """Everything a server and its clients need to agree on.

    ``client_data[c]`` / ``eval_data[c]``: client ``c``'s datasets (``batch_at`` + ``len``);
    a deployed silo's task holds only its own (the others None: their data live elsewhere);
    ``objective(model, batch) -> (loss, aux)`` as in ``finetune.steps``. Strategy knobs come
    from ``options`` or, when absent, from the matching fields of ``config``.

    An :class:`OptimizerConfig` is stretched over the federation: its ``total_steps``
    becomes ``rounds x local_steps`` (the clients' local steps continue one global schedule,
    see ``local.client_state``). ``settings``: what decides the run
    (``finetune.manager.run_settings``); a checkpoint written under other settings is
    refused on resume.
    """

    def __init__(self, model: nnx.Module, trainable: Any,
                 optimizer: OptimizerConfig | optax.GradientTransformation,
                 client_data: Sequence[BatchSource], config: FederatedConfig, *,
                 objective: Callable, eval_data: Sequence[BatchSource | None] | None = None,
                 options: StrategyOptions | None = None, seed: int = 0, micro_batches: int = 1,
                 eval_batches: int | None = None, round_timeout: float = 3600.0,
                 settings: dict[str, Any] | None = None):
        if isinstance(optimizer, OptimizerConfig):
            optimizer = dataclasses.replace(
                optimizer, total_steps=max(1, config.rounds * config.local_steps))
            tx = make_optimizer(optimizer)
        else:
            tx = optimizer
        self.template = TrainState.create(model, tx, trainable, seed)
        if not jax.tree.leaves(self.template.params):
            raise ConfigError("the trainable filter selects no parameters; nothing to federate")
        self.trainable = trainable
        self.config = config
        check_strategy(config.strategy)
        self.options = options or StrategyOptions.from_config(config)
        self.objective = objective
        self.client_data = list(client_data)
        self.eval_data = list(eval_data) if eval_data is not None else None
        self.seed = seed
        self.micro_batches = micro_batches
        self.eval_batches = eval_batches
        self.round_timeout = round_timeout
        self.settings = settings
        self.token = uuid.uuid4().hex  # names this task in a client process's cache
        self._steps: dict[float, ClientStep] = {}
        self._simulators: dict[Any, Any] = {}
        self._validate()

    # --- constructors for the two methods ----------------------------------------------------
    @classmethod
    def lsr(cls, towers: nnx.Module, trainable: Any, optimizer: Any, client_data: Sequence,
            config: FederatedConfig, *, tau_retrieval: float = 1.0, tau_lm: float = 1.0,
            **kw: Any) -> FederatedTask:
        objective = functools.partial(lsr_objective, tau_retrieval=tau_retrieval, tau_lm=tau_lm)
        return cls(towers, trainable, optimizer, client_data, config, objective=objective, **kw)

    @classmethod
    def ralt(cls, model: nnx.Module, trainable: Any, optimizer: Any, client_data: Sequence,
             config: FederatedConfig, **kw: Any) -> FederatedTask:
        return cls(model, trainable, optimizer, client_data, config, objective=ralt_objective,
                   **kw)

    def _validate(self) -> None:
        c = self.config
        if len(self.client_data) != c.num_clients:
            raise ConfigError(f"{len(self.client_data)} client datasets for num_clients="
                              f"{c.num_clients}; give one dataset per client")
        if self.eval_data is not None and len(self.eval_data) != c.num_clients:
            raise ConfigError(f"{len(self.eval_data)} eval datasets for num_clients="
                              f"{c.num_clients}; give one per client (None for none)")
        for name, value in (("rounds", c.rounds), ("local_steps", c.local_steps),
                            ("min_clients", c.min_clients)):
            if value < 1:
                raise ConfigError(f"federated {name}={value} must be >= 1")
        if c.min_clients > c.num_clients:
            raise ConfigError(f"min_clients={c.min_clients} exceeds num_clients="
                              f"{c.num_clients}; the server would wait forever")
        if not 0.0 < c.fraction_train <= 1.0:
            raise ConfigError(f"fraction_train={c.fraction_train} must be in (0, 1]")
        clip, noise = getattr(c, "dp_clipping_norm", None), getattr(c, "dp_noise_multiplier", 0.0)
        if clip is not None and clip <= 0:
            raise ConfigError(f"dp_clipping_norm={clip} must be > 0 (null: no DP)")
        if noise < 0 or (noise > 0 and clip is None):
            raise ConfigError(f"dp_noise_multiplier={noise} needs dp_clipping_norm set and must "
                              "be >= 0: the noise std is multiplier * clipping_norm / clients")
        check_dp_strategy(c.strategy, clip)
        if getattr(c, "secagg", False):
            from .secagg import check_secagg

            check_secagg(c)
        if all(d is None for d in self.client_data):
            raise ConfigError("no client holds a dataset")
        for i, d in enumerate(self.client_data):
            if d is not None and len(d) < 1:
                raise ConfigError(f"client {i}'s dataset has no batches")

    # --- what one client does ----------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return check_strategy(self.config.strategy)

    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None and any(d is not None for d in self.eval_data)

    def client_mu(self) -> float:
        return self.options.proximal_mu if self.strategy == "fedprox" else 0.0

    def step(self, mu: float | None = None) -> ClientStep:
        mu = self.client_mu() if mu is None else float(mu)
        if mu not in self._steps:
            self._steps[mu] = ClientStep(self.objective, self.trainable, mu, self.micro_batches)
        return self._steps[mu]

    def initial_params(self) -> nnx.State:
        return self.template.params

    def model_with(self, params: Any) -> nnx.Module:
        """The model with ``params`` (e.g. a result's) as its trainable variables."""
        params = jax.tree.map(jax.numpy.asarray, params)
        return nnx.merge(self.template.graphdef, params, self.template.frozen)

    def sample_size(self) -> int:
        """Clients per round, as Flower samples them: max(int(n * fraction), min_clients)."""
        return clients_per_round(self.config)

    def client_update(self, client_id: int, params: Any, round_: int,
                      mu: float | None = None) -> tuple[nnx.State, dict[str, float]]:
        """Client ``client_id``'s local training in round ``round_`` (1-based) from ``params``."""
        if not 0 <= client_id < len(self.client_data):
            raise ConfigError(f"client id {client_id} is outside 0..{len(self.client_data) - 1}")
        if self.client_data[client_id] is None:
            raise ConfigError(f"this process holds no training data for client {client_id}: "
                              "check the node's partition-id (a silo's task holds only its "
                              "own client's data)")
        steps = self.config.local_steps
        state = client_state(self.template, params, round_, client_id, steps)
        state, metrics = local_train(state, self.client_data[client_id], steps,
                                     (round_ - 1) * steps, step=self.step(mu))
        return state.params, metrics

    def client_evaluate(self, client_id: int, params: Any) -> dict[str, float] | None:
        data = self.eval_data[client_id] if self.eval_data is not None else None
        return evaluate_loss(self.template, params, data, step=self.step(0.0),
                             max_batches=self.eval_batches)

    # --- the two engines ---------------------------------------------------------------------
    def run_spmd(self, *, checkpoint_dir: str | None = None, resume: bool = True,
                 devices: Sequence[jax.Device] | None = None,
                 devices_per_client: int | None = None, sub_mesh: Any = None,
                 record_client_params: bool = False) -> FederatedResult:
        """All clients in one program: local steps vmapped over a ``clients`` mesh axis."""
        from .spmd import SpmdSimulator

        if getattr(self.config, "secagg", False):
            raise ConfigError("secagg (SecAgg+) runs on Flower's simulation engine: set "
                              "fed.engine=flower")
        if any(d is None for d in self.client_data):
            raise ConfigError("the SPMD simulator runs every client in one program: it needs "
                              "every client's dataset (this task holds one silo's only)")
        if getattr(self.config, "dp_clipping_norm", None) is not None:
            raise ConfigError("differential privacy (dp_clipping_norm) runs on the Flower paths "
                              "(Flower's DP strategy wrapper and clipping mod): set "
                              "fed.engine=flower or deploy with flwr run")

        devices_per_client = devices_per_client or getattr(self.config, "devices_per_client",
                                                           None)
        key = (tuple(devices) if devices is not None else None, devices_per_client, sub_mesh)
        sim = self._simulators.get(key)
        if sim is None:  # keeps its compiled functions for the next run on the same mesh
            sim = self._simulators[key] = SpmdSimulator(
                self, devices=devices, devices_per_client=devices_per_client, sub_mesh=sub_mesh)
        return sim.run(checkpoint_dir=checkpoint_dir, resume=resume,
                       record_client_params=record_client_params)

    def run_flower(self, *, checkpoint_dir: str | None = None, resume: bool = True,
                   client_resources: dict[str, float] | None = None,
                   backend_config: dict | None = None, mods: list | None = None,
                   actor_env: dict[str, str] | None = None, record_client_params: bool = False,
                   verbose: bool = False) -> FederatedResult:
        """Flower's simulation engine: a ServerApp thread and one ClientApp run per client
        message in Ray actors (``client_resources``: e.g. {"num_cpus": 1, "num_gpus": 1};
        ``actor_env``: extra environment variables for the actor processes)."""
        from .simulation import run_flower_simulation

        return run_flower_simulation(self, checkpoint_dir=checkpoint_dir, resume=resume,
                                     client_resources=client_resources,
                                     backend_config=backend_config, mods=mods,
                                     actor_env=actor_env,
                                     record_client_params=record_client_params, verbose=verbose)

    def __getstate__(self) -> dict:  # compiled steps stay in the process that built them
        return {**self.__dict__, "_steps": {}, "_simulators": {}, "_ray_shipping": None}

    def __reduce_ex__(self, protocol: Any) -> Any:
        shipping = self.__dict__.get("_ray_shipping")
        if shipping is not None:  # inside a Flower simulation: simulation.RayShipping
            return shipping.reduce(self)
        return super().__reduce_ex__(protocol)
