"""Deployment PKI: CA, SuperLink certificate, Flower node keys, signing key, permissions."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedinfer.artifacts import load_public_key, load_signing_key
from fedinfer.artifacts.signing import sign_bytes, verify_bytes
from fedinfer.deploy.certs import Pki, add_site, describe, init_pki, renew_server_cert
from fedinfer.errors import ConfigError, ModelIntegrityError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return init_pki(
        tmp_path_factory.mktemp("pki") / "pki",
        hosts=["coord.example.org", "10.1.2.3"],
        sites=["a", "b"],
    )


def _verify(pki_root: Path, server_name: x509.GeneralName) -> None:
    ca = x509.load_pem_x509_certificate((pki_root / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki_root / "coordinator" / "superlink.crt").read_bytes())
    name = server_name.value
    subject = x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(cert, [])


@pytest.mark.parametrize(
    "host",
    [
        x509.DNSName("coord.example.org"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ],
    ids=["dns", "ip", "localhost", "loopback"],
)
def test_server_certificate_chains_to_the_ca_for_every_host(
    pki: Pki, host: x509.GeneralName
) -> None:
    _verify(pki.root, host)


def test_server_certificate_is_refused_for_another_host(pki: Pki) -> None:
    with pytest.raises(VerificationError):
        _verify(pki.root, x509.DNSName("evil.example.org"))


def test_server_certificate_is_refused_under_another_ca(pki: Pki, tmp_path: Path) -> None:
    # Prepare
    other = init_pki(tmp_path / "other", hosts=["coord.example.org"])
    ca = x509.load_pem_x509_certificate(other.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    # Execute / Assert
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost")).verify(
            cert, []
        )


def test_private_keys_are_owner_only(pki: Pki) -> None:
    private = [pki.ca_key, pki.server_key, pki.signing_key, pki.node_key("a"), pki.node_key("b")]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(pki.ca_key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.ca_cert.stat().st_mode) == 0o644


def test_node_keys_are_what_flower_loads(pki: Pki) -> None:
    """The SuperNode loads OpenSSH EC private keys; `flwr supernode register` the public ones."""
    from flwr.cli.supernode.register import try_load_public_key

    private = serialization.load_ssh_private_key(pki.node_key("a").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    registered = try_load_public_key(pki.node_pub("a"))
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert registered == public
    assert try_load_public_key(pki.node_pub("b")) != registered


def test_site_bundle_holds_what_a_site_needs(pki: Pki) -> None:
    bundle = pki.site_dir("a")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "ca.crt",
        "coordinator.pub",
        "node.key",
        "node.pub",
    ]
    assert (bundle / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
    assert (bundle / "coordinator.pub").read_bytes() == pki.signing_pub.read_bytes()


def test_signing_key_signs_what_the_site_copy_verifies(pki: Pki) -> None:
    key = load_signing_key(pki.signing_key)
    site_copy = load_public_key(pki.site_dir("a") / "coordinator.pub")
    verify_bytes(site_copy, sign_bytes(key, b"manifest"), b"manifest")
    with pytest.raises(ModelIntegrityError):
        verify_bytes(site_copy, sign_bytes(key, b"manifest"), b"tampered manifest")


def test_add_site_with_its_own_public_key_stores_no_private_key(pki: Pki, tmp_path: Path) -> None:
    # Prepare
    own = ec.generate_private_key(ec.SECP384R1())
    pub = tmp_path / "site.pub"
    pub.write_bytes(
        own.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    # Execute
    bundle = add_site(pki.root, "hospital-c", public_key=pub)
    # Assert
    assert not (bundle / "node.key").exists()
    assert "hospital-c" in pki.sites() and "hospital-c" in describe(pki.root)["sites"]


def test_add_site_refuses_a_key_flower_cannot_use(pki: Pki, tmp_path: Path) -> None:
    pub = tmp_path / "ed.pub"
    pub.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ConfigError, match="needs an EC key"):
        add_site(pki.root, "d", public_key=pub)


@pytest.mark.parametrize(
    ("name", "message"),
    [("a", "already has a key"), ("Bad Name", "invalid"), ("../x", "invalid")],
    ids=["duplicate", "spaces", "path"],
)
def test_add_site_refuses_bad_names(pki: Pki, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        add_site(pki.root, name)


def test_init_refuses_an_existing_pki(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="already holds a PKI"):
        init_pki(pki.root, hosts=["x"])


def test_renew_server_issues_a_new_key_and_keeps_the_ca(tmp_path: Path) -> None:
    # Prepare
    pki = init_pki(tmp_path / "pki", hosts=["old.example.org"])
    before_key, ca = pki.server_key.read_bytes(), pki.ca_cert.read_bytes()
    # Execute
    renew_server_cert(pki.root, hosts=["new.example.org"], days=30)
    # Assert
    assert pki.server_key.read_bytes() != before_key and pki.ca_cert.read_bytes() == ca
    _verify(pki.root, x509.DNSName("new.example.org"))
    with pytest.raises(VerificationError):
        _verify(pki.root, x509.DNSName("old.example.org"))
    assert describe(pki.root)["server_days_left"] in (29, 30)
