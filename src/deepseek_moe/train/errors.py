"""The error a person can fix: bad data, a bad config file or field, a corrupt or mismatched checkpoint.

The CLI prints these as ``error: ...`` and exits 2, without a traceback. It subclasses ValueError so that
config validation errors and these are caught the same way.
"""

from __future__ import annotations


class TrainError(ValueError):
    pass


__all__ = ["TrainError"]
