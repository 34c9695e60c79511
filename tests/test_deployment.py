"""Deployment on loopback: a real ``flower-superlink``, two ``flower-supernode`` processes and
``flwr run`` of the app pyproject.toml declares (fedrag_jax/federated/app.py), on tiny HF
folders; the server's last checkpoint must hold what the in-process run of the same config
computes, and no process may outlive the test."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedrag_jax.federated import app, flatten_params
from fedrag_jax.federated.history import open_run
from tests.helpers import tiny_rag_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ATOL = 1e-5
DEADLINE = 420.0  # seconds for the whole run (two rounds, compiled in every client process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


class Processes:
    """Long-running processes, each in its own process group with its log in a file. Flower
    detaches some children (SuperExec) into new sessions, so every descendant seen is
    remembered and ended by its pid at shutdown."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.logs, start_new_session=True)
        out.close()
        self.procs[name] = proc
        self.watch()
        return proc

    def watch(self) -> None:
        """Remember every live descendant (detached ones too, while their parent lives)."""
        me = psutil.Process()
        for p in me.children(recursive=True):
            self.seen.setdefault(p.pid, p)
        for p in [*self.seen.values()]:
            try:
                for c in p.children(recursive=True):
                    self.seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass

    def report(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            parts.append(f"--- {name} (exit code {proc.poll()}) ---\n{text[-4000:]}")
        return "\n".join(parts)

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def shutdown(self) -> list[str]:
        """SIGTERM every group (Flower shuts down cleanly on it), then SIGKILL what is left;
        returns what was still alive after SIGTERM and a grace period."""
        self.watch()
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        stubborn = [f"{p.pid} {p.name()}" for p in self.alive()]
        for p in self.alive():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        psutil.wait_procs(list(self.seen.values()), timeout=10)
        return stubborn


def overrides(files: dict[str, Path], out: Path) -> list[str]:
    return ["mode=retriever", "federated=true", f"output_dir={out}", "progress=false",
            f"model.retriever={files['retriever']}", f"model.generator={files['generator']}",
            f"data.corpus={files['corpus']}", f"data.train={files['train']}", "data.eval=null",
            "retrieval.backend=exact", "retrieval.top_k=2",
            "retrieval.prompt_template=w4 {context} w5 {query} w6",
            "lsr.batch_size=2", "lsr.max_length=64", "lsr.learning_rate=1e-3",
            "lsr.score_batch_size=4", "fed.num_clients=2", "fed.rounds=2", "fed.local_steps=2",
            "fed.partition=iid", "fed.min_clients=2", "fed.engine=flower", "mesh.data=1"]


def run_status(env: dict[str, str], run_id: str) -> str:
    out = subprocess.run([str(BIN / "flwr"), "ls", "local-loopback", "--run-id", run_id,
                          "--format", "json"], capture_output=True, text=True, env=env,
                         timeout=60)
    try:
        body = json.loads(out.stdout)
    except json.JSONDecodeError:
        return f"unreadable: {out.stdout[-300:]} {out.stderr[-300:]}"
    runs = body.get("runs") or []
    return str(runs[0].get("status", "")) if runs else f"no run in {body}"


def test_flwr_run_on_loopback_equals_the_in_process_run(tmp_path):
    files = tiny_rag_files(tmp_path)
    out = tmp_path / "deployed"
    run_config = {"config-path": "", "method": "lsr",
                  "overrides": shlex.join(overrides(files, out))}
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-loopback"\n\n[superlink.local-loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    (tmp_path / "run-config.toml").write_text(
        "".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"),
           "FLWR_TELEMETRY_ENABLED": "0", "XLA_FLAGS": "", "TOKENIZERS_PARALLELISM": "false"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, env)
    stubborn: list[str] = []
    try:
        link = procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                  "--host", "127.0.0.1", "--port", str(link_port),
                                  "--disable-runtime-dependency-installation"])
        assert wait_for_port(link_port, 60, link), "the SuperLink did not listen\n" + procs.report()
        for cid in range(2):
            procs.start(f"supernode{cid}", [
                str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{link_port}", "--host", "127.0.0.1",
                "--port", str(free_port()), "--node-config", f"partition-id={cid}"])
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "local-loopback", "--run-config",
             str(tmp_path / "run-config.toml"), "--format", "json"],
            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert submitted.returncode == 0, (f"flwr run failed: {submitted.stdout}\n"
                                           f"{submitted.stderr}\n{procs.report()}")
        run_id = json.loads(submitted.stdout)["run-id"]
        deadline = time.monotonic() + DEADLINE
        status = ""
        while time.monotonic() < deadline:
            procs.watch()
            status = run_status(env, run_id)
            if status.startswith("finished"):
                break
            time.sleep(2)
        assert status == "finished:completed", (f"run {run_id} ended as {status!r}\n"
                                                f"{procs.report()}")
    finally:
        stubborn = procs.shutdown()
    leftover = procs.alive()
    assert not leftover, f"processes left running: {[(p.pid, p.name()) for p in leftover]}"
    assert not stubborn, f"ignored SIGTERM (needed SIGKILL): {stubborn}"

    # what the deployed server checkpointed after round 2
    task = app.server_task(run_config)
    ckpt, done, deployed, _, history = open_run(
        task, app.checkpoint_dir(app.config_from_run_config(run_config), "lsr"), resume=True)
    ckpt.close()
    assert done == 2 and [r.round for r in history] == [1, 2]
    for record in history:
        assert record.aggregated and not record.failed and not record.rejected
        assert sorted(c.client_id for c in record.clients) == [0, 1]
    # the same config run in one process (the deployed processes' environment: one device)
    reference = tmp_path / "in-process.npz"
    done_ref = subprocess.run([sys.executable, "-m", "tests.deployment_worker",
                               json.dumps(run_config), str(reference)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done_ref.returncode == 0, done_ref.stdout[-3000:] + done_ref.stderr[-3000:]
    mine, rounds = load_worker_output(reference)
    losses = [r["losses"] for r in rounds]
    theirs = flatten_params(deployed)
    initial = flatten_params(task.initial_params())
    assert any(not np.allclose(theirs[k], initial[k]) for k in theirs)  # it trained
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_allclose(theirs[k], mine[k], atol=ATOL, err_msg=k)
    for record, ref in zip(history, losses, strict=True):
        assert {str(k): v for k, v in record.losses().items()} == pytest.approx(ref, rel=1e-4)


def load_worker_output(path: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    with np.load(path) as z:
        return ({k: z[k] for k in z.files if k != "__history__"},
                json.loads(str(z["__history__"])))


def worker_env(tmp_path: Path) -> dict[str, str]:
    """The deployed processes' environment: one CPU device, a shared compilation cache."""
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_FLAGS": "",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"),
            "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def test_deployed_app_runs_secagg_and_matches_fedavg(tmp_path):
    """fed.secagg=true in a deployed run: the app's ServerApp runs SecAgg+ (Flower's legacy
    workflow) and its ClientApp answers behind secaggplus_mod; the result is the plain
    app's FedAvg up to the quantisation bound (both in-process, messages handed over)."""
    from fedrag_jax.config import load_config
    from fedrag_jax.federated.secagg import tolerance

    files = tiny_rag_files(tmp_path, num_records=12)
    common = ["fed.num_clients=3", "fed.min_clients=3", "fed.rounds=1"]
    secagg = ["fed.secagg=true", "fed.secagg_num_shares=3",
              "fed.secagg_reconstruction_threshold=2", "fed.secagg_clipping_range=4.0",
              "fed.secagg_quantization_range=1048576", "fed.secagg_max_weight=16.0"]
    outputs = {}
    for name, extra in (("plain", []), ("secure", secagg)):
        run_config = {"config-path": "", "method": "lsr", "overrides": shlex.join(
            overrides(files, tmp_path / name) + common + extra)}
        out = tmp_path / f"{name}.npz"
        done = subprocess.run([sys.executable, "-m", "tests.deployment_worker",
                               json.dumps(run_config), str(out), "app"],
                              capture_output=True, text=True, env=worker_env(tmp_path),
                              cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs[name] = load_worker_output(out)
    (exact, (plain,)), (secure, (record,)) = outputs["plain"], outputs["secure"]
    exact = {k.removeprefix("lsr::"): v for k, v in exact.items()}
    secure = {k.removeprefix("lsr::"): v for k, v in secure.items()}
    assert plain["aggregated"] and record["aggregated"]
    assert "secure aggregation" in record["note"]
    assert not record["num_examples"]  # the server never saw an individual update
    sizes = list(plain["num_examples"].values())
    assert len(sizes) == 3
    assert max(float(np.abs(v).max()) for v in exact.values()) < 4.0  # inside the clip range
    fed = load_config(None, overrides(files, tmp_path) + common + secagg).fed
    tol = tolerance(fed, sizes)
    err = max(float(np.abs(secure[k] - exact[k]).max()) for k in exact)
    assert 0 < err <= tol + 1e-6, (err, tol)  # quantised, within the bound
    assert tol < 1e-4


# --- silos with their own files (node config data-path / store-path / eval-path) ------------
def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(4, 96, size=n))


def _write_records(path: Path, rng: np.random.Generator, n: int) -> list[str]:
    rows = [{"query": _words(rng, 4), "response": _words(rng, 3)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["query"] for r in rows]


def test_silos_train_on_their_own_files_in_process(tmp_path, monkeypatch):
    """Three SuperNodes' ClientApps in process: silo 0 and 1 point data-path at their own
    JSONL files (silo 0 also eval-path, silo 1 its own store-path), silo 2 at a file that does
    not exist. Each trains on all of its own file and nothing else; silo 2's reply is a named
    error and the round goes on with the two others."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrag_jax.federated import task as task_module
    from fedrag_jax.federated.server import ServerRun, serve
    from fedrag_jax.indexing import build_store, load_corpus
    from fedrag_jax.retriever import DualEncoder
    from tests.helpers import LocalGrid

    files = tiny_rag_files(tmp_path)
    rng = np.random.default_rng(11)
    queries = {0: _write_records(tmp_path / "silo0.jsonl", rng, 5),
               1: _write_records(tmp_path / "silo1.jsonl", rng, 7)}
    evals = _write_records(tmp_path / "silo0-eval.jsonl", rng, 3)
    # silo 1's own store: half of the corpus, built by the same retriever
    corpus = load_corpus(files["corpus"])
    own = corpus[6:]
    build_store(own, DualEncoder.from_pretrained(str(files["retriever"]), max_length=128),
                backend="exact", progress=False).persist(tmp_path / "silo1-store")
    run_config = {"config-path": "", "method": "lsr", "evaluate": True, "overrides": shlex.join(
        [*overrides(files, tmp_path / "out"), "fed.num_clients=3", "fed.rounds=1",
         "mesh.data=-1"])}  # this process has 8 CPU devices
    nodes = {0: {"data-path": str(tmp_path / "silo0.jsonl"),
                 "eval-path": str(tmp_path / "silo0-eval.jsonl")},
             1: {"data-path": str(tmp_path / "silo1.jsonl"),
                 "store-path": str(tmp_path / "silo1-store")},
             2: {"data-path": str(tmp_path / "missing.jsonl")}}
    seen: dict[int, list] = {}  # id(dataset) -> the batches trained on
    original = task_module.local_train

    def spy(state, data, steps, start_position=0, *, step):
        seen[id(data)] = [data.batch_at(*divmod(start_position + t, len(data)))
                          for t in range(steps)]
        return original(state, data, steps, start_position, step=step)

    monkeypatch.setattr(task_module, "local_train", spy)
    monkeypatch.setattr(app, "_TASKS", {})
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        task = app.server_task(run_config)
        assert task.has_eval
        grid = LocalGrid(app.client_app, 3, run_config, node_configs=nodes)
        result = serve(grid, task, ServerRun())
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    (record,) = result.history
    assert record.aggregated
    assert {c.client_id: c.num_examples for c in record.clients} == {0: 5, 1: 7}
    assert [f["client_id"] for f in record.failed] == [2]
    assert "SiloDataError" in record.failed[0]["reason"]
    assert "data-path" in record.failed[0]["reason"]
    # silo 0 evaluated on its eval file; silo 1 has none
    assert [(e["client_id"], e["num_examples"]) for e in record.evaluation] == [(0, len(evals))]
    assert np.isfinite(record.evaluation[0]["eval_loss"])
    # each silo's task holds its own data only, and its batches its own queries only
    silo_tasks = {}
    for t in app._TASKS.values():
        (cid,) = [c for c, d in enumerate(t.client_data) if d is not None]
        silo_tasks[cid] = t
    assert sorted(silo_tasks) == [0, 1]
    for cid, t in silo_tasks.items():
        batches = seen[id(t.client_data[cid])]
        assert len(batches) == 2  # fed.local_steps
        for batch in batches:
            for ids, mask, valid in zip(batch["query_ids"], batch["query_mask"],
                                        batch["example_mask"], strict=True):
                if valid:  # the tiny word-level tokenizer: token id i is word "w<i>"
                    query = " ".join(f"w{i}" for i in ids[mask.astype(bool)])
                    assert query in queries[cid] and query not in queries[1 - cid]
    # silo 1 retrieved from its own store (half the corpus), silo 0 from the configured one
    ids1 = {str(i) for i in silo_tasks[1].client_data[1].passage_ids.ravel()}
    assert ids1 <= {r["id"] for r in own}
    ids0 = {str(i) for i in silo_tasks[0].client_data[0].passage_ids.ravel()}
    assert not ids0 <= {r["id"] for r in own}


def test_silo_files_are_checked_with_named_errors(tmp_path):
    from fedrag_jax.errors import ConfigError, SiloDataError

    (tmp_path / "bad.jsonl").write_text('{"query": "q"}\n[1, 2]\n')
    with pytest.raises(SiloDataError, match="data-path"):
        app.silo_files({"partition-id": 0, "data-path": str(tmp_path / "none.jsonl")})
    with pytest.raises(SiloDataError, match="store-path.*no such folder"):
        app.silo_files({"store-path": str(tmp_path / "no-store")})
    with pytest.raises(SiloDataError, match="eval-path.*cannot be read"):
        app._silo_records("eval-path", tmp_path / "bad.jsonl")
    (tmp_path / "store").mkdir()
    with pytest.raises(SiloDataError, match="store-path.*cannot be loaded"):
        app._silo_store(tmp_path / "store")
    assert app.silo_files({"partition-id": 1}) == {}
    # a shard needs every client's records: a silo with its own data brings its own store
    from fedrag_jax.config import load_config

    config = load_config(None, ["fed.client_stores=partition"])
    (tmp_path / "mine.jsonl").write_text('{"query": "q", "response": "r"}\n')
    with pytest.raises(ConfigError, match="store-path"):
        app.silo_task(config, "lsr", 0, {"data-path": tmp_path / "mine.jsonl"})
    with pytest.raises(ConfigError, match="evaluate"):
        app.evaluate_of({"evaluate": "maybe"})


def test_deployed_both_run_equals_train_federated(tmp_path):
    """method both in one deployed run: federated LSR, then federated RALT whose clients
    retrieve with the federated query tower the server sends along; each phase's result
    equals the simulation path's (FinetuneManager.train_federated, Flower engine)."""
    files = tiny_rag_files(tmp_path, num_records=12)
    # a large LSR step: the tuned query tower retrieves other passages for RALT than the
    # initial one (a RALT phase that ignored it would not match)
    both = ["mode=both", "lsr.learning_rate=0.1", "ralt.batch_size=2", "ralt.lora_rank=4",
            "ralt.max_length=128", "ralt.learning_rate=1e-2", "ralt.warmup_steps=0",
            "data.eval=null"]
    outputs = {}
    for how in ("app", "manager"):  # overrides(): fed.engine=flower
        run_config = {"config-path": "", "method": "", "overrides": shlex.join(
            overrides(files, tmp_path / how) + both)}
        out = tmp_path / f"{how}.npz"
        done = subprocess.run([sys.executable, "-m", "tests.deployment_worker",
                               json.dumps(run_config), str(out), how],
                              capture_output=True, text=True, env=worker_env(tmp_path),
                              cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs[how] = load_worker_output(out)
    (deployed, rounds), (simulated, sim_rounds) = outputs["app"], outputs["manager"]
    assert [(r["phase"], r["round"]) for r in rounds] == \
        [("lsr", 1), ("lsr", 2), ("ralt", 1), ("ralt", 2)]
    assert all(r["aggregated"] and len(r["losses"]) == 2 for r in rounds)
    assert deployed.keys() == simulated.keys()
    assert any(k.startswith("lsr::query_tower") for k in deployed)
    assert any(k.startswith("ralt::") and "lora" in k for k in deployed)
    for k in deployed:
        np.testing.assert_allclose(deployed[k], simulated[k], atol=2e-5, err_msg=k)
    for mine, theirs in zip(rounds, sim_rounds, strict=True):
        assert mine["losses"] == pytest.approx(theirs["losses"], rel=1e-4)
