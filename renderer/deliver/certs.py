"""TLS certificates from Consul KV, served by SNI, rotated in the running HAProxy with no reload.

Each key under the prefix (`certs`, e.g. `haproxy/certs/`) holds one PEM bundle: the certificate,
its chain and the private key. Each is validated (`inspect`) before anything is written or sent:
PEM only, the key matches the certificate, valid now, at least one DNS name. A valid one is
written to `DIR/NAME.pem` with mode 0600 and listed in `DIR/crt-list.txt` (which the template's
`bind … ssl crt-list` reads at a reload); the running HAProxy gets it through the Runtime API:
    new:      new ssl cert P; set ssl cert P <<PEM; commit ssl cert P; add ssl crt-list L P
    changed:  set ssl cert P <<PEM; commit ssl cert P
    removed:  del ssl crt-list L P; del ssl cert P
An invalid one is refused and reported; the one served before keeps serving. The PEM sent is
re-serialised from the parsed objects, so the payload is base64 lines between BEGIN/END lines
only (an empty line would end it early; nothing else can ride along).
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from renderer.deliver.runtime import RuntimeApplyError
from renderer.deliver.write import write_atomically
from renderer.errors import RendererError
from renderer.haproxy import runtime_grammar as words
from renderer.source.dependency import KeyPair

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CRT_LIST = "crt-list.txt"
EXPIRY_WARNING_DAYS = 14


class CertificateError(RendererError):
    """A certificate from KV that cannot be served (it is refused; the old one keeps serving)."""


@dataclass(frozen=True)
class Certificate:
    name: str  # the KV key under the prefix, and the file's stem
    pem: str  # re-serialised: certificates, then the key
    not_after: datetime.datetime
    names: tuple[str, ...]  # DNS names it serves (SNI)
    fingerprint: str  # SHA-256 of the leaf, hex


def inspect(name: str, text: str, now: datetime.datetime | None = None) -> Certificate:
    """The certificate a KV value holds, validated; CertificateError naming the key and why. Any
    error reading it is that one key's refusal: a certificate the library cannot take (two
    subjectAltName extensions raise x509.DuplicateExtension) must not stop the others."""
    try:
        return _inspect(name, text, now)
    except CertificateError:
        raise
    except Exception as err:
        raise CertificateError(f"certificate {name[:80]!r}: cannot be read ({type(err).__name__}: {err})") from err


def _inspect(name: str, text: str, now: datetime.datetime | None) -> Certificate:
    if not _NAME.fullmatch(name):
        raise CertificateError(f"certificate key {name[:80]!r}: not a file name ([A-Za-z0-9._-], ≤ 100)")
    data = text.encode()
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise CertificateError(f"certificate {name}: no PEM certificate ({err})") from err
    key = _private_key(name, data)
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise CertificateError(f"certificate {name}: the private key does not match the certificate")
    now = now or datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc:
        raise CertificateError(f"certificate {name}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
    if now >= leaf.not_valid_after_utc:
        raise CertificateError(f"certificate {name}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    names = _dns_names(leaf)
    if not names:
        raise CertificateError(f"certificate {name}: no DNS name (subjectAltName or CN) to serve by SNI")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    return Certificate(name, pem.decode(), leaf.not_valid_after_utc, names, fingerprint)


def _private_key(name: str, data: bytes) -> CertificateIssuerPrivateKeyTypes:
    match = re.search(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.*?-----END (?:[A-Z]+ )?PRIVATE KEY-----", data, re.S)
    if match is None:
        raise CertificateError(f"certificate {name}: no private key in the bundle (PEM: certificate, chain, key)")
    try:
        key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"certificate {name}: the private key cannot be read ({err})") from err
    return key  # type: ignore[return-value]


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(sorted(set(names)))


class RuntimeCommands(Protocol):
    """What certificate updates need of HAProxy's Runtime API (control.RuntimeAPI has it)."""

    def command(self, command: words.Command) -> str: ...


@dataclass
class CertificateSync:
    """Keeps DIR and the running HAProxy serving exactly the valid certificates under a KV prefix."""

    directory: Path
    runtime: RuntimeCommands | None = None  # None: files only (HAProxy reads them at its next reload)
    served: dict[str, Certificate] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # KV key → why
    _seen: tuple[KeyPair, ...] | None = None  # the KV answer last synced: the same one is no work

    @property
    def crt_list(self) -> Path:
        return self.directory / CRT_LIST

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.pem")

    def prepare(self) -> None:
        """The directory and a crt-list exist before HAProxy first reads its config. Certificates a
        previous run left listed there are what a running HAProxy loaded: they count as served."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.crt_list.exists():
            self._write_list()
            return
        for line in self.crt_list.read_text().splitlines():
            path = Path(line.strip())
            if path.parent == self.directory and path.suffix == ".pem" and path.is_file():
                try:
                    self.served[path.stem] = inspect(path.stem, path.read_text())
                except CertificateError as err:
                    log.warning("certificate file %s left from an earlier run is not valid: %s", path, err)

    def sync(self, pairs: tuple[KeyPair, ...]) -> list[str]:
        """Serve exactly the valid certificates in `pairs`; returns what changed, for the log.
        A refused one keeps the last valid version of its key serving. RuntimeApplyError (from
        the Runtime API) means HAProxy's state is unknown: the caller reloads."""
        if pairs == self._seen:
            return []  # the loop syncs at every render; certificates are parsed only when they change
        wanted: dict[str, Certificate] = {}
        self.refused = {}
        for pair in pairs:
            try:
                wanted[pair.key] = inspect(pair.key, pair.value)
            except CertificateError as err:
                self.refused[pair.key] = str(err)
                if pair.key in self.served:
                    wanted[pair.key] = self.served[pair.key]  # the old one keeps serving
        changes = [self._add(c) for n, c in sorted(wanted.items()) if n not in self.served]
        changes += [self._replace(c) for n, c in sorted(wanted.items()) if n in self.served and c != self.served[n]]
        changes += [self._remove(n) for n in sorted(set(self.served) - set(wanted))]
        if changes:
            self._write_list()
        self._seen = pairs  # only once all of it went through (a refused step makes the next sync redo it)
        return changes

    def _add(self, cert: Certificate) -> str:
        path = self._write(cert)
        if self.runtime is not None:
            self._send(words.command("new", "ssl", "cert", path), "New empty certificate store")
            self._upload(cert, path)
            self._send(words.command("add", "ssl", "crt-list", str(self.crt_list), path), "Success!")
        self.served[cert.name] = cert
        return f"added {cert.name} ({', '.join(cert.names)}; until {cert.not_after:%Y-%m-%d})"

    def _replace(self, cert: Certificate) -> str:
        path = self._write(cert)
        if self.runtime is not None:
            self._upload(cert, path)
        self.served[cert.name] = cert
        return f"rotated {cert.name} ({', '.join(cert.names)}; until {cert.not_after:%Y-%m-%d})"

    def _remove(self, name: str) -> str:
        path = self.path(name)
        if self.runtime is not None:
            self._send(words.command("del", "ssl", "crt-list", str(self.crt_list), path), "Success!")
            self._send(words.command("del", "ssl", "cert", path), "deleted")
        Path(path).unlink(missing_ok=True)
        del self.served[name]
        return f"removed {name}"

    def _upload(self, cert: Certificate, path: str) -> None:
        self._send(words.payload_command(cert.pem, "set", "ssl", "cert", path), "Transaction created")
        self._send(words.command("commit", "ssl", "cert", path), "Success!")

    def _send(self, command: words.Command, expect: str) -> None:
        assert self.runtime is not None
        answer = self.runtime.command(command).strip()
        if expect not in answer:
            raise RuntimeApplyError(f"runtime API refused `{command.splitlines()[0]}`: {answer[:300] or '(no answer)'}")

    def _write(self, cert: Certificate) -> str:
        path = self.path(cert.name)
        write_atomically(Path(path), cert.pem, None, 0o600, False)
        return path

    def _write_list(self) -> None:
        lines = "".join(f"{self.path(name)}\n" for name in sorted(self.served))
        write_atomically(self.crt_list, lines, None, 0o600, False)

    def expiries(self, now: datetime.datetime | None = None) -> dict[str, float]:
        """Seconds until each served certificate expires."""
        now = now or datetime.datetime.now(datetime.UTC)
        return {name: (c.not_after - now).total_seconds() for name, c in sorted(self.served.items())}
