"""fedrag-jax."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrag-jax")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0+source"
