"""Errors that end a command with one clear message and a non-zero exit code."""

from __future__ import annotations

from typing import Any


class AftrecError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with :attr:`exit_code`."""

    exit_code = 2


class DataError(AftrecError):
    """Input data is missing, malformed or inconsistent (names the file, row or column)."""


class ConfigError(AftrecError):
    """Unknown or invalid configuration key or value, or unknown model name."""


class CheckpointError(AftrecError):
    """A checkpoint or run directory cannot be read."""


class OutputError(AftrecError):
    """An output cannot be written: its parent is a file, a folder is not writable, the disk
    is full (names the output)."""


class TrainingError(AftrecError, FloatingPointError):
    """Training diverged: a loss became NaN or infinite (names the epoch and the losses)."""


class Stopped(BaseException):
    """A command was stopped by SIGTERM or SIGINT after cleaning up (its worker processes
    stopped). Like ``KeyboardInterrupt``, not an ``Exception``, so that no ``except Exception``
    on the way records it as a failure; the CLI prints ``stopped: <message>`` and exits with
    :attr:`exit_code`, 128 + the signal's number, as a shell reports a killed command."""

    def __init__(self, signum: int, message: str = "") -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message or f"by {signal.Signals(signum).name}")


def require_numbers(settings: object, prefix: str) -> None:
    """Raise :class:`ConfigError` for the first field of the frozen dataclass ``settings``
    whose value is not a number of its declared type (``int``: an integer; ``float``: any real
    number; a bool is neither), before its bounds are compared: a string in a Python call
    compared as ``'10' >= 1``, and a float count reached NumPy deep inside. A NumPy number is
    stored as the Python one (a float32 ratio is not the decimal it prints as, and a dataset's
    ``meta.json`` would record it as text). Fields of other types are the caller's to
    check."""
    import dataclasses
    import numbers

    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        wanted = {"int": numbers.Integral, "float": numbers.Real}.get(kind)
        if wanted is None:
            continue
        if isinstance(value, bool) or not isinstance(value, wanted):
            said = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{prefix}{f.name} must be {said}, got {value!r}")
        number: Any = value  # a Real, which int() and float() take
        object.__setattr__(settings, f.name, int(number) if kind == "int" else float(number))
