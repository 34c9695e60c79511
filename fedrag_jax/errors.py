"""Named exceptions. Every message says what was wrong and what to do about it.

All derive from :class:`FedRAGJaxError`, so callers can catch the whole family at once.
"""

from __future__ import annotations


class FedRAGJaxError(Exception):
    """Base class of every error fedrag-jax raises on purpose."""


# --- configuration -------------------------------------------------------------------------
class ConfigError(FedRAGJaxError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class MeshError(ConfigError):
    """The requested device mesh cannot be built on the available devices."""


# --- models and checkpoints ----------------------------------------------------------------
class CheckpointNotFoundError(FedRAGJaxError, FileNotFoundError):
    """A model folder, weight file or checkpoint does not exist."""


class UnsupportedModelError(FedRAGJaxError, ValueError):
    """The checkpoint's architecture (model_type / GGUF architecture) is not implemented."""


class WeightMismatchError(FedRAGJaxError, ValueError):
    """A tensor in a checkpoint is missing, unexpected, or has the wrong shape or dtype."""


class CorruptCheckpointError(FedRAGJaxError, ValueError):
    """A checkpoint exists but is damaged (truncated, edited, checksum mismatch)."""


class AssetNotInstalledError(FedRAGJaxError, ModuleNotFoundError):
    """A bundled offline asset package (model or corpus) is not installed."""


# --- knowledge store -----------------------------------------------------------------------
class KnowledgeStoreError(FedRAGJaxError, ValueError):
    """Base class of knowledge-store errors."""


class EmptyStoreError(KnowledgeStoreError):
    """Search on a store that holds no nodes."""


class DimensionMismatchError(KnowledgeStoreError):
    """Embedding or query dimension differs from the store's."""


class InvalidEmbeddingError(KnowledgeStoreError):
    """An embedding holds NaN or infinite values."""


class DuplicateNodeError(KnowledgeStoreError):
    """A node id is added twice."""


class NodeNotFoundError(KnowledgeStoreError, KeyError):
    """A node id is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptStoreError(KnowledgeStoreError):
    """A persisted store is damaged, incomplete or was written by an incompatible version."""


# --- training, data and federation ---------------------------------------------------------
class DataError(FedRAGJaxError, ValueError):
    """Training or evaluation data is malformed (missing fields, empty, wrong type)."""


class SiloDataError(DataError):
    """A file a SuperNode's node config names (data-path, eval-path, store-path) is missing,
    unreadable or malformed."""


class PayloadError(FedRAGJaxError, ValueError):
    """A federated parameter payload failed validation (structure, shape, dtype, non-finite)."""


# --- training guards (issue 16) -------------------------------------------------------------
class ResumeMismatchError(ConfigError):
    """A run would resume checkpoints written under other settings (centralized or
    federated): the message names the differing keys and how to start fresh."""


class NonFiniteError(FedRAGJaxError, FloatingPointError):
    """A training step's loss or gradient is NaN / inf (``nonfinite: stop``), or a state
    holding NaN / inf was about to be checkpointed."""


class StoreFingerprintError(KnowledgeStoreError):
    """A knowledge store's embeddings were made by another retriever than the one in use
    (its ``embedding_model_hash`` differs): searching it would rank passages by meaningless
    scores."""


# --- paths and outputs ---------------------------------------------------------------------
class OutputExistsError(FedRAGJaxError, FileExistsError):
    """An output folder exists and is not an earlier output of the same kind that fedrag-jax
    wrote (or holds files it did not write): replacing it would delete them."""


class UnsupportedPathError(FedRAGJaxError, ValueError):
    """A path's scheme is not served (only local paths and gs://), or a remote path was given
    where only a local one works."""


class FilesystemNotInstalledError(FedRAGJaxError, ModuleNotFoundError):
    """An object-store path (gs://) was given but the filesystem that serves it is not
    installed (the message names the extra)."""


class RemotePathNotFoundError(FedRAGJaxError, FileNotFoundError):
    """An object-store input (gs://...) does not exist."""
