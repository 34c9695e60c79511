"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# --- gs:// and the "gs:" folder it must never become -----------------------------------------
import pathlib  # noqa: E402

import pytest  # noqa: E402

_START_DIR = pathlib.Path.cwd()


def _gs_folders(root: pathlib.Path) -> list[str]:
    """Folders named "gs:" under ``root``: what pathlib makes of a gs:// path."""
    found = []
    for dirpath, dirs, _ in os.walk(root):
        found += [os.path.join(dirpath, d) for d in dirs if d == "gs:"]
    return found


@pytest.fixture(autouse=True)
def no_local_gs_folder(request):
    """Fail any test after which a local folder named "gs:" exists: in the working directory
    (where a relative "gs:/bucket/..." lands) or under the test's own tmp_path."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    found = [str(p / "gs:") for p in (pathlib.Path.cwd(), _START_DIR) if (p / "gs:").exists()]
    if tmp is not None:
        found += _gs_folders(tmp)
    assert not found, f"a gs:// path was written as a local folder: {found}"


def pytest_sessionfinish(session, exitstatus):
    """The whole session's temporary tree too (module-scoped fixtures, subprocesses)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None and factory._basetemp else None
    found = _gs_folders(base) if base is not None else []
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: local folders named 'gs:' were created: {found}")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://BUCKET/... served from tmp_path/gcs/BUCKET/... through epath's backend hooks: the
    suite's stand-in for Cloud Storage (orbax arrays excepted: tensorstore has its own GCS
    driver). The working directory is an empty folder: a gs:// path mistaken for a
    pathlib.Path would create "gs:" there."""
    from etils.epath import gpath, testing

    try:
        from fedrag_jax import paths
    except ImportError:  # older trees without the path layer
        paths = None
    root = tmp_path / "gcs"
    root.mkdir()
    prefix = "gs://"

    def local(p):
        s = os.fspath(p)
        return str(root / s[len(prefix):]) if s.startswith(prefix) else s

    def remote(p):
        s = os.fspath(p)
        return prefix + os.path.relpath(s, root) if s.startswith(str(root)) else s

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def walk(fn, top, **kwargs):
        for dirpath, dirs, files in fn(local(top), **kwargs):
            yield remote(dirpath), dirs, files

    def glob(fn, pattern):
        return [remote(p) for p in fn(local(pattern))]

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    if paths is not None:  # the stand-in serves gs:// without gcsfs
        monkeypatch.setattr(paths, "_filesystem_installed", lambda scheme: scheme == "gs")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    hooks = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open",
                                    "remove", "rmtree", "stat")}
    with testing.mock_epath(**hooks, rename=two, replace=two, copy=two, walk=walk, glob=glob):
        yield root
    assert list(cwd.iterdir()) == [], "a gs:// path was written as a local path"
