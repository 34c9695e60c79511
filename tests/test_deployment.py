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
