"""The one error type of the export package: something the user can fix (a config, a path, a checkpoint)."""

from __future__ import annotations


class ExportError(ValueError):
    """A module, path or checkpoint that cannot be exported as asked; the message says what and why."""
