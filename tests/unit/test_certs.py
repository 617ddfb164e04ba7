"""TLS certificates from KV: validated before anything is written or sent; rotated by Runtime API
commands whose payload is PEM only; a refused one leaves the old one serving."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from renderer.deliver.certs import (
    CLI_RESERVE,
    CertificateError,
    CertificateSync,
    _check_strength,
    _private_key,
    haproxy_check,
    inspect,
)
from renderer.deliver.runtime import RuntimeApplyError
from renderer.errors import ValidationError
from renderer.haproxy import runtime_grammar as words
from renderer.haproxy.runtime_grammar import Command
from renderer.source.dependency import KeyPair
from tests.helpers import Pace

NOW = datetime.datetime.now(datetime.UTC)
DEFAULT_BUFSIZE = 16384  # HAProxy's default `tune.bufsize`


def bundle(name: str = "site.test", days: int = 30, start_days: int = -1,
           key: CertificateIssuerPrivateKeyTypes | None = None, signer: CertificateIssuerPrivateKeyTypes | None = None,
           san: bool = True, issuer: x509.Certificate | None = None, chain: tuple[x509.Certificate, ...] = (),
           sha1: bool = False, also: tuple[str, ...] = ()) -> str:  # fmt: skip
    """A PEM bundle for `name` (and the DNS names `also`): self-signed, or signed by `signer` (named as
    `issuer`, then `chain`)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key() if issuer is not None or signer is None else signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=start_days))
        .not_valid_after(NOW + datetime.timedelta(days=days))
    )
    if san:
        names = [x509.DNSName(dns) for dns in (name, *also)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = _sign(builder, signer or key, sha1)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    return (pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())).decode()  # fmt: skip


def _sign(builder: x509.CertificateBuilder, key: CertificateIssuerPrivateKeyTypes, sha1: bool) -> x509.Certificate:
    """`builder` signed with SHA-256 (none for Ed25519), or with SHA-1 by an RSA key: the library no
    longer signs with SHA-1, so the SHA-256 signature's algorithm is renamed (sha256WithRSAEncryption
    1.2.840.113549.1.1.11 → sha1WithRSAEncryption .5, the same length) and the part signed again."""
    cert = builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    if not sha1:
        return cert
    assert isinstance(key, rsa.RSAPrivateKey)
    sha256_oid = bytes.fromhex("06092a864886f70d01010b")
    der = cert.public_bytes(serialization.Encoding.DER).replace(sha256_oid, sha256_oid[:-1] + b"\x05")
    renamed = x509.load_der_x509_certificate(der)
    signature = key.sign(renamed.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())
    return x509.load_der_x509_certificate(der.replace(renamed.signature, signature))


def authority(
    name: str = "Test CA", key: CertificateIssuerPrivateKeyTypes | None = None, sha1: bool = False
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """A self-signed CA certificate and its key."""
    key = key or rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=10))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )  # fmt: skip
    return _sign(builder, key, sha1), key


def test_a_valid_bundle_is_reserialised_as_pem_only() -> None:
    cert = inspect("site.test", "junk before\n" + bundle() + "\n\n# trailing words\n")
    assert cert.names == ("site.test",) and cert.not_after > NOW
    assert "junk" not in cert.pem and "\n\n" not in cert.pem and cert.pem.endswith("-----\n")


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("site.test", bundle(days=-1, start_days=-10), "expired"),
        ("site.test", bundle(start_days=2), "not valid before"),
        ("site.test", bundle(signer=ec.generate_private_key(ec.SECP256R1())), "does not match"),
        ("site.test", bundle().split("-----BEGIN PRIVATE KEY-----")[0], "no private key"),
        ("site.test", "not a certificate", "no PEM certificate"),
        ("../etc/passwd", bundle(), "not a file name"),
        ("a b", bundle(), "not a file name"),
    ],
)
def test_invalid_bundles_are_refused_naming_why(name: str, text: str, why: str) -> None:
    with pytest.raises(CertificateError, match=why):
        inspect(name, text)


def pools(buffer: int) -> str:
    """HAProxy 2.8's `show pools`, its buffer pool's line among others."""
    return (
        "Dumping pools usage. Use SIGQUIT to flush them.\n"
        "  - Pool hlua_queue (24 bytes) : 0 allocated (0 bytes), 0 used, needed_avg 0, 0 failures, 6 users [SHARED]\n"
        f"  - Pool buffer ({buffer} bytes) : 2 allocated ({2 * buffer} bytes), 2 used, needed_avg 1, 0 failures\n"
    )


class FakeRuntime:
    buffer = DEFAULT_BUFSIZE  # its `show pools` says (a read, not kept in `sent`)

    def __init__(self) -> None:
        self.sent: list[str] = []

    def command(self, command: Command) -> str:
        if command == "show pools":
            return pools(self.buffer)
        self.sent.append(command)
        verb = command.split(" ", 3)
        unlisted, deleted = f"Entry '{verb[3]}' deleted in crtlist!", f"Certificate '{verb[3]}' deleted!"
        return {
            "new": "New empty certificate store",
            "set": "Transaction created for certificate",
            "commit": "Committing\nSuccess!",
            "add": "Inserting\nSuccess!",
            "del": unlisted if verb[2] == "crt-list" else deleted,
        }[verb[0]]


def test_new_rotated_and_removed_certificates_reach_haproxy_and_the_files(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    sync = CertificateSync(tmp_path / "certs", runtime)
    sync.prepare()
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == ""
    first, second = bundle(), bundle()
    assert sync.sync((KeyPair("site.test", first),))[0].startswith("added site.test")
    path = str(tmp_path / "certs" / "site.test.pem")
    assert [c.split(" <<")[0] for c in runtime.sent] == [
        f"new ssl cert {path}", f"set ssl cert {path}", f"commit ssl cert {path}",
        f"add ssl crt-list {tmp_path / 'certs' / 'crt-list.txt'} {path}",
    ]  # fmt: skip
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{path}\n"
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    runtime.sent.clear()
    assert sync.sync((KeyPair("site.test", second),))[0].startswith("rotated site.test")
    assert [c.split(" <<")[0] for c in runtime.sent] == [f"set ssl cert {path}", f"commit ssl cert {path}"]
    assert inspect("site.test", Path(path).read_text()).fingerprint == inspect("site.test", second).fingerprint
    # A refused rotation leaves the served one in place.
    runtime.sent.clear()
    assert sync.sync((KeyPair("site.test", bundle(days=-1, start_days=-5)),)) == []
    assert runtime.sent == [] and "expired" in sync.refused["site.test"]
    other = bundle("other.test")
    assert sync.sync((KeyPair("site.test", second), KeyPair("other", other)))[0].startswith("added other")
    runtime.sent.clear()
    assert sync.sync((KeyPair("other", other),)) == ["removed site.test"]
    assert [c.split(" <<")[0] for c in runtime.sent] == [
        f"del ssl crt-list {tmp_path / 'certs' / 'crt-list.txt'} {path}", f"del ssl cert {path}"
    ]  # fmt: skip
    other_path = tmp_path / "certs" / "other.pem"
    assert not Path(path).exists() and (tmp_path / "certs" / "crt-list.txt").read_text() == f"{other_path}\n"


class ContextRefusingRuntime(FakeRuntime):
    """HAProxy 2.8.25 taking a certificate into a store, then refusing it into the list's SSL
    contexts (its answer for a SHA-1 certificate whose issuer name is its own but whose key is not)."""

    def command(self, command: Command) -> str:
        if command.startswith("add ssl crt-list"):
            self.sent.append(command)
            return "Inserting certificate. unable to load SSL certificate into SSL Context: ca md too weak. Failed!"
        return super().command(command)


def test_a_new_certificate_haproxy_refuses_into_its_list_is_unlisted_deleted_and_refused_alone(
    tmp_path: Path,
) -> None:
    """An attacker's review: it stayed listed in crt-list.txt, so every `haproxy -c` and reload of
    the config failed on the frontend's bind line, which no quarantine may leave out: every later
    update was rejected (reproduced on HAProxy 2.8.25)."""
    runtime = ContextRefusingRuntime()
    sync = CertificateSync(tmp_path / "certs", runtime)
    sync.prepare()
    assert sync.sync((KeyPair("aaa-evil", bundle("evil.test")),)) == []
    path = str(tmp_path / "certs" / "aaa-evil.pem")
    assert sync.served == {} and "ca md too weak" in sync.refused["aaa-evil"]
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == "" and not Path(path).exists()
    assert runtime.sent[-1] == f"del ssl cert {path}"


def test_a_weak_signature_counts_as_a_roots_only_when_the_certificate_signed_itself() -> None:
    """The SHA-1 check skipped any certificate whose issuer name equals its subject; OpenSSL does
    not, and refused it at `add ssl crt-list` (`ca md too weak`). Only a self-signed root is let be."""
    key = rsa.generate_private_key(65537, 2048)
    root, _ = authority("Self", key, sha1=True)
    forged, _ = authority("Self", key, sha1=True)  # the same names and key …
    builder = x509.CertificateBuilder(
        issuer_name=forged.issuer, subject_name=forged.subject, public_key=forged.public_key(),
        serial_number=forged.serial_number, not_valid_before=NOW - datetime.timedelta(days=1),
        not_valid_after=NOW + datetime.timedelta(days=30),
    )  # fmt: skip
    forged = _sign(builder, rsa.generate_private_key(65537, 2048), sha1=True)  # … signed by another key

    _check_strength("root", root, 1)  # signed by its own key: a root, let be
    with pytest.raises(CertificateError, match="signed with SHA1"):
        _check_strength("forged", forged, 0)


class DefaultRefusingRuntime(FakeRuntime):
    """HAProxy 2.8.25 refusing to unlist the list's first certificate (its default, no strict-sni)."""

    def command(self, command: Command) -> str:
        if command.startswith("del ssl crt-list"):
            self.sent.append(command)
            path = command.split()[-1]
            return (
                f"Can't delete the entry: certificate '{path}' cannot be deleted, it is used as default certificate "
                "by the following frontends:\n  frontend 'https'"
            )
        return super().command(command)


def test_the_default_certificate_deleted_from_kv_is_unlisted_and_a_reload_asked_for(tmp_path: Path) -> None:
    """A review (real HAProxy 2.8.25): the first certificate of the list is the default one, which
    HAProxy will not unlist at runtime. The refusal kept it listed and served (a compromised one,
    say), and every sync reloaded HAProxy again. It is unlisted now, and `reload_needed` stays until
    the caller reloaded (see test_cycle_certificates)."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    first, second = bundle("a.test"), bundle("b.test")
    sync.sync((KeyPair("a", first), KeyPair("b", second)))
    sync.runtime = DefaultRefusingRuntime()
    assert sync.sync((KeyPair("b", second),)) == ["removed a (HAProxy's default certificate: at a reload)"]
    assert list(sync.served) == ["b"] and not (tmp_path / "certs" / "a.pem").exists()
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{tmp_path / 'certs' / 'b.pem'}\n"
    assert sync.reload_needed is not None and "default one" in sync.reload_needed
    assert sync.sync((KeyPair("b", second),)) == []


def test_the_last_certificate_deleted_from_kv_is_kept_and_said_why(tmp_path: Path) -> None:
    """A review: deleting the only certificate (or all) wrote an empty crt-list, which HAProxy
    refuses on a TLS bind: the reload failed, the old process went on serving it, and every later
    `haproxy -c` of the config failed on the template's own bind, which no quarantine may leave out."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    sync.sync((KeyPair("a", bundle("a.test")), KeyPair("b", bundle("b.test"))))
    assert sync.sync(()) == ["removed b"]
    assert list(sync.served) == ["a"] and "it is the last certificate" in sync.refused["a"]
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{tmp_path / 'certs' / 'a.pem'}\n"
    added, removed = sync.sync((KeyPair("c", bundle("c.test")),))
    assert added.startswith("added c") and removed == "removed a" and list(sync.served) == ["c"]


def test_the_last_certificate_stays_when_its_replacement_is_refused(tmp_path: Path) -> None:
    """A review of the rule above: it kept the last one only when KV held none, so a replacement
    HAProxy refused (in KV, never served) left the list empty all the same."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    sync.sync((KeyPair("a", bundle("a.test")),))
    sync.runtime = ContextRefusingRuntime()
    assert sync.sync((KeyPair("b", bundle("b.test")),)) == []
    assert list(sync.served) == ["a"] and "ca md too weak" in sync.refused["b"]
    assert "last certificate served" in sync.refused["a"]
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{tmp_path / 'certs' / 'a.pem'}\n"


def test_a_list_whose_every_file_is_refused_at_start_is_kept_as_it_is(tmp_path: Path) -> None:
    """A review: the only file an earlier run listed, refused now (a key an older version took), was
    unlisted before HAProxy first read the list: an empty list, and every reload failed."""
    certs = tmp_path / "certs"
    certs.mkdir()
    weak = certs / "old.pem"
    weak.write_text(bundle("old.test", key=rsa.generate_private_key(65537, 1024)))
    (certs / "crt-list.txt").write_text(f"{weak}\n")
    sync = CertificateSync(certs, FakeRuntime())
    sync.prepare()
    assert sync.served == {} and "old" in sync.refused
    assert (certs / "crt-list.txt").read_text() == f"{weak}\n"


def test_a_restarted_renderer_takes_the_listed_files_as_served(tmp_path: Path) -> None:
    sync = CertificateSync(tmp_path / "certs")
    sync.prepare()
    text = bundle()
    sync.sync((KeyPair("site.test", text),))
    again = CertificateSync(tmp_path / "certs", FakeRuntime())
    again.prepare()
    assert set(again.served) == {"site.test"}
    assert again.sync((KeyPair("site.test", text),)) == []  # nothing to send: HAProxy has it


def two_san_bundle(name: str) -> str:
    """A bundle whose certificate has two subjectAltName extensions (no builder makes one: a second
    extension of another OID is renamed in the DER). Its signature is wrong, which nobody checks."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    other = x509.ObjectIdentifier("2.5.29.99")  # the same encoded length as subjectAltName's 2.5.29.17
    san = x509.SubjectAlternativeName([x509.DNSName(name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(1).not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30)).add_extension(san, critical=False)
        .add_extension(x509.UnrecognizedExtension(other, san.public_bytes()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    der = cert.public_bytes(serialization.Encoding.DER).replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return (pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())).decode()  # fmt: skip


def test_a_certificate_the_library_cannot_read_is_refused_alone(tmp_path: Path) -> None:
    """Two subjectAltName extensions made `cert.extensions` raise x509.DuplicateExtension out of
    `sync`: no certificate could be added, rotated or removed while that key was in KV. Now it
    is that key's refusal, and the others are served."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    changes = sync.sync((KeyPair("a-bad", two_san_bundle("bad.test")), KeyPair("b-good", bundle())))
    assert [c.split(" (")[0] for c in changes] == ["added b-good"]
    assert "DuplicateExtension" in sync.refused["a-bad"] and list(sync.served) == ["b-good"]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits: issue a 2048-bit or larger key"),
        (dsa.generate_private_key(2048), "DSA key: issue an RSA"),
        (ec.generate_private_key(ec.SECP256K1()), "EC key on curve secp256k1: issue one on P-256, P-384 or P-521"),
    ],
    ids=["rsa-1024", "dsa", "ec-secp256k1"],
)
def test_a_weak_leaf_key_is_refused_saying_how_to_fix_it(key: CertificateIssuerPrivateKeyTypes, why: str) -> None:
    with pytest.raises(CertificateError, match=f"certificate site.test: {re.escape(why)}"):
        inspect("site.test", bundle(key=key))


@pytest.mark.parametrize(
    "key",
    [
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP521R1()),
    ],
    ids=["ed25519", "rsa-2048", "p-384", "p-521"],
)
def test_strong_keys_are_served(key: CertificateIssuerPrivateKeyTypes) -> None:
    assert inspect("site.test", bundle(key=key)).names == ("site.test",)


def test_a_weak_key_in_the_chain_is_refused_naming_that_certificate() -> None:
    ca, ca_key = authority("Weak CA", rsa.generate_private_key(65537, 1024))
    text = bundle(signer=ca_key, issuer=ca, chain=(ca,))
    with pytest.raises(CertificateError, match=r"chain certificate 2 .*Weak CA.*RSA key of 1024 bits"):
        inspect("site.test", text)


def test_a_leaf_signed_with_sha1_by_a_ca_is_refused() -> None:
    ca, ca_key = authority()
    text = bundle(signer=ca_key, issuer=ca, chain=(ca,), sha1=True)
    assert isinstance(x509.load_pem_x509_certificate(text.encode()).signature_hash_algorithm, hashes.SHA1)
    with pytest.raises(CertificateError, match=r"signed with SHA1: .*SHA-256"):
        inspect("site.test", text)


def test_a_self_signed_sha1_root_is_fine_as_the_chain_root() -> None:
    """Nobody relies on the signature of a self-signed root: only the certificates it signs count."""
    ca, ca_key = authority("Old root", sha1=True)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA1)
    public = ca.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(ca.signature, ca.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())  # a real one
    cert = inspect("site.test", bundle(signer=ca_key, issuer=ca, chain=(ca,)))
    assert cert.pem.count("BEGIN CERTIFICATE") == 2


class RefusingRuntime(FakeRuntime):
    """HAProxy refusing one step for one path (as it answers when it cannot load a certificate)."""

    def __init__(self, verb: str, path: str) -> None:
        super().__init__()
        self.verb, self.path = verb, path

    def command(self, command: Command) -> str:
        if command.startswith(f"{self.verb} ssl cert {self.path}"):
            self.sent.append(command)
            return f"unable to load the certificate {self.path}: inconsistencies between private key and certificate"
        return super().command(command)


@pytest.mark.parametrize("verb", ["set", "commit"])
def test_a_new_certificate_haproxy_refuses_is_left_out_alone_and_its_store_deleted(tmp_path: Path, verb: str) -> None:
    """Before, the refusal raised out of sync (the caller reloaded) and no other certificate was added."""
    path = str(tmp_path / "certs" / "a-bad.pem")
    runtime = RefusingRuntime(verb, path)
    sync = CertificateSync(tmp_path / "certs", runtime)
    sync.prepare()
    changes = sync.sync((KeyPair("a-bad", bundle("bad.test")), KeyPair("b-good", bundle())))
    assert [c.split(" (")[0] for c in changes] == ["added b-good"]
    assert "HAProxy refused" in sync.refused["a-bad"] and "inconsistencies" in sync.refused["a-bad"]
    assert f"del ssl cert {path}" in runtime.sent and not Path(path).exists()
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{tmp_path / 'certs' / 'b-good.pem'}\n"


@pytest.mark.parametrize("verb", ["set", "commit"])
def test_a_rotation_haproxy_refuses_keeps_the_old_file_and_asks_for_no_reload(tmp_path: Path, verb: str) -> None:
    path = tmp_path / "certs" / "site.test.pem"
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    old = bundle()
    sync.sync((KeyPair("site.test", old),))
    before = path.read_bytes()
    sync.runtime = RefusingRuntime(verb, str(path))
    assert sync.sync((KeyPair("site.test", bundle()),)) == []  # no RuntimeApplyError: nothing to reload for
    assert path.read_bytes() == before and "HAProxy refused" in sync.refused["site.test"]
    assert sync.served["site.test"].fingerprint == inspect("site.test", old).fingerprint


class OpenTransactionRuntime(FakeRuntime):
    """HAProxy 2.8 with a certificate transaction left open (between a `set` and its `commit`) for
    `path`: its own answers, measured on 2.8.25."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def command(self, command: Command) -> str:
        if command == "show pools":
            return super().command(command)
        verb, _, _, target = command.split("\n")[0].removesuffix(" <<").split(" ", 3)
        if verb not in ("set", "commit"):
            return super().command(command)
        self.sent.append(command)
        if target == self.path and verb == "set":
            return f"Transaction updated for certificate {target}!"
        if target == self.path:
            self.path = ""  # committed: the transaction ends
            return f"Committing {target}.\nSuccess!"
        if self.path:
            done = "update" if verb == "set" else "commit"
            ongoing = f"The ongoing transaction is about '{self.path}' but you are trying to set '{target}'"
            return f"{ongoing}\nCan't {done} {target}!"
        return super().command(command)


def test_a_transaction_left_open_for_the_same_file_is_taken_over(tmp_path: Path) -> None:
    """A run stopped between its `set` and its `commit` leaves the transaction open; HAProxy answers
    the next `set` for that file "Transaction updated". Before, that answer was taken for a refusal
    of the certificate, which stayed refused until its KV value changed."""
    path = tmp_path / "certs" / "site.test.pem"
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    sync.sync((KeyPair("site.test", bundle()),))
    sync.runtime = OpenTransactionRuntime(str(path))
    new = bundle()
    assert sync.sync((KeyPair("site.test", new),))[0].startswith("rotated site.test")
    assert (
        sync.refused == {}
        and inspect("site.test", path.read_text()).fingerprint == inspect("site.test", new).fingerprint
    )


def test_a_transaction_open_for_another_file_is_an_unknown_state_not_a_refusal(tmp_path: Path) -> None:
    """Before, "The ongoing transaction is about …" was taken for a refusal of the certificate
    offered (kept refused, nothing reloaded); it says nothing about it: the caller reloads (which
    ends the transaction) and offers it again."""
    path = tmp_path / "certs" / "site.test.pem"
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    old = bundle()
    sync.sync((KeyPair("site.test", old),))
    sync.runtime = OpenTransactionRuntime(str(tmp_path / "certs" / "other.pem"))
    new = (KeyPair("site.test", bundle()),)
    with pytest.raises(RuntimeApplyError, match="ongoing transaction"):
        sync.sync(new)
    assert (
        sync.refused == {}
        and inspect("site.test", path.read_text()).fingerprint == inspect("site.test", old).fingerprint
    )
    sync.runtime = FakeRuntime()  # the reloaded HAProxy: no transaction open
    assert sync.sync(new)[0].startswith("rotated site.test")


def test_the_file_is_written_only_after_haproxy_committed_the_certificate(tmp_path: Path) -> None:
    path = tmp_path / "certs" / "site.test.pem"
    seen: list[bytes | None] = []

    class Watching(FakeRuntime):
        def command(self, command: Command) -> str:
            if command.startswith(("set ", "commit ")):
                seen.append(path.read_bytes() if path.exists() else None)
            return super().command(command)

    sync = CertificateSync(tmp_path / "certs", Watching())
    sync.prepare()
    sync.sync((KeyPair("site.test", bundle()),))
    assert seen == [None, None] and path.exists()
    seen.clear()
    before = path.read_bytes()
    sync.sync((KeyPair("site.test", bundle()),))
    assert seen == [before, before] and path.read_bytes() != before


def test_a_weak_rotation_keeps_the_old_certificate_and_sends_nothing(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    sync = CertificateSync(tmp_path / "certs", runtime)
    sync.prepare()
    good = bundle()
    sync.sync((KeyPair("site.test", good),))
    runtime.sent.clear()
    before = (tmp_path / "certs" / "site.test.pem").read_bytes()
    assert sync.sync((KeyPair("site.test", bundle(key=rsa.generate_private_key(65537, 1024))),)) == []
    assert runtime.sent == [] and "RSA key of 1024 bits" in sync.refused["site.test"]
    assert (tmp_path / "certs" / "site.test.pem").read_bytes() == before


def test_files_only_a_certificate_its_check_refuses_keeps_the_old_file(tmp_path: Path) -> None:
    """With no Runtime API (HAProxy reads the files at its next reload), a certificate is written
    only once its check (`haproxy -c` on the staged file) accepted it."""
    refuse = False

    def check(staged: Path) -> None:
        if refuse:
            raise ValidationError(f"haproxy -c rejected {staged}:\n[ALERT] unable to load certificate")

    sync = CertificateSync(tmp_path / "certs", check=check)
    sync.prepare()
    sync.sync((KeyPair("site.test", bundle()), KeyPair("other", bundle("other.test"))))
    before = (tmp_path / "certs" / "site.test.pem").read_bytes()
    refuse = True
    assert sync.sync((KeyPair("site.test", bundle()), KeyPair("new", bundle("new.test")))) == ["removed other"]
    assert (tmp_path / "certs" / "site.test.pem").read_bytes() == before
    assert "unable to load certificate" in sync.refused["site.test"] and "unable to load" in sync.refused["new"]
    assert not (tmp_path / "certs" / "new.pem").exists()
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["crt-list.txt", "site.test.pem"]


def test_haproxy_check_accepts_a_good_certificate(tmp_path: Path, haproxy_bin: str) -> None:
    check = haproxy_check(haproxy_bin)
    assert check is not None and haproxy_check(None) is None
    sync = CertificateSync(tmp_path / "certs", haproxy_bin=haproxy_bin)
    assert sync.check is not None
    sync.prepare()
    assert sync.sync((KeyPair("site.test", bundle()),))[0].startswith("added site.test")
    staged = tmp_path / "broken.pem"
    staged.write_text(bundle().split("-----BEGIN PRIVATE KEY-----")[0])
    with pytest.raises(ValidationError, match="haproxy -c rejected"):
        check(staged)
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["crt-list.txt", "site.test.pem"]


def test_prepare_unlists_an_invalid_file_left_listed_and_keeps_the_others(tmp_path: Path) -> None:
    """A file an earlier run listed that is not valid now (an older renderer took weak keys) would
    make HAProxy serve it, or refuse the whole crt-list: it is unlisted and reported."""
    directory = tmp_path / "certs"
    directory.mkdir()
    weak, good = directory / "weak.pem", directory / "good.pem"
    weak.write_text(bundle("weak.test", key=rsa.generate_private_key(65537, 1024)))
    good.write_text(bundle("good.test"))
    (directory / "crt-list.txt").write_text(f"{weak}\n{directory / 'gone.pem'}\n{good}\n")
    sync = CertificateSync(directory, FakeRuntime())
    sync.prepare()
    assert list(sync.served) == ["good"]
    assert (directory / "crt-list.txt").read_text() == f"{good}\n"
    assert "RSA key of 1024 bits" in sync.refused["weak"] and "unlisted" in sync.refused["weak"]
    sync.sync((KeyPair("good", good.read_text()),))
    assert "weak" in sync.refused  # still reported: the file is still there, unlisted
    sync.sync((KeyPair("good", good.read_text()), KeyPair("weak", bundle("weak.test"))))
    assert "weak" not in sync.refused and set(sync.served) == {"good", "weak"}


# -- a hostile writer under the prefix (a review's findings) -------------------------------------


def _leaf_with(public: rsa.RSAPublicKey | None, names: list[str], cn: str = "site.test") -> str:
    """A leaf for `names` carrying `public` (default: a fresh P-256 key's), signed by a CA, with a
    private key of its own that need not match: what a writer could put under the prefix."""
    ca, ca_key = authority()
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject).public_key(public or key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    )  # fmt: skip
    cert = builder.sign(ca_key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )).decode()  # fmt: skip


def test_an_rsa_key_past_8192_bits_is_refused_before_any_private_key_is_loaded() -> None:
    """Loading an 8,192-bit private key took 5.3 s (OpenSSL's key validation) and the loop waits for
    the certificates: two such values held every update 16.7 s, again at each change under the
    prefix. The certificate's own key size now refuses it first (a 9,000-bit modulus, no primes
    needed for a public key; the private key beside it does not even match)."""
    huge = rsa.RSAPublicNumbers(65537, (1 << 8999) | 1).public_key()
    with pytest.raises(CertificateError, match="RSA key of 9000 bits: more than 8192"):
        inspect("big", _leaf_with(huge, ["site.test"]))


@pytest.mark.parametrize("dns", ["*", "*.com", "evil\nERROR forged", "a..b", "-x.example"])
def test_a_name_that_is_no_host_name_or_a_too_wide_wildcard_is_refused(dns: str) -> None:
    with pytest.raises(CertificateError, match="is not a host name or a wildcard over two labels") as err:
        inspect("wide", _leaf_with(None, ["site.test", dns]))
    assert "\n" not in str(err.value)  # shown quoted: no forged log line


@pytest.mark.parametrize(
    "dns", ["*.co.uk", "*.Co.Uk.", "*.kawasaki.jp", "*.com.au", "*.foo.ck", "*.github.io", "*.s3.amazonaws.com"]
)
def test_a_wildcard_over_a_public_suffix_is_refused(dns: str) -> None:
    """helper-136 (/tmp/rev82): `*.co.uk` passed the two labels, and HAProxy answered it for every
    name under the suffix no other certificate named. Refused, in the SAN and in the CN, by the
    public suffix list; its private entries too, shared by their owners' tenants (helper-139)."""
    with pytest.raises(CertificateError, match=r"is a wildcard over the public suffix [a-z0-9.-]+, which would answer"):
        inspect("wide", _leaf_with(None, ["site.test", dns]))
    with pytest.raises(CertificateError, match="public suffix"):
        inspect("cn", _leaf_with(None, ["evil.example.net"], cn=dns))


def test_a_wildcard_over_ones_own_domain_is_served() -> None:
    """One level under a public suffix (an ICANN one or a private one), or an internal name: served."""
    wildcards = ["*.example.co.uk", "*.city.kawasaki.jp", "*.example.github.io", "*.corp.local", "*.www.ck"]
    assert inspect("own", _leaf_with(None, wildcards)).names == tuple(sorted([*wildcards, "site.test"]))


def test_a_value_is_parsed_once_while_it_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change under the prefix looks at every value again: a refused one is not parsed again."""
    import renderer.deliver.certs as certs

    parsed: list[str] = []
    real = certs.parse_bundle
    monkeypatch.setattr(certs, "parse_bundle", lambda name, text: parsed.append(name) or real(name, text))
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    bad, good = KeyPair("bad", "not a certificate"), KeyPair("site.test", bundle())
    sync.sync((bad, good))
    sync.sync((bad, good, KeyPair("other.test", bundle("other.test"))))
    assert parsed == ["bad", "site.test", "other.test"] and "bad" in sync.refused


def test_a_key_given_twice_under_the_prefix_is_refused_and_the_served_one_stays(tmp_path: Path) -> None:
    """`haproxy/certs//shop` beside `haproxy/certs/shop` names `shop` twice; Consul sorts the `//`
    one first. Neither is taken: the one served before keeps serving."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    served = bundle()
    sync.sync((KeyPair("site.test", served),))
    sync.sync((KeyPair("site.test", bundle()), KeyPair("site.test", served)))
    assert "given twice" in sync.refused["site.test"]
    assert sync.served["site.test"].fingerprint == inspect("site.test", served).fingerprint


def test_the_crt_list_keeps_the_running_lists_order_across_a_restart(tmp_path: Path) -> None:
    """HAProxy's running list grows at its end (`add ssl crt-list`); the file was sorted by key, so
    a reload reordered it: the default certificate, and which of two certificates for one name
    answers, changed (a later `aaa` carrying `shop.example.com` took it over at the next reload)."""
    runtime = FakeRuntime()
    sync = CertificateSync(tmp_path / "certs", runtime)
    sync.prepare()
    shop, late = KeyPair("shop", bundle("shop.example.com")), KeyPair("aaa", bundle("shop.example.com"))
    sync.sync((shop,))
    sync.sync((late, shop))
    order = [str(tmp_path / "certs" / f"{n}.pem") for n in ("shop", "aaa")]
    added = [c.split(" <<")[0].split(" ")[-1] for c in runtime.sent if c.startswith("add ssl crt-list")]
    assert added == order  # the running list
    assert (tmp_path / "certs" / "crt-list.txt").read_text().split() == order  # the file, the same
    again = CertificateSync(tmp_path / "certs", FakeRuntime())  # a restarted renderer
    again.prepare()
    assert list(again.served) == ["shop", "aaa"]
    assert (tmp_path / "certs" / "crt-list.txt").read_text().split() == order


def test_a_too_wide_wildcard_in_the_cn_is_refused_beside_a_harmless_san() -> None:
    """HAProxy takes the CN as an SNI name too (a crt-list line without filters): CN `*.com` beside
    SAN `evil.example.net` answered `bank.com` (a review's reproduction on HAProxy 2.8). A CN that is
    no host name at all is let be; an internal name with `_` or a trailing dot is a host name."""
    with pytest.raises(CertificateError, match=r"cn: '\*\.com' is not a host name or a wildcard"):
        inspect("cn", _leaf_with(None, ["evil.example.net"], cn="*.com"))
    for common in ("Acme Internal", "Acme *Test* CA", "Acme\u00a0Corp"):  # no host names: let be
        assert inspect("cn", _leaf_with(None, ["a.example.net"], cn=common)).names == ("a.example.net",)
    with pytest.raises(CertificateError, match=r"'a\\u2028b' is not a host name"):
        inspect("cn", _leaf_with(None, ["a.example.net"], cn="a\u2028b"))
    assert inspect("cn", _leaf_with(None, ["my_host.corp.local", "b.example.net."])).names == (
        "b.example.net.", "my_host.corp.local", "site.test",
    )  # fmt: skip


def test_a_refused_value_kept_in_the_cache_keeps_no_frames(tmp_path: Path) -> None:
    """The cache kept the error itself and raised it again at every sync: each raise added that
    sync's frames to its traceback, and with them the whole KV answer (a review: 22 MB after 200
    syncs). Each sync now raises a new error from the message kept."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime())
    sync.prepare()
    for n in range(3):
        sync.sync((KeyPair("bad", "not a certificate"), KeyPair("x", f"changing {n}")))
    kept = sync._parsed[("bad", "not a certificate")]
    assert isinstance(kept, str) and "no PEM certificate" in kept


class SmallBuffer(FakeRuntime):
    """A Runtime API whose CLI buffer takes no `set ssl cert` payload (HAProxy's answer when a
    command exceeds tune.bufsize)."""

    def command(self, command: Command) -> str:
        if command.startswith("set ssl cert"):
            self.sent.append(command)
            return "The command is too big for the buffer size. Please change tune.bufsize in the configuration"
        return super().command(command)


def test_a_certificate_beyond_the_cli_buffer_goes_in_by_a_checked_file_and_a_reload(tmp_path: Path) -> None:
    """A bundle the Runtime API cannot carry (HAProxy answers "too big for the buffer size": 24 KB
    measured, a certificate of 600 names) was refused, the old one serving on: it could never be
    rotated. Now its file is checked (`haproxy -c`, as with no Runtime API), written and listed, and
    `reload_needed` has the delivery reload HAProxy, which reads it then."""
    checked: list[str] = []
    runtime = SmallBuffer()
    sync = CertificateSync(tmp_path / "certs", runtime, check=lambda staged: checked.append(staged.read_text()))
    sync.prepare()
    path = tmp_path / "certs" / "site.test.pem"
    first, second = bundle(), bundle()
    until = f"{inspect('site.test', first).not_after:%Y-%m-%d}"
    assert sync.sync((KeyPair("site.test", first),)) == [f"added site.test (site.test; until {until}; at a reload)"]
    sent = [c.split(" <<")[0] for c in runtime.sent]
    assert sent == [f"new ssl cert {path}", f"set ssl cert {path}", f"del ssl cert {path}"]  # the empty store goes
    assert sync.refused == {} and sync.reload_needed is not None and "tune.bufsize" in sync.reload_needed
    assert (tmp_path / "certs" / "crt-list.txt").read_text() == f"{path}\n" and len(checked) == 1
    assert inspect("site.test", path.read_text()).fingerprint == inspect("site.test", first).fingerprint
    sync.reload_needed = None  # the delivery reloaded
    changes = sync.sync((KeyPair("site.test", second),))
    assert changes[0].startswith("rotated site.test") and changes[0].endswith("at a reload)")
    assert inspect("site.test", path.read_text()).fingerprint == inspect("site.test", second).fingerprint
    assert sync.reload_needed is not None and len(checked) == 2


class MasterBuffer(FakeRuntime):
    """HAProxy 2.8.25's CLI through its master, with a buffer of `buffer` bytes: a command longer is
    answered "too big for the buffer size", but one far beyond it now and then with nothing at all
    (1 of 20 at 71 KB, measured; 6 of 20 at 74 KB, helper-136): here always nothing; one of the
    buffer's size less one is never answered and HAProxy aborts (helper-139): `crashed` then."""

    def __init__(self, buffer: int = DEFAULT_BUFSIZE) -> None:
        super().__init__()
        self.buffer, self.crashed = buffer, False

    def command(self, command: Command) -> str:
        if len(command.encode()) == self.buffer - 1:
            self.sent.append(command)
            self.crashed = True
            return ""
        if len(command.encode()) >= self.buffer:
            self.sent.append(command)
            return ""
        return super().command(command)


def many_names(count: int, name: str = "site.test") -> str:
    return bundle(name, also=tuple(f"h{n:05d}.{name}" for n in range(count)))


def test_a_certificate_beyond_the_cli_buffer_is_never_sent(tmp_path: Path) -> None:
    """helper-136 (/tmp/rev82, its finding 2): HAProxy's empty answer to a payload far beyond its
    buffer left its state unknown, so the sync raised RuntimeApplyError, the delivery reloaded and
    synced again: 1-3 reloads at each flip of a large bundle. Its size is judged before anything is
    sent: such a certificate goes in by its checked file and a reload, as a "too big" one does."""
    runtime = MasterBuffer()
    checked: list[Path] = []
    sync = CertificateSync(tmp_path / "certs", runtime, check=checked.append)
    sync.prepare()
    sync.sync((KeyPair("site.test", bundle()),))
    runtime.sent.clear()
    big, other = many_names(2900), many_names(2900, "other.test")
    changes = sync.sync((KeyPair("site.test", big), KeyPair("other", other)))
    assert [c.split(" (")[0] for c in changes] == ["added other", "rotated site.test"]
    assert all(c.endswith("at a reload)") for c in changes) and len(checked) == 2
    assert runtime.sent == [] and sync.refused == {} and sync.reload_needed is not None
    assert sync.served["site.test"].fingerprint == inspect("site.test", big).fingerprint


@pytest.mark.parametrize("short", [1, 2, CLI_RESERVE - 1, CLI_RESERVE])
def test_a_command_that_would_fill_the_cli_buffer_is_never_sent(tmp_path: Path, short: int) -> None:
    """helper-139 (/tmp/rev85, `kv_crash.py`): a `set ssl cert` of exactly the buffer's size less one
    (a valid bundle tuned by its key name's length) was sent, never answered, and HAProxy 2.8.25
    aborted its worker and its master with it: one KV write took HAProxy down. The buffer is the
    one HAProxy says (`show pools`), and a command within CLI_RESERVE of it goes by file."""
    value = many_names(300)
    pem = inspect("site.test", value).pem
    length = len(words.payload_command(pem, "set", "ssl", "cert", str(tmp_path / "certs" / "site.test.pem")))
    runtime = MasterBuffer(length + short)
    sync = CertificateSync(tmp_path / "certs", runtime, check=lambda staged: None)
    sync.prepare()
    first = KeyPair("first", bundle("first.test"))
    sync.sync((first,))
    runtime.sent.clear()
    changes = sync.sync((first, KeyPair("site.test", value)))
    sent = any(c.startswith("set ssl cert") and "site.test" in c for c in runtime.sent)
    assert not runtime.crashed and changes[-1].endswith("at a reload)") != sent
    assert sent == (short >= CLI_RESERVE)  # with CLI_RESERVE to spare, through the Runtime API


class PoolsAnswer(FakeRuntime):
    """A Runtime API whose `show pools` answers `answer`."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    def command(self, command: Command) -> str:
        return self.answer if command == "show pools" else super().command(command)


def test_a_cli_buffer_haproxy_does_not_tell_is_never_guessed(tmp_path: Path) -> None:
    """helper-140 (/tmp/rev86): an answer without the buffer pool's line was taken for HAProxy's
    default 16,384, and a real 8,192-byte buffer was filled (`kv_flaky.py`: "Can't connect to the
    target CLI!" to `show pools`; `kv_pools.py`: tune.bufsize 1304, whose pool HAProxy merges under
    another name): HAProxy aborted. An answer that is no dump is an unknown state (the delivery
    reloads); a dump without the line sends no payload (by file and a reload)."""
    first = KeyPair("first", bundle("first.test"))
    unreachable = PoolsAnswer("Can't connect to the target CLI!")
    sync = CertificateSync(tmp_path / "a", unreachable, check=lambda staged: None)
    sync.prepare()
    with pytest.raises(RuntimeApplyError, match="show pools"):
        sync.sync((first,))
    assert not any(c.startswith(("new ssl cert", "set ssl cert")) for c in unreachable.sent)
    merged = PoolsAnswer("Dumping pools usage. Use SIGQUIT to flush them.\n  - Pool trash (1304 bytes) : 2 allocated\n")
    sync = CertificateSync(tmp_path / "b", merged, check=lambda staged: None)
    sync.prepare()
    assert sync.sync((first,))[0].endswith("at a reload)") and merged.sent == []


def test_a_larger_cli_buffer_takes_a_larger_certificate_through_the_runtime_api(tmp_path: Path) -> None:
    """`tune.bufsize` raised in the config: `show pools` says so, and a 17.8 KB bundle, beyond the
    default buffer, is rotated with no reload; asked again at each sync (a reload may change it)."""
    runtime = MasterBuffer()
    sync = CertificateSync(tmp_path / "certs", runtime, check=lambda staged: None)
    sync.prepare()
    sync.sync((KeyPair("site.test", bundle()),))
    big = many_names(700)
    assert len(big) > DEFAULT_BUFSIZE
    assert sync.sync((KeyPair("site.test", big),))[0].endswith("at a reload)")  # the default buffer
    sync.reload_needed = None
    runtime.buffer = 65536  # HAProxy reloaded on `tune.bufsize 65536`
    changes = sync.sync((KeyPair("site.test", many_names(700)),))
    assert changes[0].startswith("rotated site.test") and not changes[0].endswith("at a reload)")
    assert sync.reload_needed is None and runtime.sent[-1].startswith("commit ssl cert")


def test_a_renewal_not_valid_yet_is_taken_once_it_is_with_no_write_under_the_prefix(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev39): a renewal dated a moment ahead was refused once and looked
    at again only at the next write under the prefix; the old certificate served on, to its expiry."""
    clock = [NOW]
    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), clock=lambda: clock[0])
    sync.prepare()
    old, renewal = bundle(), bundle(start_days=1)
    sync.sync((KeyPair("site.test", old),))
    pairs = (KeyPair("site.test", renewal),)
    assert sync.sync(pairs) == [] and "not valid before" in sync.refused["site.test"]
    due = sync.due_at()
    assert due is not None and 86_000 < due - time.monotonic() <= 86_400
    assert sync.sync(pairs) == []  # not valid yet: nothing to do
    clock[0] = NOW + datetime.timedelta(days=1, seconds=1)
    assert sync.sync(pairs)[0].startswith("rotated site.test")  # the same KV answer, valid now
    assert sync.served["site.test"].fingerprint == inspect("site.test", renewal, clock[0]).fingerprint
    assert sync.due_at() is None and "site.test" not in sync.refused


def test_a_bundle_of_many_key_lines_without_an_end_is_refused_in_linear_time(pace: Pace) -> None:
    """The same review: a lazy BEGIN.*?END pattern scanned from every BEGIN line to the end of the
    value, holding the GIL (16,000 such lines, 448 KB: 30 s, every update with it). Past
    MAX_BUNDLE_BYTES a value is refused unread; below it the key is found in one pass."""
    junk = "-----BEGIN PRIVATE KEY-----\n" * 4_600  # just below the limit
    started = time.monotonic()
    with pytest.raises(CertificateError, match="no private key"):
        inspect("site.test", bundle().split("-----BEGIN PRIVATE KEY-----")[0] + junk)
    assert time.monotonic() - started < pace(1.0)  # generous: 2.8 s before, a few ms now
    with pytest.raises(CertificateError, match="more than 131072"):
        inspect("site.test", bundle() + junk * 2)
    started = time.monotonic()
    with pytest.raises(CertificateError, match="no private key"):
        _private_key("site.test", (junk * 4).encode())  # 448 KB: 30 s before
    assert time.monotonic() - started < pace(1.0)


def test_past_certs_max_the_keys_not_served_yet_are_refused_unread_and_noted(tmp_path: Path) -> None:
    """helper-136 (/tmp/rev82): nothing bounded the certificates under the prefix; 45,000 valid ones
    took minutes to take in and made every `haproxy -c` of a config change time out. At most
    `limit` are served: those served already first, then in key order; the rest are never parsed."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), limit=2)
    sync.prepare()
    sync.sync((KeyPair("m", bundle("m.test")),))
    pairs = (KeyPair("a", bundle("a.test")), KeyPair("b", bundle("b.test")), KeyPair("m", bundle("m.test")),
             KeyPair("zz", "not PEM at all"))  # fmt: skip
    changes = sync.sync(pairs)
    assert [c.split(" (")[0] for c in changes] == ["added a", "rotated m"]
    assert set(sync.served) == {"a", "m"} and sync.beyond == ("b", "zz") and "zz" not in sync.refused


def test_a_large_sync_goes_on_at_the_next_pass_after_its_slice(tmp_path: Path) -> None:
    """helper-136 (/tmp/rev82): the pass waits for the certificates' sync before any template is
    delivered, and each certificate costs 3-12 ms of Runtime API: a write of 6,000 held a new
    instance back 14.1 s. A sync stops after its slice, says so (`more`, `due_at`), and the next
    goes on; a value not parsed yet waits for it."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), slice_s=0.0)
    sync.prepare()
    pairs = tuple(KeyPair(f"k{n}", bundle(f"k{n}.test")) for n in range(4))
    syncs = 0
    while True:
        syncs += 1
        changes = sync.sync(pairs)
        assert len(changes) <= 1
        if not sync.more:
            break
        assert sync.due_at() is not None and syncs < 20
    assert set(sync.served) == {"k0", "k1", "k2", "k3"} and syncs >= 4
    assert sync.sync(pairs) == [] and not sync.more  # all of it went through: the same answer is no work


class LongAnswers(FakeRuntime):
    """HAProxy answering as it does with ~300 bind lines using the certificate (a dot each), and a
    store a list still names refusing its deletion."""

    def command(self, command: Command) -> str:
        if command.startswith(("commit", "add")):
            self.sent.append(command)
            return "Committing" + " ." * 300 + "\nSuccess!"
        if command.startswith("del ssl cert"):
            self.sent.append(command)
            return f"Can't remove the certificate: certificate '{command.split()[3]}' in use, can't be deleted!"
        return super().command(command)


def test_answers_are_matched_whole_and_a_refused_deletion_is_no_success(tmp_path: Path) -> None:
    """helper-136 (/tmp/rev82): answers were cut to 300 characters, so "Success!" after a dot per
    bind line was lost (a rotation HAProxy took reported refused, its old file kept), and "… in
    use, can't be deleted!" passed for "deleted"."""
    sync = CertificateSync(tmp_path / "certs", LongAnswers())
    sync.prepare()
    assert sync.sync((KeyPair("a", bundle("a.test")), KeyPair("b", bundle("b.test"))))[0].startswith("added a")
    assert sync.sync((KeyPair("a", bundle("a.test")), KeyPair("b", bundle("b.test"))))[0].startswith("rotated a")
    with pytest.raises(RuntimeApplyError, match="in use"):
        sync.sync((KeyPair("a", bundle("a.test")),))  # b unlisted, its store's deletion refused: unknown


def test_the_master_cli_not_reaching_the_worker_leaves_the_state_unknown(tmp_path: Path) -> None:
    """helper-136 (/tmp/rev82): "Can't connect to the target CLI!" (the master CLI, 6 of 20 times for
    a 74 KB payload) was read as HAProxy refusing the certificate: a legitimate bundle stayed refused
    until its value changed. HAProxy said nothing of it: the caller reloads."""

    class NoTarget(FakeRuntime):
        def command(self, command: Command) -> str:
            if command.startswith("set ssl cert"):
                return "Can't connect to the target CLI!"
            return super().command(command)

    sync = CertificateSync(tmp_path / "certs", NoTarget())
    sync.prepare()
    with pytest.raises(RuntimeApplyError, match="target CLI"):
        sync.sync((KeyPair("a", bundle("a.test")),))
    assert "a" not in sync.refused


def test_the_keys_past_certs_max_are_told_in_one_note_with_their_names_quoted(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from renderer.deliver.delivery import Delivery

    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), limit=1)
    sync.prepare()
    sync.sync((KeyPair("a", bundle("a.test")), KeyPair("b\n<script>", "x"), KeyPair("c", "y")))
    delivery = SimpleNamespace(_certs=sync, _certificates_pending=SimpleNamespace(why=None))
    notes = Delivery.certificate_notes(delivery)  # type: ignore[arg-type]
    note = notes["refused", ""]
    assert note.startswith("2 certificate key(s) past certs_max (1) not served (the first: 'b\\n<script>', 'c')"), note
    assert "\n" not in note


def test_a_cut_sync_whose_prefix_goes_back_to_the_last_whole_answer_removes_what_it_added(tmp_path: Path) -> None:
    """helper-137 (/tmp/rev83): a sync cut at its slice, then KV back to the last answer synced
    whole: `sync` returned early (the same answer), what the first slices added stayed served (and
    listed across restarts), and `due_at` said "now" at every pass: 58 passes a second."""
    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), slice_s=0.0)
    sync.prepare()
    base = (KeyPair("legit", bundle("legit.test")),)
    sync.sync(base)
    assert not sync.more
    sync.sync(base + tuple(KeyPair(f"x{n}", bundle(f"x{n}.test")) for n in range(3)))
    assert sync.more and "x0" in sync.served
    for _ in range(10):
        sync.sync(base)
        if not sync.more:
            break
    assert set(sync.served) == {"legit"} and not sync.more and sync.due_at() is None


def test_certs_max_changed_by_a_sighup_takes_effect_at_the_next_sync(tmp_path: Path) -> None:
    """helper-137 (/tmp/rev83): the limit was fixed when the sync was built: "raise certs_max", as
    the note past it says, did nothing until a restart."""
    from dataclasses import replace as replaced
    from types import SimpleNamespace

    from renderer.config import Config
    from renderer.deliver.delivery import Delivery

    sync = CertificateSync(tmp_path / "certs", FakeRuntime(), limit=1)
    sync.prepare()
    pairs = (KeyPair("a", bundle("a.test")), KeyPair("b", bundle("b.test")))
    sync.sync(pairs)
    assert set(sync.served) == {"a"} and sync.beyond == ("b",)
    config = replaced(Config(templates=()), certs_max=5)
    delivery = SimpleNamespace(
        _haproxy=SimpleNamespace(reconfigured=lambda config: None), _installer=SimpleNamespace(),
        _destinations={}, _certs=sync, _config=None,
    )  # fmt: skip
    Delivery.reconfigure(delivery, config)  # type: ignore[arg-type]
    sync.sync(pairs)
    assert set(sync.served) == {"a", "b"} and sync.beyond == ()
