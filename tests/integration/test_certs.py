"""TLS certificates from Consul KV rotated in a running HAProxy under TLS load: no reload, no failed
handshake or request, the new certificate served within milliseconds of the KV write; an invalid
one (a key that does not match, a weak key) refused while the old one keeps serving, its file
untouched, nothing reloaded. The figures go to .run/bench/cert-rotation.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa, rsa

from lab import CHECKOUT
from lab.processes import ManagedProcess, free_port, get_json, http_get, wait_until
from lab.stack import LocalStack
from lab.webapp import WebApp
from renderer.deliver.certs import read_bundle
from renderer.haproxy.control import MasterCLI
from renderer.haproxy.runtime_grammar import payload_command
from tests.helpers import consul_client, register, reloads, start_stack
from tests.unit.test_certs import bundle, many_names

pytestmark = pytest.mark.integration

ROTATIONS = 30
SNI = "site.test"


def served_fingerprint(port: int, sni: str = SNI) -> str:
    """SHA-256 of the certificate HAProxy presents for SNI `sni` on a new connection."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def start_tls_stack(
    tmp_path: Path,
    agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    certs: Path,
    https: int,
) -> LocalStack:
    """The stack serving TLS on `https` with the certificates under KV `haproxy/certs/`, kept in `certs`."""
    extra = ("--certs", f"haproxy/certs:{certs}", "--var", f"https_port={https}")
    return start_stack(
        tmp_path, agent, haproxy_bin, track, extra=(*extra, "--var", f"crt_list={certs / 'crt-list.txt'}")
    )


def serving(
    tmp_path: Path,
    agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
    first: str,
) -> tuple[Any, Path, int, LocalStack]:
    """(KV, the certificate directory, the HTTPS port, the stack) once `first` is served for SNI."""
    register(agent, backends("web-0"))
    kv = consul_client(agent).kv
    kv.put("haproxy/certs/site.test", first)
    certs, https = tmp_path / "certs", free_port()
    stack = start_tls_stack(tmp_path, agent, haproxy_bin, track, certs, https)
    wait_until(lambda: served_fingerprint(https) == _fingerprint(first), 30, "the first certificate served")
    return kv, certs, https, stack


@contextlib.contextmanager
def under_load(https: int) -> Iterator[TLSLoad]:
    """New TLS connections back to back on `https` while the block runs (see TLSLoad)."""
    load = TLSLoad(https)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        yield load
    finally:
        load.stop()
        thread.join(10)


@dataclass
class TLSLoad:
    """New TLS connections back to back, each a full request; every failure kept."""

    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        request = f"GET / HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
        while not self._stop.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    context.wrap_socket(raw, server_hostname=SNI) as tls,
                ):
                    tls.sendall(request)
                    answer = tls.recv(65536)
                if not answer.startswith(b"HTTP/1.1 200"):
                    self.failures.append(answer[:60].decode(errors="replace"))
                else:
                    self.ok += 1
            except OSError as err:
                self.failures.append(repr(err))

    def stop(self) -> None:
        self._stop.set()


def test_certificates_rotate_from_kv_under_tls_load_with_no_reload(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    bundles = [bundle(SNI) for _ in range(ROTATIONS + 1)]
    kv, certs, https, stack = serving(tmp_path, consul_agent, haproxy_bin, track, backends, bundles[0])
    fingerprints = [_fingerprint(b) for b in bundles]
    status = f"http://127.0.0.1:{stack.status_port}/status"
    reloads_before = reloads(stack)
    seen_ms: list[float] = []
    with under_load(https) as load:
        for n in range(1, ROTATIONS + 1):
            written = time.monotonic()
            kv.put("haproxy/certs/site.test", bundles[n])
            wait_until(lambda n=n: served_fingerprint(https) == fingerprints[n], 10, f"rotation {n}", interval=0.002)
            seen_ms.append(round((time.monotonic() - written) * 1000, 1))
            time.sleep(0.1)
        # An invalid one (its key does not match) is refused; the last valid one keeps serving.
        wrong = bundle(SNI).split("-----BEGIN PRIVATE KEY-----")[0] + bundles[0].split("-----END CERTIFICATE-----\n")[1]
        kv.put("haproxy/certs/site.test", wrong)
        wait_until(lambda: "does not match" in json.dumps(get_json(status)), 20, "the refusal reported")
        assert served_fingerprint(https) == fingerprints[ROTATIONS]
        # A second certificate added, then deleted from KV: both through the Runtime API. HAProxy
        # 2.8 answers `del ssl crt-list` with "Entry … deleted in crtlist …!"; taken for a refusal,
        # every removal reloaded HAProxy.
        other = bundle("other.test")
        kv.put("haproxy/certs/other.test", other)
        wait_until(lambda: served_fingerprint(https, "other.test") == _fingerprint(other), 20, "other.test added")
        kv.delete("haproxy/certs/other.test")
        wait_until(lambda: served_fingerprint(https, "other.test") != _fingerprint(other), 20, "other.test removed")
        wait_until(lambda: not (certs / "other.test.pem").exists(), 10, "other.test's file deleted")
    assert load.failures == [], load.failures[:5]
    assert load.ok > ROTATIONS
    assert reloads(stack) == reloads_before, "a rotation, an addition or a removal reloaded HAProxy"
    assert (certs / "site.test.pem").stat().st_mode & 0o777 == 0o600
    metrics = http_get(f"http://127.0.0.1:{stack.status_port}/metrics")[1]
    assert 'consul_renderer_certificate_expiry_seconds{name="site.test"}' in metrics
    figures = {
        "rotations": len(seen_ms), "kv_write_to_served_ms": {
            "median": statistics.median(seen_ms), "max": max(seen_ms), "all": seen_ms},
        "tls_requests": load.ok, "failed": len(load.failures), "reloads": reloads(stack) - reloads_before,
    }  # fmt: skip
    out = CHECKOUT / ".run" / "bench" / "cert-rotation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\ncertificate rotation: {json.dumps(figures)}")


def _fingerprint(pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex()


def test_a_weak_key_is_refused_the_old_certificate_keeps_serving_and_a_good_rotation_follows(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    """HAProxy itself takes a 1024-bit RSA key (`set ssl cert` + `commit` answer Success, measured
    on 2.8): the renderer refuses it before anything is sent or written. Before, it was served."""
    old, weak, new = bundle(SNI), bundle(SNI, key=rsa.generate_private_key(65537, 1024)), bundle(SNI)
    kv, certs, https, stack = serving(tmp_path, consul_agent, haproxy_bin, track, backends, old)
    status = f"http://127.0.0.1:{stack.status_port}/status"
    reloads_before = reloads(stack)
    with under_load(https) as load:
        kv.put("haproxy/certs/site.test", weak)
        wait_until(lambda: "RSA key of 1024 bits" in json.dumps(get_json(status)), 20, "the weak key reported")
        time.sleep(0.5)  # a wrong rotation would be served by now (a good one takes milliseconds)
        assert served_fingerprint(https) == _fingerprint(old)
        assert _fingerprint((certs / "site.test.pem").read_text()) == _fingerprint(old)
        assert "issue a 2048-bit or larger key" in json.dumps(get_json(status))
        kv.put("haproxy/certs/site.test", new)
        wait_until(lambda: served_fingerprint(https) == _fingerprint(new), 10, "the good rotation", interval=0.002)
        wait_until(lambda: _fingerprint((certs / "site.test.pem").read_text()) == _fingerprint(new), 5, "its file")
        wait_until(lambda: "RSA key of 1024" not in json.dumps(get_json(status)), 10, "the refusal cleared")
    assert load.failures == [], load.failures[:5]
    assert load.ok > 0
    assert reloads(stack) == reloads_before, "the refused certificate or the rotation reloaded HAProxy"


def test_at_start_weak_certificates_are_left_out_and_the_others_served(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    """A DSA certificate in KV, and a weak one an earlier run left listed in the crt-list, are left
    out (unlisted) when HAProxy first reads its config: the good one is served, the two reported.
    Before, both were listed and HAProxy served them for their names."""
    register(consul_agent, backends("web-0"))
    kv = consul_client(consul_agent).kv
    good, weak = bundle(SNI), bundle("weak.test", key=dsa.generate_private_key(2048))
    kv.put("haproxy/certs/site.test", good)
    kv.put("haproxy/certs/weak", weak)
    certs, https = tmp_path / "certs", free_port()
    certs.mkdir(mode=0o700)
    left = bundle("old.test", key=rsa.generate_private_key(65537, 1024))
    (certs / "old.pem").write_text(left)
    (certs / "crt-list.txt").write_text(f"{certs / 'old.pem'}\n")
    stack = start_tls_stack(tmp_path, consul_agent, haproxy_bin, track, certs, https)
    wait_until(lambda: served_fingerprint(https) == _fingerprint(good), 30, "the good certificate served")
    assert served_fingerprint(https, "weak.test") == _fingerprint(good)  # the default one, not the DSA one
    assert served_fingerprint(https, "old.test") == _fingerprint(good)
    assert (certs / "crt-list.txt").read_text() == f"{certs / 'site.test.pem'}\n"
    assert not (certs / "weak.pem").exists()
    status = json.dumps(get_json(f"http://127.0.0.1:{stack.status_port}/status"))
    assert "DSA key: issue an RSA" in status
    assert "RSA key of 1024 bits" in (tmp_path / "once.log").read_text()  # the first run unlisted it


@pytest.mark.parametrize("left_open", ["the same file", "another file"])
def test_a_transaction_left_open_in_haproxy_does_not_refuse_a_rotation(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
    left_open: str,
) -> None:
    """A `set ssl cert` with no `commit` after it (a run stopped between the two, or an operator by
    hand) leaves a transaction open in HAProxy. For the same file, HAProxy answers the next `set`
    "Transaction updated": the rotation goes through with no reload. For another file it answers
    "The ongoing transaction is about …": HAProxy is reloaded (which ends the transaction) and the
    rotation offered again. Before, both answers were taken for HAProxy refusing the certificate:
    refused and reported until its KV value changed, the old one served."""
    old, new, other = bundle(SNI), bundle(SNI), bundle("other.test")
    kv, certs, https, stack = serving(tmp_path, consul_agent, haproxy_bin, track, backends, old)
    kv.put("haproxy/certs/other.test", other)
    wait_until(lambda: served_fingerprint(https, "other.test") == _fingerprint(other), 10, "other.test served")
    opened = certs / ("site.test.pem" if left_open == "the same file" else "other.test.pem")
    payload = other if left_open == "another file" else bundle(SNI)
    answer = MasterCLI(str(stack.master_socket)).worker_command(f"set ssl cert {opened} <<\n{payload}\n")
    assert "Transaction created" in answer, answer
    reloads_before = reloads(stack)
    kv.put("haproxy/certs/site.test", new)
    wait_until(lambda: served_fingerprint(https) == _fingerprint(new), 20, "the rotation served", interval=0.01)
    wait_until(lambda: _fingerprint((certs / "site.test.pem").read_text()) == _fingerprint(new), 5, "its file")
    assert "HAProxy refused" not in json.dumps(get_json(f"http://127.0.0.1:{stack.status_port}/status"))
    assert served_fingerprint(https, "other.test") == _fingerprint(other)
    assert reloads(stack) - reloads_before == (0 if left_open == "the same file" else 1)


def test_a_certificate_beyond_the_cli_buffer_is_rotated_by_a_graceful_reload(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    """HAProxy answers a `set ssl cert` longer than its buffer (16 KiB) "too big for the buffer
    size": such a bundle was refused and could never be rotated. It goes in by its checked file and
    a graceful reload: served, no refusal reported, no TLS request failed."""
    old, big = bundle(SNI), bundle(SNI, also=tuple(f"host{n:04d}.{SNI}" for n in range(600)))
    assert len(big) > 16 * 1024
    kv, certs, https, stack = serving(tmp_path, consul_agent, haproxy_bin, track, backends, old)
    status = f"http://127.0.0.1:{stack.status_port}/status"
    reloads_before = reloads(stack)
    with under_load(https) as load:
        kv.put("haproxy/certs/site.test", big)
        wait_until(lambda: served_fingerprint(https) == _fingerprint(big), 30, "the large certificate served")
        assert _fingerprint((certs / "site.test.pem").read_text()) == _fingerprint(big)
        wait_until(lambda: "certificates not taken" not in json.dumps(get_json(status)), 10, "no note left")
        assert "refused" not in json.dumps(get_json(status)["certificate_notes"])
    assert load.failures == [], load.failures[:5]
    # The new worker serves a moment before the renderer counts the reload it asked for.
    wait_until(lambda: reloads(stack) > reloads_before, 10, "the reload counted")
    assert load.ok > 0


def filling_the_buffer(certs: Path, length: int) -> tuple[str, str]:
    """(a KV key, a valid bundle) whose `set ssl cert`, as the renderer builds it, is `length` bytes:
    a bundle of many names, then a key name of the length left (1-100 characters)."""
    for count in range(560, 700):
        value = many_names(count)
        pem = read_bundle("k", value).pem
        left = length - len(payload_command(pem, "set", "ssl", "cert", f"{certs}/.pem"))
        if 1 <= left <= 100:
            return "k" * left, value
    raise AssertionError(f"no bundle of 560-700 names comes within 100 bytes of {length}")


def test_a_certificate_that_would_fill_the_cli_buffer_is_served_by_a_reload_and_haproxy_stays_up(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    """helper-139 (/tmp/rev85, `kv_crash.py`): a valid bundle whose `set ssl cert` is exactly HAProxy's
    buffer less one byte (16,383 at the default 16,384; its key name's length tunes it) was sent,
    never answered, and HAProxy 2.8.25 aborted its worker and, master-worker, its master: one KV
    write took HAProxy down. It is not sent now (CLI_RESERVE): it goes in by its file and a reload."""
    kv, certs, https, stack = serving(tmp_path, consul_agent, haproxy_bin, track, backends, bundle(SNI))
    key, value = filling_the_buffer(certs, 16383)
    reloads_before = reloads(stack)
    kv.put(f"haproxy/certs/{key}", value)
    wait_until(lambda: served_fingerprint(https, f"h00001.{SNI}") == _fingerprint(value), 30, "served")
    assert stack.haproxy.popen.poll() is None, "HAProxy exited"
    assert served_fingerprint(https) != _fingerprint(value)  # site.test: the first one still
    wait_until(lambda: reloads(stack) > reloads_before, 10, "the reload counted")
