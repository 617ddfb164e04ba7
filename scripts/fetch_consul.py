#!/usr/bin/env python3
"""Make a Consul agent binary available in .tools/bin/consul, without touching the system.

Order of preference:
1. A `consul` on PATH whose version is 1.8 or newer: nothing to do.
2. .tools/bin/consul already extracted by an earlier run: nothing to do (no download).
3. Debian 11's `consul` package (Consul 1.8.7, a real agent with its web UI), fetched with
   `apt-get download` from the Debian mirror this machine's own apt sources use, with the suite
   `bullseye`, through a private sources list and private lists/cache directories under .tools/apt.

It never writes the system's apt state and never names a mirror itself: the mirror comes from the
machine's apt configuration. When nothing works it says what is missing and how to get it, exit 3.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = (1, 8)
SUITE = "bullseye"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HELP = (
    "Install Consul 1.8 or newer and put `consul` on PATH (https://developer.hashicorp.com/consul/install), "
    "or run this on a Debian/Ubuntu machine whose apt sources include a Debian mirror."
)


@dataclass(frozen=True)
class AptSource:
    uri: str
    keyring: str | None


def consul_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Consul v(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        if not any(_is_main_debian_suite(s) for s in suites):
            continue
        for uri in fields.get("uris", "").split():
            found.append(AptSource(uri, fields.get("signed-by")))
    return found


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match and _is_main_debian_suite(match.group(3)):
            opts = match.group(1) or ""
            keyring = re.search(r"signed-by=(\S+?)[\s\]]", opts)
            found.append(AptSource(match.group(2), keyring.group(1) if keyring else None))
    return found


def _is_main_debian_suite(suite: str) -> bool:
    """A Debian release suite such as bookworm or bookworm-updates, not security or a third party."""
    names = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")
    base = suite.split("-", 1)[0].split("/", 1)[0]
    return base in names and "security" not in suite


def debian_sources() -> list[AptSource]:
    sources: list[AptSource] = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        parse = _deb822_sources if path.endswith(".sources") else _one_line_sources
        sources.extend(s for s in parse(text) if "security" not in s.uri)
    return sources


def fetch_deb(tools: Path, source: AptSource) -> Path:
    apt = tools / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    keyring = source.keyring if source.keyring and os.path.exists(source.keyring) else DEFAULT_KEYRING
    signed = f"[signed-by={keyring}]" if os.path.exists(keyring) else "[trusted=yes]"
    (apt / "etc/sources.list").write_text(f"deb {signed} {source.uri} {SUITE} main\n")
    opts = [
        f"-oDir::Etc::SourceList={apt}/etc/sources.list",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt}/lists",
        f"-oDir::Cache={apt}/cache",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=" + ("root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")),
        "-qq",
    ]
    print(f"fetch-consul: apt-get update (private lists, suite {SUITE})", flush=True)
    subprocess.run(["apt-get", *opts, "update"], check=True, timeout=600)
    download = apt / "download"
    download.mkdir(exist_ok=True)
    print("fetch-consul: apt-get download consul", flush=True)
    subprocess.run(["apt-get", *opts, "download", "consul"], check=True, timeout=600, cwd=download)
    debs = sorted(download.glob("consul_*.deb"))
    if not debs:
        raise RuntimeError("apt-get download consul produced no .deb")
    return debs[-1]


def extract(deb: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, timeout=120)
        binary = Path(tmp) / "usr/bin/consul"
        if not binary.exists():
            raise RuntimeError(f"{deb.name} has no usr/bin/consul")
        shutil.move(str(binary), dest)
        dest.chmod(0o755)


def main() -> int:
    tools = Path(sys.argv[1] if len(sys.argv) > 1 else ".tools").resolve()
    target = tools / "bin/consul"
    on_path = shutil.which("consul")
    if on_path and (consul_version(on_path) or (0, 0)) >= MIN_VERSION:
        print(f"fetch-consul: using {on_path} from PATH")
        return 0
    if target.exists() and consul_version(str(target)):
        return 0
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        print(f"fetch-consul: no consul >= 1.8 on PATH and no apt-get/dpkg-deb here. {HELP}", file=sys.stderr)
        return 3
    sources = debian_sources()
    if not sources:
        print(f"fetch-consul: no Debian mirror in /etc/apt sources. {HELP}", file=sys.stderr)
        return 3
    errors = []
    for source in sources:
        try:
            extract(fetch_deb(tools, source), target)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
            errors.append(f"{source.uri}: {err}")
            continue
        print(f"fetch-consul: {target} ({'.'.join(map(str, consul_version(str(target)) or ()))})")
        return 0
    print("fetch-consul: could not fetch Debian's consul package: " + "; ".join(errors), file=sys.stderr)
    print(HELP, file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
