"""The errors that mean a bad key, value or file, identical on every rank: ``train.py`` prints
one line for them (rank 0's) and exits 2, with no traceback."""

from __future__ import annotations

from data_pipelines.recordio import RecordError
from data_pipelines.sources import DataError
from pfc_ds.checkpoint import CheckpointError
from pfc_ds.train.config import ConfigError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    RecordError,
    FileNotFoundError,
    CheckpointError,
)
