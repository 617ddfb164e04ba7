"""A private Docker engine for tests: Debian's docker.io, our own dockerd, an image from a local rootfs.

No image can be pulled here, so the image is `docker import` of a folder holding Debian's static
busybox (it serves HTTP with `busybox httpd`). dockerd runs with vfs storage, no iptables and no
bridge, with its own data root, exec root and socket, so it never touches another engine.
Containers use `--network host`. Needs root; tests skip (saying so) without it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lab.processes import NOT_YET, ManagedProcess, spawn, wait_until

IMAGE = "consul-renderer-test/busybox:latest"
DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker here is another client
DOCKERD = "/usr/sbin/dockerd"  # Debian's docker.io


@dataclass
class Engine:
    process: ManagedProcess
    socket: Path
    command: list[str]
    log_path: Path
    lock: IO[bytes] | None = None  # held while a shared data root is in use (dockerd holds it too)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def inherited(self) -> tuple[int, ...]:
        """The lock's descriptor, for dockerd to inherit: the data root stays claimed while dockerd
        lives, even if this process dies first (a cancelled CI job) or fails to stop it."""
        return (self.lock.fileno(),) if self.lock is not None else ()

    def stop(self, timeout: float = 30) -> None:
        """Stop dockerd and let go of the data root (dockerd's inherited copy goes with dockerd)."""
        try:
            self.process.stop(timeout=timeout)
        finally:
            if self.lock is not None:
                self.lock.close()
                self.lock = None

    def restart(self) -> None:
        """Stop dockerd (its containers die with it: no live-restore) and start it again."""
        self.process.stop(timeout=30)
        self.process = spawn("dockerd", self.command, self.log_path, pass_fds=self.inherited)
        wait_for_dockerd(self, self.process)

    def docker(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [DOCKER, "-H", self.url, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise DockerCommandError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()


class DockerCommandError(RuntimeError):
    """A docker CLI command failed (while dockerd starts: "not yet", see DOCKERD_STARTING)."""


# What a wait for a starting dockerd retries: its CLI failing, besides the usual "not yet".
DOCKERD_STARTING = (*NOT_YET, DockerCommandError)


def wait_for_dockerd(engine: Engine, proc: ManagedProcess) -> None:
    """Until the daemon answers `docker info` (its CLI fails meanwhile: that is "not yet")."""
    version = ("info", "--format", "{{.ServerVersion}}")
    wait_until(lambda: proc.alive() and engine.docker(*version), 90, "dockerd", not_yet=DOCKERD_STARTING)


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start its own dockerd (CI runs as root)"
    if not shutil.which("apt-get") and not os.path.exists(DOCKERD):
        return "no dockerd and no apt-get to install Debian's docker.io"
    return None


def _apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900, check=True)
        subprocess.run(install, env=env, capture_output=True, timeout=900, check=True)


def ensure_packages() -> None:
    missing = [
        pkg for pkg, path in (("docker.io", DOCKERD), ("busybox-static", "/bin/busybox")) if not os.path.exists(path)
    ]
    if missing:
        _apt_install(*missing)


def start_engine(workdir: Path) -> Engine:
    ensure_packages()
    # A short socket path: UNIX socket paths are limited to ~108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="crd-"))
    sock = run_dir / "docker.sock"
    cmd = [
        DOCKERD, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
        "--data-root", str(workdir / "data"), "--exec-root", str(run_dir / "exec"), "-H", f"unix://{sock}",
        "--pidfile", str(run_dir / "dockerd.pid"),
    ]  # fmt: skip
    proc = spawn("dockerd", cmd, workdir / "dockerd.log")
    engine = Engine(proc, sock, cmd, workdir / "dockerd.log")
    try:
        wait_for_dockerd(engine, proc)
        import_image(engine, workdir)
    except BaseException:
        proc.stop(timeout=15)
        raise
    return engine


def import_image(engine: Engine, workdir: Path) -> None:
    """`docker import` a rootfs with static busybox and a /www to serve."""
    rootfs = workdir / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    (rootfs / "www").mkdir(exist_ok=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for tool in ("sh", "httpd", "sleep", "cat"):
        link = rootfs / "bin" / tool
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "www" / "index.html").write_text("busybox\n")
    (rootfs / "www" / "health").write_text("ok\n")
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    engine.docker("import", str(archive), IMAGE)


# The compose engine keeps its data root outside the clone, so images (the stand-ins and the built
# ones, with their layer cache) survive from one run to the next: a second run builds nothing.
COMPOSE_DATA_ROOT = Path(os.environ.get("CONSUL_RENDERER_DOCKER_ROOT", "/var/lib/consul-renderer-tests/docker"))


def start_compose_engine(workdir: Path) -> Engine:
    """A dockerd as a user has it: overlay2, iptables and its default bridge (compose networks,
    container DNS and published ports), with its own data root, exec root and socket."""
    ensure_packages()
    lock = claim_data_root(COMPOSE_DATA_ROOT)
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="crc-"))
        sock = run_dir / "docker.sock"
        COMPOSE_DATA_ROOT.mkdir(parents=True, exist_ok=True)
        cmd = [
            DOCKERD, "--storage-driver=overlay2", "--data-root", str(COMPOSE_DATA_ROOT),
            "--exec-root", str(run_dir / "exec"), "-H", f"unix://{sock}", "--pidfile", str(run_dir / "dockerd.pid"),
        ]  # fmt: skip
        proc = spawn("dockerd-compose", cmd, workdir / "dockerd.log", pass_fds=(lock.fileno(),))
    except BaseException:
        lock.close()
        raise
    engine = Engine(proc, sock, cmd, workdir / "dockerd.log", lock)
    try:
        wait_for_dockerd(engine, proc)
    except BaseException:
        engine.stop(timeout=15)
        raise
    return engine


def claim_data_root(root: Path) -> IO[bytes]:
    """An exclusive lock on `root` for this run, held until the returned file is closed (or this
    process dies) and every process it was passed to (dockerd) has ended: two dockerds on one data
    root would corrupt each other's images and containers, so a second test run at the same time
    fails here, saying so, and harms nothing."""
    root.parent.mkdir(parents=True, exist_ok=True)
    handle = open(root.with_name(root.name + ".lock"), "wb")  # noqa: SIM115 (held open: it is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(
            f"another test run's dockerd uses {root}; wait for it to end, or set "
            "CONSUL_RENDERER_DOCKER_ROOT to another folder for this run"
        ) from None
    return handle
