"""Log-friendly output: progress lines every few seconds without a terminal, log lines at a
level of their own, no third-party banner, `--version` and `python -m fedrag_jax`."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrag_jax import __version__
from fedrag_jax.cli import main, setup_logging
from fedrag_jax.progress import LogProgress, progress_bar
from tests.helpers import tiny_rag_parts

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_log_progress_prints_a_readable_line_at_most_every_interval():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=1000, desc="encoding passages", unit="passage", interval=10,
                      file=out, clock=clock)
    for _ in range(1000):  # 1000 updates over 125 s
        clock.t += 0.125
        bar.update(1)
        bar.set_postfix(loss=0.123456)
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 13  # one per 10 s, plus the final one
    assert lines[0] == "encoding passages: 80/1,000 (8%) 8 passage/s, 1m55s left, loss=0.1235"
    assert lines[-1] == "encoding passages: 1,000/1,000 (100%) 8 passage/s, in 2m05s, " \
        "loss=0.1235"


def test_without_a_terminal_the_bar_is_log_lines():
    assert isinstance(progress_bar(total=3, desc="x"), LogProgress)  # pytest's stderr: no tty
    assert isinstance(progress_bar(total=3, desc="x", disable=True), LogProgress)


def test_encoding_in_a_log_prints_one_line_not_one_per_batch(tmp_path, capfd):
    retriever, *_ = tiny_rag_parts(tmp_path, num_passages=2)
    capfd.readouterr()
    retriever.encode_context([f"w{4 + i % 90} w{5 + i % 90}" for i in range(96)], progress=True)
    err = capfd.readouterr().err
    records = [r for r in err.replace("\r", "\n").splitlines() if "encoding" in r]
    assert len(records) == 1, records  # 12 batches, finished well inside the interval
    assert records[0].startswith("encoding passages: 96/96 (100%)")


def test_log_level_is_separate_from_progress(capfd):
    logger = logging.getLogger("fedrag_jax.test")
    try:
        setup_logging("info")
        logger.info("resuming from step 4")
        logger.warning("ScaNN is unavailable; using the exact store")
        err = capfd.readouterr().err
        assert "INFO resuming from step 4" in err and "WARNING ScaNN" in err
        setup_logging("warning")  # what -q gives: warnings still show
        logger.info("hidden")
        logger.warning("still shown")
        err = capfd.readouterr().err
        assert "hidden" not in err and "still shown" in err
        # one handler of ours, reused (pytest adds its own capture handlers to every
        # non-propagating logger while a test runs: those are not counted)
        ours = [h for h in logging.getLogger("fedrag_jax").handlers
                if type(h).__module__ == "fedrag_jax.cli"]
        assert len(ours) == 1, logging.getLogger("fedrag_jax").handlers
        logging.basicConfig(force=True)  # a library's root handler: no second copy of a line
        logger.warning("once")
        assert capfd.readouterr().err.count("once") == 1
    finally:
        logging.getLogger("fedrag_jax").setLevel(logging.NOTSET)
        logging.getLogger("fedrag_jax").propagate = True
        logging.basicConfig(handlers=[], force=True)


def test_cli_log_level_flags(capsys):
    with pytest.raises(SystemExit):
        main(["-q", "--log-level", "info", "demo"])  # one of the three
    assert "give one of" in capsys.readouterr().err


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_version_and_python_dash_m():
    done = _run("-m", "fedrag_jax", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fedrag-jax {__version__}"
    done = _run("-m", "fedrag_jax", "index", "build", "--help")
    assert done.returncode == 0 and "--corpus" in done.stdout


BANNER = "PyTorch was not found"
NO_TORCH = ("import sys; sys.modules['torch'] = None\n"  # as in the base install
            "from fedrag_jax.cli import setup_logging\n"
            "{setup}\n"
            "import transformers\n")


def test_no_third_party_banner_on_a_command():
    shown = _run("-c", NO_TORCH.format(setup=""))
    assert BANNER in shown.stderr  # what every command printed before
    quiet = _run("-c", NO_TORCH.format(setup="setup_logging('info')"))
    assert quiet.returncode == 0 and BANNER not in quiet.stderr
