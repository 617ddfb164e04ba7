"""The error hierarchy and the typed outcomes reported about it.

Each error class carries the exit code the CLI uses when it ends the process and the reason
(`FailureReason`) the status page, the metrics and the Consul check report it under.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class FailureReason(StrEnum):
    """Why a template's last render or apply failed: metric label, /status and check output."""

    ERROR = "error"
    CONFIG = "config"
    CONSUL = "consul"
    TEMPLATE = "template"
    VALIDATION = "validation"
    RELOAD = "reload"
    WRITE = "write"
    LOCK = "lock"


class ApplyKind(StrEnum):
    """How a rendered change reached HAProxy (or the template's command)."""

    RUNTIME = "runtime"  # Runtime API commands, no reload
    RELOAD = "reload"  # validated file swapped in, graceful reload
    COMMAND = "command"  # the template's own command ran
    START = "start"  # HAProxy started on it (--exec-haproxy)
    NONE = "none"  # nothing to do (e.g. only comments changed)
    ALREADY_LIVE = "already-live"  # the file was live before this renderer applied anything


class RendererError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1
    reason: ClassVar[FailureReason] = FailureReason.ERROR


class ConfigError(RendererError):
    """Bad startup configuration: a key, a flag, a template spec. Fix the input and start again."""

    exit_code = 2
    reason = FailureReason.CONFIG


class ConsulError(RendererError):
    """Consul refused or could not answer (unreachable, ACL denied, bad response)."""

    exit_code = 3
    reason = FailureReason.CONSUL


class TemplateError(RendererError):
    """A template failed to parse or render (syntax, undefined name, unsafe catalog value)."""

    exit_code = 4
    reason = FailureReason.TEMPLATE


class ValidationError(RendererError):
    """The rendered file failed its check command (`haproxy -c`); the live file was kept."""

    exit_code = 5
    reason = FailureReason.VALIDATION


class ReloadError(RendererError):
    """HAProxy could not be reloaded or reached (master socket missing, reload failed)."""

    exit_code = 6
    reason = FailureReason.RELOAD


class WriteError(RendererError):
    """The destination could not be written (disk full, read-only, permissions, lock held)."""

    exit_code = 7
    reason = FailureReason.WRITE


class DeliveryError(RendererError):
    """Something unexpected while planning or applying one template's change: contained, reported
    with the template; the renderer and HAProxy go on with the last good file."""

    exit_code = 1
    reason = FailureReason.ERROR


class LockError(WriteError):
    """Another renderer holds the destination's lock."""

    exit_code = 8
    reason = FailureReason.LOCK
