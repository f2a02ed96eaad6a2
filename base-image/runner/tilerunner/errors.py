"""Exceptions the runner core raises; the CLI turns each into one line and an exit code.

The core never prints or exits. Messages name the file, key or model and say what to do.
"""

from __future__ import annotations


class RunnerError(Exception):
    """Base class: a failure whose message fits on one line."""

    exit_code = 1


class ConfigError(RunnerError):
    """The verbose analysis config is invalid (unknown plug-in, bad key, cycle...)."""

    exit_code = 2


class ModelError(RunnerError):
    """A model file is missing, corrupt, fails its sha256, or disagrees with its params."""

    exit_code = 3


class SlideError(RunnerError):
    """The slide is missing, not a slide, truncated/corrupt, or lacks a resolution."""

    exit_code = 4


class OutputError(RunnerError):
    """The output folder cannot be created or written."""

    exit_code = 5


class DeviceError(RunnerError):
    """The requested device is not available in this ONNX Runtime build."""

    exit_code = 6


class BrokerError(RunnerError):
    """The worker cannot reach or use the message broker (RabbitMQ)."""

    exit_code = 7
