"""TLS certificates from KV: validated before anything is written or sent; rotated by Runtime API
commands whose payload is PEM only; a refused one leaves the old one serving."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from renderer.deliver.certs import CertificateError, CertificateSync, inspect
from renderer.haproxy.runtime_grammar import Command
from renderer.source.dependency import KeyPair

NOW = datetime.datetime.now(datetime.UTC)


def bundle(name: str = "site.test", days: int = 30, start_days: int = -1, key: ec.EllipticCurvePrivateKey | None = None,
           signer: ec.EllipticCurvePrivateKey | None = None, san: bool = True) -> str:  # fmt: skip
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key((signer or key).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=start_days))
        .not_valid_after(NOW + datetime.timedelta(days=days))
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    cert = builder.sign(signer or key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return (pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())).decode()  # fmt: skip


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


class FakeRuntime:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def command(self, command: Command) -> str:
        self.sent.append(command)
        verb = command.split(" ", 3)
        return {
            "new": "New empty certificate store",
            "set": "Transaction created for certificate",
            "commit": "Committing\nSuccess!",
            "add": "Inserting\nSuccess!",
            "del": "Success!" if verb[2] == "crt-list" else "Certificate deleted!",
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
    assert sync.sync(()) == ["removed site.test"]
    assert not Path(path).exists() and (tmp_path / "certs" / "crt-list.txt").read_text() == ""


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
