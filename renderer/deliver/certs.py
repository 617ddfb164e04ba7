"""TLS certificates from Consul KV, served by SNI, rotated in the running HAProxy with no reload.

Each key under the prefix (`certs`, e.g. `haproxy/certs/`) holds one PEM bundle: the certificate,
its chain and the private key. Each is validated (`inspect`) before anything is written or sent:
PEM only, the key matches the certificate, valid now, at least one DNS name, no weak key in the
leaf or the chain (RSA under 2048 bits, DSA, EC off P-256/P-384/P-521), no MD5 or SHA-1 signature
but a self-signed root's. The running HAProxy gets a valid one through the Runtime API:
    new:      new ssl cert P; set ssl cert P <<PEM; commit ssl cert P; add ssl crt-list L P
    changed:  set ssl cert P <<PEM; commit ssl cert P
    removed:  del ssl crt-list L P; del ssl cert P
(a new one HAProxy takes into a store but refuses into the list's SSL contexts is deleted again)
and only once HAProxy committed it is it written to `DIR/NAME.pem` (mode 0600) and listed in
`DIR/crt-list.txt`, which the template's `bind … ssl crt-list` reads at a reload. With no Runtime
API (HAProxy not started yet, or reloads only), the staged file must pass `haproxy -c` first.
An invalid one, or one HAProxy refuses, is refused alone and reported; the one served before keeps
serving, and nothing is reloaded for it. The PEM sent is
re-serialised from the parsed objects, so the payload is base64 lines between BEGIN/END lines
only (an empty line would end it early; nothing else can ride along).
"""

from __future__ import annotations

import collections
import datetime
import functools
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from publicsuffixlist import PublicSuffixList

from renderer.deliver.runtime import RuntimeApplyError
from renderer.deliver.write import Validator, write_atomically
from renderer.errors import RendererError, ValidationError
from renderer.haproxy import runtime_grammar as words
from renderer.haproxy.control import check_config
from renderer.source.dependency import KeyPair, shown_name, unsafe_char

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CRT_LIST = "crt-list.txt"
EXPIRY_WARNING_DAYS = 14
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_CHAIN = 10  # a leaf and its intermediates; no real chain comes near
MAX_BUNDLE_BYTES = 128 * 1024  # a value's size: a chain of ten with hundreds of names each stays far below
_KEY_BEGIN = re.compile(rb"-----BEGIN (?:[A-Z]{1,16} )?PRIVATE KEY-----")
_KEY_END = re.compile(rb"-----END (?:[A-Z]{1,16} )?PRIVATE KEY-----")
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"  # `_` too: internal names (my_host.corp.local) carry it
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$)(?:\*\.{_LABEL}\.{_LABEL}(?:\.{_LABEL})*|{_LABEL}(?:\.{_LABEL})*)\.?")
EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
# `set ssl cert P` answers (HAProxy 2.8): "Transaction created for certificate P!", or "Transaction
# updated …" when a transaction for P was open already (left by a run stopped between its `set` and
# its `commit`): ours replaces its payload either way. A transaction open for another file Q:
# "The ongoing transaction is about 'Q' but you are trying to set 'P'" (also `commit`'s answer).
SET_TAKEN = ("Transaction created", "Transaction updated")
OTHER_TRANSACTION = "ongoing transaction is about"
# `del ssl crt-list` of a list's first certificate, on a bind without strict-sni (HAProxy 2.8.25):
# "Can't delete the entry: certificate '…' cannot be deleted, it is used as default certificate by …"
USED_AS_DEFAULT = "used as default certificate"
# HAProxy 2.8's answer to a command longer than its buffer (measured: a 24 KB bundle of 600 names).
TOO_BIG = "too big for the buffer size"
# The master CLI's answer when it could not hand a command to the worker (seen for payloads beyond
# the buffer, 6 of 20 at 74 KB; helper-136, /tmp/rev82): HAProxy said nothing of the certificate.
NO_TARGET = "Can't connect to the target CLI"
ANSWER_SHOWN = 300  # characters of an answer a message quotes (matched whole: see `_answer`)
# HAProxy's CLI buffer is `tune.bufsize`, which `show pools` tells as its buffer pool's size (the
# config may set it in a file or an `.if` block the renderer never sees): asked at each sync that
# sends a certificate. A dump without that line (HAProxy merges pools of one size under the first
# one's name: tune.bufsize 1304 showed none, helper-140) sends no payload at all; an answer that is
# no dump leaves HAProxy's state unknown (see `_cli_buffer`).
_BUFFER_POOL = re.compile(r"Pool buffer \(([0-9]{1,10}) bytes\)")
POOLS_DUMP = "Dumping pools"
# A payload line ending at exactly the buffer's size less one byte, with more to follow, is never
# answered, and HAProxy 2.8.25 then aborts the worker ("A bogus APPCTX … is spinning", exit 132)
# and, in master-worker mode, the master with it (helper-139, /tmp/rev85: one KV value of the right
# length took HAProxy down; helper-140, /tmp/rev86: also at lengths past the buffer, one in ~65):
# a command comes no closer to the buffer than this, and every length below it was answered.
CLI_RESERVE = 64
# Certificates served from the prefix, at most (`certs_max`): 45,000 valid ones took the renderer
# minutes to take in and made every `haproxy -c` of a config change time out (30 s), so no
# registration was served any more; 30,000 made HAProxy's reload take more than 30 s (helper-136,
# /tmp/rev82). Past it, the keys not served yet are refused, in key order.
MAX_CERTIFICATES = 1000
# A sync's Runtime API work (and its parsing of new values) stops after this long and goes on at
# the next pass, which delivers the catalog's changes first: a write of 2,000 certificates held a
# new instance back 7.5 s, of 6,000 14.1 s (each certificate 3-12 ms of Runtime API; helper-136).
SYNC_SLICE_S = 0.5
_STRONG_KEYS = "an RSA (2048 bits or more), ECDSA (P-256, P-384 or P-521) or Ed25519 key"


class CertificateError(RendererError):
    """A certificate from KV that cannot be served (it is refused; the old one keeps serving)."""


class BeyondBuffer(CertificateError):
    """HAProxy's CLI buffer (`tune.bufsize`, 16 KiB by default) cannot carry the certificate's
    `set ssl cert`: it goes in by file and a reload (`CertificateSync.at_reload`)."""


@dataclass(frozen=True)
class Certificate:
    name: str  # the KV key under the prefix, and the file's stem
    pem: str  # re-serialised: certificates, then the key
    not_after: datetime.datetime
    names: tuple[str, ...]  # DNS names it serves (SNI)
    fingerprint: str  # SHA-256 of the leaf, hex
    not_before: datetime.datetime | None = None


def inspect(name: str, text: str, now: datetime.datetime | None = None) -> Certificate:
    """The certificate a KV value holds, validated; CertificateError naming the key and why."""
    return _within_dates(read_bundle(name, text), now or datetime.datetime.now(datetime.UTC))


def read_bundle(name: str, text: str) -> Certificate:
    """`inspect` but for the dates (see `parse_bundle`). Any error reading it is that one key's
    refusal: a certificate the library cannot take (two subjectAltName extensions raise
    x509.DuplicateExtension) must not stop the others."""
    try:
        return parse_bundle(name, text)
    except CertificateError:
        raise
    except Exception as err:
        raise CertificateError(f"certificate {name[:80]!r}: cannot be read ({type(err).__name__}: {err})") from err


def parse_bundle(name: str, text: str) -> Certificate:
    """Everything `inspect` checks but the dates, which the clock changes (so this result may be
    kept while the value is the same). The public keys are checked before the private key is
    loaded: an 8,192-bit RSA key took 5.3 s to load with OpenSSL's key validation, 16,384 far more,
    and one KV value could hold every update that long (the loop waits for the certificates)."""
    if not _NAME.fullmatch(name):
        raise CertificateError(f"certificate key {name[:80]!r}: not a file name ([A-Za-z0-9._-], ≤ 100)")
    data = text.encode()
    if len(data) > MAX_BUNDLE_BYTES:
        raise CertificateError(
            f"certificate {name}: {len(data)} bytes, more than {MAX_BUNDLE_BYTES} (a certificate, its chain "
            "and its key take a few KB)"
        )
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise CertificateError(f"certificate {name}: no PEM certificate ({err})") from err
    if len(chain) > MAX_CHAIN:
        raise CertificateError(f"certificate {name}: a chain of {len(chain)} certificates (at most {MAX_CHAIN})")
    for index, cert in enumerate(chain):
        _check_strength(name, cert, index)
    leaf = chain[0]
    names = _dns_names(name, leaf)
    key = _private_key(name, data)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise CertificateError(f"certificate {name}: the private key does not match the certificate")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    return Certificate(name, pem.decode(), leaf.not_valid_after_utc, names, fingerprint, leaf.not_valid_before_utc)


def _within_dates(cert: Certificate, now: datetime.datetime) -> Certificate:
    if cert.not_before is not None and now < cert.not_before:
        raise CertificateError(f"certificate {cert.name}: not valid before {cert.not_before:%Y-%m-%d %H:%M}Z")
    if now >= cert.not_after:
        raise CertificateError(f"certificate {cert.name}: expired on {cert.not_after:%Y-%m-%d %H:%M}Z")
    return cert


def _private_key(name: str, data: bytes) -> CertificateIssuerPrivateKeyTypes:
    """The bundle's first private key block: its first BEGIN line to the first END line after it,
    each found once. A lazy `BEGIN.*?END` pattern went from every BEGIN line to the end of the
    value: 16,000 BEGIN lines with no END (448 KB) took 30 s holding the GIL, and the whole
    renderer with it, at each new value (an attacker's review, /tmp/rev39)."""
    begin = _KEY_BEGIN.search(data)
    end = _KEY_END.search(data, begin.end()) if begin is not None else None
    if begin is None or end is None:
        raise CertificateError(f"certificate {name}: no private key in the bundle (PEM: certificate, chain, key)")
    try:
        # OpenSSL's RSA key validation (seconds at 8,192 bits) is skipped: the key's public half
        # is compared with the certificate's right after, and its size was bounded through it.
        block = data[begin.start() : end.end()]
        key = serialization.load_pem_private_key(block, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"certificate {name}: the private key cannot be read ({err})") from err
    return key  # type: ignore[return-value]


def _check_strength(name: str, cert: x509.Certificate, index: int) -> None:
    """CertificateError if `cert` (the leaf at index 0, then the chain) has a weak key, or a weak
    signature that someone relies on (a self-signed root's is not: trust in it is configured)."""
    which = "" if index == 0 else f"chain certificate {index + 1} ({shown_name(cert.subject.rfc4514_string()[:80])}): "
    problem = _key_problem(cert.public_key())
    if problem is None and not _self_signed(cert):
        digest = cert.signature_hash_algorithm
        if isinstance(digest, hashes.MD5 | hashes.SHA1):
            problem = f"signed with {digest.name.upper()}: have it signed again with SHA-256 or stronger"
    if problem is not None:
        raise CertificateError(f"certificate {name}: {which}{problem}")


def _self_signed(cert: x509.Certificate) -> bool:
    """Whether `cert` is signed by its own key (a root, whose signature nobody relies on), not merely
    issued by a name equal to its own: OpenSSL refuses a weak digest on any other (`ca md too weak`).
    Verified here with its own parameters (the library's `verify_directly_issued_by` refuses SHA-1)."""
    if cert.issuer != cert.subject:
        return False
    key, signature, signed = cert.public_key(), cert.signature, cert.tbs_certificate_bytes
    try:
        if isinstance(key, rsa.RSAPublicKey):
            padding = cert.signature_algorithm_parameters
            digest = cert.signature_hash_algorithm
            if not isinstance(padding, PKCS1v15 | PSS) or digest is None:
                return False
            key.verify(signature, signed, padding, digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            ecdsa = cert.signature_algorithm_parameters
            if not isinstance(ecdsa, ec.ECDSA):
                return False
            key.verify(signature, signed, ecdsa)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, signed)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _key_problem(key: CertificatePublicKeyTypes) -> str | None:
    """Why a certificate's public key is too weak to serve, with what to issue instead; or None."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits: issue a {MIN_RSA_BITS}-bit or larger key"
        if key.key_size > MAX_RSA_BITS:
            return f"RSA key of {key.key_size} bits: more than {MAX_RSA_BITS} (every handshake would pay for it)"
        return None
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA key: issue {_STRONG_KEYS} (clients no longer accept DSA)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            return f"EC key on curve {key.curve.name}: issue one on P-256, P-384 or P-521"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None
    return f"{type(key).__name__.removeprefix('_')} key: issue {_STRONG_KEYS}"


def _dns_names(name: str, cert: x509.Certificate) -> tuple[str, ...]:
    """The names the certificate serves by SNI: its subjectAltName DNS names and its CN (HAProxy
    takes both from a crt-list line without filters: a CN `*.com` beside a harmless SAN answered
    `bank.com`); each a host name, or a wildcard over two labels or more (never `*` or `*.com`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    for dns in names:
        _check_name(name, dns)
    for common in (str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)):
        # A CN that is no host name ("Acme Internal", "Acme *Test* CA") is no SNI any client sends:
        # it is let be. A wildcard one (HAProxy indexes `*.` names as wildcards) or one with a line
        # break or another control character (it would forge a log line) is checked as a SAN name.
        if _DNS_NAME.fullmatch(common) or common.startswith("*") or unsafe_char(common) is not None:
            names.append(_check_name(name, common))
    if not names:
        raise CertificateError(f"certificate {name}: no DNS name (subjectAltName or CN) to serve by SNI")
    return tuple(sorted(set(names)))


def _check_name(name: str, dns: str) -> str:
    if not _DNS_NAME.fullmatch(dns):
        raise CertificateError(
            f"certificate {name}: {shown_name(dns[:80])} is not a host name or a wildcard over two labels or more"
        )
    if dns.startswith("*.") and _public_suffixes().is_public(parent := dns[2:].rstrip(".").lower()):
        # `*.co.uk` passed the two labels (helper-136, /tmp/rev82): HAProxy answered it for every
        # name under the suffix that no other certificate names, whoever's domain it was.
        raise CertificateError(
            f"certificate {name}: {shown_name(dns)} is a wildcard over the public suffix {parent}, which would answer "
            "for every domain under it, whoever's: name your own domain's hosts"
        )
    return dns


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The public suffix list, both sections: the ICANN one (`co.uk`, `kawasaki.jp`) and the private
    one, whose entries are shared by their owners' tenants (`github.io`, `herokuapp.com`): on a load
    balancer serving several of them, one tenant's `*.github.io` answered for the others' names
    (helper-139). An entry's owner names its own hosts, or wildcards one level deeper. Read once,
    when a wildcard first comes (~40 ms)."""
    return PublicSuffixList()


class RuntimeCommands(Protocol):
    """What certificate updates need of HAProxy's Runtime API (control.RuntimeAPI has it)."""

    def command(self, command: words.Command) -> str: ...


def _cut(answer: str) -> str:
    """An answer for a message: ANSWER_SHOWN characters at most."""
    if not answer:
        return "(no answer)"
    return answer if len(answer) <= ANSWER_SHOWN else answer[:ANSWER_SHOWN] + "…"


def _names_of(cert: Certificate, most: int = 5) -> str:
    """The first DNS names of `cert` for a log line, then how many more (a bundle may carry hundreds)."""
    more = f" and {len(cert.names) - most} more" if len(cert.names) > most else ""
    return ", ".join(cert.names[:most]) + more


def haproxy_check(binary: str | None) -> Validator | None:
    """The check a staged certificate passes before it replaces its file when HAProxy reads it only
    at its next reload (no Runtime API): `haproxy -c` on a config that loads it alone, so that one
    certificate HAProxy cannot load never makes it refuse the whole config. None without a binary."""
    return None if binary is None else functools.partial(_check_with_haproxy, binary)


def _check_with_haproxy(binary: str, staged: Path) -> None:
    config = (
        "defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n"
        f'frontend certificate-check\n    bind 127.0.0.1:1 ssl crt "{staged}"\n'
    )
    with tempfile.NamedTemporaryFile("w", prefix="certificate-check-", suffix=".cfg") as out:
        out.write(config)
        out.flush()
        check_config(binary, out.name)


@dataclass
class CertificateSync:
    """Keeps DIR and the running HAProxy serving exactly the valid certificates under a KV prefix."""

    directory: Path
    runtime: RuntimeCommands | None = None  # None: files only (HAProxy reads them at its next reload)
    haproxy_bin: str | None = None  # its `haproxy -c` is the default `check` (see haproxy_check)
    check: Validator | None = None  # files only: run on a staged certificate before it replaces its file
    served: dict[str, Certificate] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # KV key → why
    reload_needed: str | None = None  # why HAProxy must be reloaded on the list (its default one removed)
    _seen: tuple[KeyPair, ...] | None = None  # the KV answer last synced: the same one is no work
    _valid_from: datetime.datetime | None = None  # the first moment a value refused as not valid yet becomes valid
    clock: Callable[[], datetime.datetime] = field(default=lambda: datetime.datetime.now(datetime.UTC), repr=False)
    _unlisted: dict[str, str] = field(default_factory=dict)  # files left listed by an earlier run, invalid → why
    # (key, value) → what read_bundle made of it, for the values under the prefix now
    _parsed: dict[tuple[str, str], Certificate | str] = field(default_factory=dict)  # str: why it is refused
    limit: int = MAX_CERTIFICATES
    slice_s: float = SYNC_SLICE_S
    beyond: tuple[str, ...] = ()  # the keys under the prefix past `limit`, refused (in key order)
    more: bool = False  # the last sync stopped at its slice: the next pass goes on (`due_at`)
    _buffer: int | None = None  # HAProxy's CLI buffer, asked once a sync (see `_cli_buffer`)

    def __post_init__(self) -> None:
        if self.check is None:
            self.check = haproxy_check(self.haproxy_bin)

    @property
    def crt_list(self) -> Path:
        return self.directory / CRT_LIST

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.pem")

    def prepare(self) -> None:
        """The directory and a crt-list exist before HAProxy first reads its config. Certificates a
        previous run left listed there are what a running HAProxy loaded: valid ones count as
        served; an invalid one (e.g. a weak key an older version took) is unlisted and reported,
        so that HAProxy neither serves it nor refuses the whole list for it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.crt_list.exists():
            self._write_list()
            return
        listed = [line.strip() for line in self.crt_list.read_text(errors="replace").splitlines() if line.strip()]
        for entry in listed:
            self._take_listed(Path(entry))
        if listed and not self.served:
            # Every listed one refused (a key an older version took): an empty list would fail every
            # reload and check on the TLS bind; it stays as it is until a certificate is served.
            log.warning("%s is kept as it is until a valid certificate is in KV: an empty list fails every reload",
                        self.crt_list)  # fmt: skip
            return
        if listed != [self.path(name) for name in self.served]:
            self._write_list()

    def _take_listed(self, path: Path) -> None:
        if path.parent != self.directory or path.suffix != ".pem":
            log.warning(
                "%s listed %s, which is not a certificate file in %s: unlisted", self.crt_list, path, self.directory
            )
            return
        try:
            self.served[path.stem] = inspect(path.stem, path.read_text())
        except OSError as err:
            log.warning("certificate file %s listed by an earlier run cannot be read (%s): unlisted", path, err)
        except (CertificateError, UnicodeDecodeError) as err:
            why = (
                f"{err}; the file {path} left from an earlier run is unlisted: put a valid certificate in KV "
                "under this key, or delete the file"
            )
            log.warning("%s", why)
            self._unlisted[path.stem] = self.refused[path.stem] = why

    def sync(self, pairs: tuple[KeyPair, ...]) -> list[str]:
        """Serve exactly the valid certificates in `pairs`; returns what changed, for the log.
        A refused one (invalid, or refused by HAProxy or its check) keeps the last valid version of
        its key serving, and the others go through. RuntimeApplyError (from the Runtime API) means
        HAProxy's state is unknown: the caller reloads (the crt-list is written first)."""
        # The loop syncs at every render; certificates are parsed only when they change. Never while
        # a sync was cut at its slice: KV back to the last whole answer in the middle of one kept
        # what its first slices added, deleted from KV, served for good, and `due_at` said "now"
        # at every pass (helper-137, /tmp/rev83: 58 passes a second, 0.4 of a core).
        unchanged = pairs == self._seen and not self.more
        if unchanged and (self._valid_from is None or self.clock() < self._valid_from):
            return []
        deadline = time.monotonic() + self.slice_s
        self.more, self._buffer = False, None
        wanted = self._wanted(self._within_limit(pairs), deadline)
        listed = set(self.served)
        changes: list[str | None] = []
        steps = [(self._add, c) for n, c in sorted(wanted.items()) if n not in self.served]
        steps += [(self._replace, c) for n, c in sorted(wanted.items()) if n in self.served and c != self.served[n]]
        try:
            for step, cert in steps:
                if changes and time.monotonic() >= deadline:
                    self.more = True
                    break
                changes.append(self._apply(step, cert))
            if not self.more:
                changes += [self._remove(n) for n in self._removable(wanted)]
        finally:
            if set(self.served) != listed:
                self._write_list()
        if not self.more:  # only once all of it went through (a refused step makes the next sync redo it)
            self._seen = pairs
        return [change for change in changes if change is not None]

    def relimit(self, limit: int) -> None:
        """A new `certs_max` (SIGHUP): the next sync serves within it, whatever KV holds."""
        self.limit, self._seen = limit, None

    def _within_limit(self, pairs: tuple[KeyPair, ...]) -> tuple[KeyPair, ...]:
        """The pairs of at most `limit` keys: those served first, then in key order; `beyond` names
        the others (refused, never parsed)."""
        keys = sorted({pair.key for pair in pairs}, key=lambda key: (key not in self.served, key))
        kept = set(keys[: self.limit])
        self.beyond = tuple(key for key in keys[self.limit :])
        return pairs if not self.beyond else tuple(pair for pair in pairs if pair.key in kept)

    def _removable(self, wanted: dict[str, Certificate]) -> list[str]:
        """The served certificates KV no longer holds, but the last one served: HAProxy refuses a TLS
        listener with an empty list, so every reload and `haproxy -c` would fail (and with them every
        update). Counted on what is served after this sync's additions, not on what KV holds: a
        replacement HAProxy refused is in KV and not served."""
        gone = sorted(set(self.served) - set(wanted))
        if gone and len(gone) == len(self.served):
            last = next(iter(self.served))  # the list's first: HAProxy's default already
            gone.remove(last)
            self.refused[last] = (
                "deleted from KV (or replaced by one that was refused), but it is the last certificate served: "
                "HAProxy refuses a TLS listener with none (every reload would fail), so it is served until another "
                "one is taken"
            )
        return gone

    def _wanted(self, pairs: tuple[KeyPair, ...], deadline: float = math.inf) -> dict[str, Certificate]:
        """The certificate to serve for each key: its value if valid, else the one served before.
        A key given twice (`prefix//name` beside `prefix/name`) is refused both times. A value not
        parsed yet once `deadline` (monotonic) has passed waits for the next sync (`more`): the
        one served before, if any, stays."""
        keys = [pair.key for pair in pairs]
        twice = {key for key, count in collections.Counter(keys).items() if count > 1}
        self.refused = {name: why for name, why in self._unlisted.items() if name not in keys}
        wanted: dict[str, Certificate] = {}
        now, self._valid_from, fresh = self.clock(), None, 0
        for pair in pairs:
            try:
                if pair.key in twice:
                    raise CertificateError(f"certificate key {pair.key!r}: given twice under the prefix ('//')")
                if (pair.key, pair.value) not in self._parsed:
                    if fresh and time.monotonic() >= deadline:  # one at least a sync, for progress
                        self.more = True
                        if pair.key in self.served:
                            wanted[pair.key] = self.served[pair.key]
                        continue
                    fresh += 1
                cert = self._read(pair)
                if cert.not_before is not None and now < cert.not_before:
                    self._valid_from = min(self._valid_from or cert.not_before, cert.not_before)
                wanted[pair.key] = _within_dates(cert, now)
            except CertificateError as err:
                self.refused[pair.key] = str(err)
                if pair.key in self.served:
                    wanted[pair.key] = self.served[pair.key]  # the old one keeps serving
        current = {(pair.key, pair.value) for pair in pairs}
        self._parsed = {kv: found for kv, found in self._parsed.items() if kv in current}
        if self.more:  # not all looked at: nothing is removed for not being wanted (see `sync`)
            wanted.update({name: cert for name, cert in self.served.items() if name not in wanted})
        return wanted

    def due_at(self) -> float | None:
        """When (monotonic) a value refused as not valid yet becomes valid, and a sync takes it with
        no change under the prefix. A renewal dated a moment ahead (an issuer's clock, an ACME client
        writing one dated now) was refused once and looked at again only at the next write under the
        prefix: the old certificate served on, up to its expiry (an attacker's review, /tmp/rev39)."""
        if self.more:
            return time.monotonic()  # the rest of a sync cut at its slice
        if self._valid_from is None:
            return None
        return time.monotonic() + (self._valid_from - self.clock()).total_seconds()

    def _read(self, pair: KeyPair) -> Certificate:
        """`read_bundle` of a value, kept while the value is the same: at each change under the
        prefix every value is looked at again, and a refused one must not be parsed again."""
        found = self._parsed.get((pair.key, pair.value))
        if found is None:
            try:
                found = read_bundle(pair.key, pair.value)
            except CertificateError as err:
                found = str(err)  # the message, not the error: raised again, it kept every sync's frames
            self._parsed[pair.key, pair.value] = found
        if isinstance(found, str):
            raise CertificateError(found)
        return found

    def _apply(self, step: Callable[[Certificate], str], cert: Certificate) -> str | None:
        """`step(cert)`, or None when HAProxy (or the check) refused that certificate alone."""
        try:
            return step(cert)
        except CertificateError as err:
            self.refused[cert.name] = str(err)
            return None

    def _add(self, cert: Certificate) -> str:
        path = self.path(cert.name)
        if self.runtime is not None:
            try:
                self._open_store(cert, path, self._set_command(cert, path))
            except BeyondBuffer:
                return self._at_reload(cert, "added")
        self._write(cert)
        self.served[cert.name] = cert  # listed from now on, unless HAProxy refuses it into its list (below)
        self._unlisted.pop(cert.name, None)
        if self.runtime is not None:
            try:
                self._offer(cert, words.command("add", "ssl", "crt-list", str(self.crt_list), path), ("Success!",))
            except CertificateError:
                self._drop_refused(cert.name, path)
                raise
        return f"added {cert.name} ({_names_of(cert)}; until {cert.not_after:%Y-%m-%d})"

    def _drop_refused(self, name: str, path: str) -> None:
        """HAProxy took the certificate into a store but refused it into the list's SSL contexts
        (`ca md too weak`: OpenSSL's checks are not all ours). Listed, it would make every reload
        and every `haproxy -c` of the config fail on the frontend's bind line, which no quarantine
        may leave out: every later update would be rejected. So it is unlisted, its file deleted
        and its store too (a store no list names), and it is refused alone."""
        del self.served[name]
        Path(path).unlink(missing_ok=True)
        self._delete_store(path)

    def _replace(self, cert: Certificate) -> str:
        if self.runtime is not None:
            path = self.path(cert.name)
            try:
                self._upload(cert, path, self._set_command(cert, path))
            except BeyondBuffer:
                return self._at_reload(cert, "rotated")
        self._write(cert)
        self.served[cert.name] = cert
        return f"rotated {cert.name} ({_names_of(cert)}; until {cert.not_after:%Y-%m-%d})"

    def _remove(self, name: str) -> str:
        path = self.path(name)
        if self.runtime is not None:
            # HAProxy 2.8 answers "Entry '<path>' deleted in crtlist '<list>'!" (no "Success!": that
            # expectation made every removal a RuntimeApplyError, and so a reload)
            unlisted = self._answer(words.command("del", "ssl", "crt-list", str(self.crt_list), path))
            if USED_AS_DEFAULT in unlisted:
                return self._drop_default(name, path)
            if "deleted in crtlist" not in unlisted:
                raise RuntimeApplyError(f"runtime API refused `del ssl crt-list … {path}`: {_cut(unlisted)}")
            self._delete_store(path)
        Path(path).unlink(missing_ok=True)
        del self.served[name]
        return f"removed {name}"

    def _at_reload(self, cert: Certificate, done: str) -> str:
        """A certificate the Runtime API cannot carry (BeyondBuffer): its file is checked with
        `haproxy -c` as with no Runtime API, written and listed, and `reload_needed` has the caller
        reload HAProxy, which reads it then. Before, it was refused, the old one serving on: a
        legitimate bundle of many names (or a long chain) could never be rotated."""
        self._write(cert, checked=True)
        self.served[cert.name] = cert
        self._unlisted.pop(cert.name, None)
        self.reload_needed = (
            f"certificate {cert.name} is larger than HAProxy's CLI buffer (tune.bufsize) takes, so HAProxy reads "
            "it at a reload"
        )
        return f"{done} {cert.name} ({_names_of(cert)}; until {cert.not_after:%Y-%m-%d}; at a reload)"

    def _drop_default(self, name: str, path: str) -> str:
        """HAProxy refuses to unlist the first certificate of a list, its default one (for clients
        that send no SNI, where `strict-sni` is not set): it goes at a reload instead. Unlisted and
        deleted here, and `reload_needed` says so until the caller has reloaded HAProxy on the new
        list (see Delivery.sync_certificates: it keeps trying, and reports it meanwhile). Before,
        the refusal kept it listed and served, and every sync reloaded again."""
        del self.served[name]
        Path(path).unlink(missing_ok=True)
        self.reload_needed = (
            f"certificate {name}, deleted from KV, was HAProxy's default one (the first of {CRT_LIST}), which it "
            "drops only at a reload: HAProxy serves it until then"
        )
        return f"removed {name} (HAProxy's default certificate: at a reload)"

    def _set_command(self, cert: Certificate, path: str) -> words.Command:
        """`set ssl cert` with its payload; BeyondBuffer, never sent, unless it fits HAProxy's CLI
        buffer with CLI_RESERVE to spare. One of the buffer's size less one made HAProxy abort (see
        CLI_RESERVE); one beyond it is answered "too big for the buffer size", but through the master
        CLI one far beyond it now and then with nothing at all (1 of 20 at 71 KB, measured; 6 of 20
        at 74 KB, helper-136), which left HAProxy's state unknown: a reload for that, and the whole
        sync again (1-3 reloads at each flip of a large bundle)."""
        command = words.payload_command(cert.pem, "set", "ssl", "cert", path)
        if len(command.encode()) + CLI_RESERVE > (buffer := self._cli_buffer()):
            raise BeyondBuffer(f"certificate {cert.name}: {len(cert.pem)} bytes, beyond HAProxy's CLI buffer {buffer}")
        return command

    def _cli_buffer(self) -> int:
        """HAProxy's CLI buffer (`tune.bufsize`) as its running worker has it: `show pools` names the
        buffer pool's size. Read from the rendered config before, it missed a `tune.bufsize` in a file
        or an `.if` block of the operator's, took the first of two lines where HAProxy takes the last,
        and after a restart against a running HAProxy kept the default (helper-139). Never guessed:
        the default assumed for an answer without the line let a real 8,192-byte buffer be filled
        (helper-140's `kv_flaky.py`: HAProxy gone). A dump without it: 0, every certificate by file
        and a reload; an answer that is no dump ("Can't connect to the target CLI"): RuntimeApplyError."""
        if self._buffer is None:
            answer = self._answer(words.command("show", "pools"))
            if POOLS_DUMP not in answer:
                raise RuntimeApplyError(f"runtime API refused `show pools`: {_cut(answer)}")
            found = _BUFFER_POOL.search(answer)
            if found is None:
                log.warning("HAProxy's `show pools` names no buffer pool: certificates go in by file and a reload")
            self._buffer = int(found.group(1)) if found is not None else 0
        return self._buffer

    def _open_store(self, cert: Certificate, path: str, set_command: words.Command) -> None:
        """A new store in HAProxy holding `cert`; CertificateError, the empty store deleted again
        (no list names it yet), when HAProxy refuses the certificate."""
        self._send(words.command("new", "ssl", "cert", path), "New empty certificate store")
        try:
            self._upload(cert, path, set_command)
        except CertificateError:
            self._delete_store(path)
            raise

    def _upload(self, cert: Certificate, path: str, set_command: words.Command) -> None:
        self._offer(cert, set_command, SET_TAKEN)
        self._offer(cert, words.command("commit", "ssl", "cert", path), ("Success!",))

    def _offer(self, cert: Certificate, command: words.Command, expect: tuple[str, ...]) -> None:
        """Send a step HAProxy may refuse for what the certificate holds: CertificateError then.
        No answer, or a transaction open for another file, leaves HAProxy's state unknown:
        RuntimeApplyError (the caller reloads, which ends every transaction)."""
        answer = self._answer(command)
        if any(word in answer for word in expect):
            return
        if TOO_BIG in answer:
            raise BeyondBuffer(f"certificate {cert.name}: {len(cert.pem)} bytes, beyond HAProxy's CLI buffer")
        if not answer or OTHER_TRANSACTION in answer or NO_TARGET in answer:
            raise RuntimeApplyError(f"runtime API refused `{command.splitlines()[0]}`: {_cut(answer)}")
        raise CertificateError(
            f"certificate {cert.name}: HAProxy refused it (`{command.splitlines()[0]}` answered {_cut(answer)!r}); "
            "the one served before keeps serving"
        )

    def _send(self, command: words.Command, expect: str) -> None:
        answer = self._answer(command)
        if expect not in answer:
            raise RuntimeApplyError(f"runtime API refused `{command.splitlines()[0]}`: {_cut(answer)}")

    def _delete_store(self, path: str) -> None:
        """`del ssl cert`: HAProxy 2.8 answers "Certificate 'P' deleted!", and "… certificate 'P' in
        use, can't be deleted!" when a list still names it, which the test for "deleted" took for
        a success (helper-136, /tmp/rev82)."""
        answer = self._answer(words.command("del", "ssl", "cert", path))
        if not (answer.startswith("Certificate '") and answer.endswith("' deleted!")):  # (its spaces folded)
            raise RuntimeApplyError(f"runtime API refused `del ssl cert {path}`: {_cut(answer)}")

    def _answer(self, command: words.Command) -> str:
        """HAProxy's whole answer, on one line: `commit ssl cert` and `add ssl crt-list` print a dot
        per bind line using the certificate before "Success!", which an answer cut to 300
        characters lost with ~280 binds (helper-136: a rotation HAProxy took reported refused)."""
        assert self.runtime is not None
        return " ".join(self.runtime.command(command).split())

    def _write(self, cert: Certificate, checked: bool = False) -> None:
        """Write the certificate's file; with no Runtime API (or `checked`: HAProxy reads it only at
        a reload), only once `check` accepted it (else HAProxy has taken it already)."""
        check = self.check if self.runtime is None or checked else None
        try:
            write_atomically(Path(self.path(cert.name)), cert.pem, check, 0o600, False)
        except ValidationError as err:
            raise CertificateError(
                f"certificate {cert.name}: HAProxy cannot load it ({err}); the one served before keeps serving"
            ) from err

    def _write_list(self) -> None:
        """The crt-list in the order HAProxy's running list has (`served` keeps it: a new one is
        added at its end by `add ssl crt-list`): sorted by key, a reload reordered the list, and
        with it the default certificate and, of two certificates of one key type for one name, which
        answers (the first listed: a key named `aaa` carrying `shop.example.com` took it over at
        reload). Between key types HAProxy prefers ECDSA for a client that supports it, whatever
        the order: the order bounds no takeover across key types."""
        lines = "".join(f"{self.path(name)}\n" for name in self.served)
        write_atomically(self.crt_list, lines, None, 0o600, False)

    def expiries(self, now: datetime.datetime | None = None) -> dict[str, float]:
        """Seconds until each served certificate expires."""
        now = now or datetime.datetime.now(datetime.UTC)
        return {name: (c.not_after - now).total_seconds() for name, c in sorted(self.served.items())}
