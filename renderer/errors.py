"""The error hierarchy. Each class carries the exit code the CLI uses when it ends the process."""

from __future__ import annotations


class RendererError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(RendererError):
    """Bad startup configuration: a key, a flag, a template spec. Fix the input and start again."""

    exit_code = 2


class ConsulError(RendererError):
    """Consul refused or could not answer (unreachable, ACL denied, bad response)."""

    exit_code = 3


class TemplateError(RendererError):
    """A template failed to parse or render (syntax, undefined name, unsafe catalog value)."""

    exit_code = 4


class ValidationError(RendererError):
    """The rendered file failed its check command (`haproxy -c`); the live file was kept."""

    exit_code = 5


class ReloadError(RendererError):
    """HAProxy could not be reloaded or reached (master socket missing, reload failed)."""

    exit_code = 6


class WriteError(RendererError):
    """The destination could not be written (disk full, read-only, permissions, lock held)."""

    exit_code = 7


class LockError(WriteError):
    """Another renderer holds the destination's lock."""

    exit_code = 8
