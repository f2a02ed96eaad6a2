"""The few exception classes the core raises; the CLI maps each to one line and an exit code.

The core never prints or exits. Every failure a user can cause or fix is one of these, with a
message that names the file, key or id and says what to do.
"""

from __future__ import annotations

from typing import Any, Final

from builder.redact import mask_secrets

#: Exit code of a failed audit check (tampered file, digest mismatch, bad signature).
AUDIT_FAILED: Final = 10


class BuilderError(Exception):
    """Base class: a failure with a message fit for one line of output."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(BuilderError):
    """The customer repository or one of its files is invalid (file, line, key in the message)."""

    exit_code = 2


class RegistryError(BuilderError):
    """The model registry refused, does not know an id, or could not be reached in time."""

    exit_code = 3


class ReleaseGateError(BuilderError):
    """A model may not ship in a release build (unpublished, task not completed, not in production)."""

    exit_code = 4


class FetchError(BuilderError):
    """Weights could not be fetched or did not match their recorded sha256."""

    exit_code = 5


class ImageError(BuilderError):
    """The base image, the image assembly or the delivery to a registry/engine failed."""

    exit_code = 6


class DriftError(BuilderError):
    """The lock file does not match what the registry resolves to now (lock --check)."""

    exit_code = 7


class FleetError(BuilderError):
    """One or more customers of a fleet build failed (each is listed in the report)."""

    exit_code = 8


class WriteBackError(BuilderError):
    """A release record could not be written to the customer repository."""

    exit_code = 9


class AttestationError(BuilderError):
    """A signature or attestation does not verify (exit code 10, like a failed audit check)."""

    exit_code = AUDIT_FAILED


def error_fields(kind: str, message: str, hint: str | None, exit_code: int) -> dict[str, Any]:
    """The error part of every JSON document and of a fleet customer's result, secrets masked
    and on one line (a line break from outside data is shown as ``\\n``): the one shape an
    error takes when it is printed or recorded."""
    return {
        "type": kind,
        "message": _one_line(mask_secrets(message)),
        "hint": _one_line(mask_secrets(hint)) if hint else hint,
        "exit_code": exit_code,
    }


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def error_dict(exc: BuilderError) -> dict[str, Any]:
    """:func:`error_fields` of a raised error."""
    return error_fields(type(exc).__name__, exc.message, exc.hint, exc.exit_code)
