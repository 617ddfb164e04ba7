"""Fetching a tool from Debian's packages into .tools, without touching the system's apt state.

`apt-get download` from the Debian mirror this machine's own apt sources name (never one named
here), for a given suite, through a private sources list and private lists and cache directories
under .tools/apt/<suite>; then one file unpacked with `dpkg-deb`. Used by fetch_consul.py (Consul
1.8.7 from bullseye) and fetch_wrk.py (the bench's load generator from this machine's release).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class AptSource:
    uri: str
    keyring: str | None


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


def fetch_debs(tools: Path, source: AptSource, suite: str, packages: list[str], tag: str) -> list[Path]:
    """Download `packages` from `source`'s mirror for `suite` through private apt lists under
    `tools`/apt/`suite` (the system's apt state untouched); the .deb files, in `packages`' order."""
    apt = tools / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    keyring = source.keyring if source.keyring and os.path.exists(source.keyring) else DEFAULT_KEYRING
    signed = f"[signed-by={keyring}]" if os.path.exists(keyring) else "[trusted=yes]"
    (apt / "etc/sources.list").write_text(f"deb {signed} {source.uri} {suite} main\n")
    opts = [
        f"-oDir::Etc::SourceList={apt}/etc/sources.list",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt}/lists",
        f"-oDir::Cache={apt}/cache",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=" + ("root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")),
        "-qq",
    ]
    print(f"{tag}: apt-get update (private lists, suite {suite})", flush=True)
    subprocess.run(["apt-get", *opts, "update"], check=True, timeout=600)
    download = apt / "download"
    download.mkdir(exist_ok=True)
    print(f"{tag}: apt-get download {' '.join(packages)}", flush=True)
    subprocess.run(["apt-get", *opts, "download", *packages], check=True, timeout=600, cwd=download)
    debs = []
    for package in packages:
        found = sorted(download.glob(f"{package}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package} produced no .deb")
        debs.append(found[-1])
    return debs


def extract_member(deb: Path, member: str, dest: Path) -> None:
    """Unpack one file of `deb` to `dest`: `member` is its path inside the package, or a glob
    pattern for it (`usr/lib/*/libfoo.so.2`: the multiarch directory); symlinks are followed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, timeout=120)
        found = sorted(Path(tmp).glob(member))
        if not found:
            raise RuntimeError(f"{deb.name} has no {member}")
        shutil.copyfile(found[0].resolve(), dest)
        dest.chmod(0o755)


def system_suite() -> str | None:
    """This machine's Debian release name (`bookworm`) from /etc/os-release, if it is Debian."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if fields.get("ID", "").strip('"') != "debian":
        return None
    suite = fields.get("VERSION_CODENAME", "").strip('"')
    return suite if _is_main_debian_suite(suite) else None


def can_fetch() -> bool:
    return bool(shutil.which("apt-get") and shutil.which("dpkg-deb"))
