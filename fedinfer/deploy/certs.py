"""A deployment's key material: private CA, SuperLink TLS certificate, node keys, signing key.

Layout of a PKI directory (``fedinfer certs init OUT``)::

    OUT/
      pki.json                      hosts, sites, fingerprints, expiry dates (no secrets)
      ca.crt                        the CA certificate every site trusts
      private/ca.key                0600; needed only to issue or renew; keep it offline
      coordinator/superlink.crt     TLS certificate (SANs: hosts, localhost, 127.0.0.1, ::1)
      coordinator/superlink.key     0600
      coordinator/signing.key       0600, Ed25519: signs every published model
      coordinator/signing.pub       what sites verify models with
      sites/<name>/node.key         0600, EC P-384 in OpenSSH format: the SuperNode's identity
      sites/<name>/node.pub         registered at the SuperLink (``flwr supernode register``)
      sites/<name>/ca.crt           copy: the site bundle is ``sites/<name>/`` as a whole
      sites/<name>/coordinator.pub  copy of coordinator/signing.pub

Flower's node authentication wants an elliptic-curve key on a NIST curve in
OpenSSH format; P-384 is what Flower's documentation uses. A site that makes
its own key pair keeps the private half at home: ``add_site(..., public_key=)``
registers only its public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedinfer.artifacts import generate_signing_key, save_public_key, save_signing_key
from fedinfer.deploy.keyfiles import write_private, write_public
from fedinfer.errors import ConfigError

__all__ = [
    "CA_DAYS",
    "LOCAL_HOSTS",
    "SERVER_DAYS",
    "Pki",
    "add_site",
    "describe",
    "init_pki",
    "load_node_public_key",
    "renew_server_cert",
]

CA_DAYS = 3650
"""Validity of the CA certificate (10 years); renewing it means re-distributing ca.crt."""
SERVER_DAYS = 397
"""Validity of the SuperLink certificate (CA/Browser Forum maximum); renew with ``renew-server``."""
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Always in the SuperLink certificate, so the coordinator can reach its own SuperLink."""

_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Pki:
    """Paths inside a PKI directory (see the module docstring)."""

    root: Path

    @property
    def manifest(self) -> Path:  # noqa: D102
        return self.root / "pki.json"

    @property
    def ca_cert(self) -> Path:  # noqa: D102
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:  # noqa: D102
        return self.root / "private" / "ca.key"

    @property
    def server_cert(self) -> Path:  # noqa: D102
        return self.root / "coordinator" / "superlink.crt"

    @property
    def server_key(self) -> Path:  # noqa: D102
        return self.root / "coordinator" / "superlink.key"

    @property
    def signing_key(self) -> Path:  # noqa: D102
        return self.root / "coordinator" / "signing.key"

    @property
    def signing_pub(self) -> Path:  # noqa: D102
        return self.root / "coordinator" / "signing.pub"

    def site_dir(self, name: str) -> Path:
        """Return the directory of the bundle handed to site ``name``."""
        return self.root / "sites" / name

    def node_key(self, name: str) -> Path:  # noqa: D102
        return self.site_dir(name) / "node.key"

    def node_pub(self, name: str) -> Path:  # noqa: D102
        return self.site_dir(name) / "node.pub"

    def sites(self) -> list[str]:
        """Names of the sites whose public node key is registered here, sorted."""
        root = self.root / "sites"
        return sorted(p.parent.name for p in root.glob("*/node.pub")) if root.is_dir() else []


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name, else raise ConfigError naming the rule."""
    if not _SITE_NAME.match(name):
        raise ConfigError(
            f"site name {name!r} is invalid: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
            raise ConfigError(
                f"`--coordinator-host` {host!r} is neither an IP address nor a DNS name"
            ) from None
        return x509.DNSName(host)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedinfer deployment CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _hosts(hosts: Sequence[str]) -> list[str]:
    """Order hosts: the user's first (the first names the certificate), then loopback."""
    ordered = [h.strip() for h in hosts if h.strip()] + list(LOCAL_HOSTS)
    return list(dict.fromkeys(ordered))


def init_pki(
    root: Path,
    *,
    hosts: Sequence[str],
    sites: Sequence[str] = (),
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
) -> Pki:
    """Create a CA, the SuperLink certificate, the model-signing key and one node key per site.

    Parameters
    ----------
    root : Path
        New directory (must not hold a ``pki.json`` yet).
    hosts : list of str
        Names and IP addresses sites use to reach the coordinator.
    sites : list of str
        Site names; more can be added later with :func:`add_site`.
    ca_days, server_days : int
        Validity in days (default: 3650 and 397).

    Examples
    --------
    >>> pki = init_pki(Path("pki"), hosts=["fl.example.org"], sites=["a", "b"])  # doctest: +SKIP
    >>> pki.sites()  # doctest: +SKIP
    ['a', 'b']
    """
    pki = Pki(Path(root))
    if pki.manifest.exists():
        raise ConfigError(
            f"{pki.manifest} exists: {root} already holds a PKI; use `fedinfer certs add-site`"
        )
    for name in sites:
        check_site_name(name)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, ca_days)
    write_private(pki.ca_key, _pem_private(ca_key))
    write_public(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    signing = generate_signing_key()
    pki.signing_key.parent.mkdir(parents=True, exist_ok=True)
    save_signing_key(signing, pki.signing_key)
    save_public_key(signing, pki.signing_pub)
    _write_manifest(pki, {"created": _now().isoformat(), "hosts": _hosts(hosts), "sites": {}})
    renew_server_cert(pki.root, days=server_days)
    for name in sites:
        add_site(pki.root, name)
    return pki


def renew_server_cert(
    root: Path, *, hosts: Sequence[str] | None = None, days: int = SERVER_DAYS
) -> Path:
    """Issue a new SuperLink certificate (new key) from the CA; sites need nothing new.

    ``hosts`` replaces the recorded host list when given. Restart the coordinator
    afterwards: the SuperLink reads its certificate at start-up.
    """
    pki = Pki(Path(root))
    manifest = _read_manifest(pki)
    if hosts is not None:
        manifest["hosts"] = _hosts(hosts)
    ca_key = serialization.load_pem_private_key(_read(pki.ca_key), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(_read(pki.ca_cert))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(ca_cert, ca_key, key, manifest["hosts"], days)
    write_private(pki.server_key, _pem_private(key), overwrite=True)
    write_public(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    manifest["server_cert"] = {
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": hex(cert.serial_number),
    }
    _write_manifest(pki, manifest)
    return pki.server_cert


def add_site(root: Path, name: str, *, public_key: Path | None = None) -> Path:
    """Add site ``name``: a new node key pair, or only the public key the site sent.

    Returns the site's bundle directory (hand it to the site; it holds its private
    key unless ``public_key`` was given). Register the key at a running
    coordinator by restarting it, or with ``flwr supernode register``.
    """
    pki = Pki(Path(root))
    manifest = _read_manifest(pki)
    check_site_name(name)
    if pki.node_pub(name).exists():
        raise ConfigError(
            f"site {name!r} already has a key in {pki.site_dir(name)}; pick another name"
        )
    if public_key is not None:
        pub_bytes = load_node_public_key(Path(public_key)).public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(
            pki.node_key(name),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        pub_bytes = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    write_public(pki.node_pub(name), pub_bytes + b" fedinfer-site-" + name.encode() + b"\n")
    shutil.copyfile(pki.ca_cert, pki.site_dir(name) / "ca.crt")
    shutil.copyfile(pki.signing_pub, pki.site_dir(name) / "coordinator.pub")
    manifest["sites"][name] = {"added": _now().isoformat(), "own_key": public_key is not None}
    _write_manifest(pki, manifest)
    return pki.site_dir(name)


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a site's OpenSSH EC public key, as Flower's node authentication requires it."""
    try:
        key = serialization.load_ssh_public_key(_read(path))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{path} holds a {type(key).__name__}; Flower's node authentication needs an EC key "
            "(make one with `ssh-keygen -t ecdsa -b 384`)"
        )
    return key


def describe(root: Path) -> dict[str, Any]:
    """Describe what the PKI holds and when its certificates expire (``fedinfer certs show``)."""
    pki = Pki(Path(root))
    manifest = _read_manifest(pki)
    ca = x509.load_pem_x509_certificate(_read(pki.ca_cert))
    server = x509.load_pem_x509_certificate(_read(pki.server_cert))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        "root": str(pki.root),
        "ca_not_after": ca.not_valid_after_utc.isoformat(),
        "server_not_after": server.not_valid_after_utc.isoformat(),
        "server_days_left": (server.not_valid_after_utc - _now()).days,
        "server_names": [str(n.value) for n in sans],
        "sites": pki.sites(),
        "ca_key_present": pki.ca_key.exists(),
        "created": manifest.get("created"),
    }


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}; is this a `fedinfer certs init` directory?"
        ) from None


def _read_manifest(pki: Pki) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_read(pki.manifest))
    return data


def _write_manifest(pki: Pki, data: dict[str, Any]) -> None:
    write_public(pki.manifest, (json.dumps(data, indent=2) + "\n").encode())
