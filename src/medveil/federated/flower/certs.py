"""Pilot PKI for running MedVeil across sites on Flower: one CA, one server certificate, and per
site an authentication key pair (plus a TLS certificate for the site's local runtime API).

Layout written by :func:`create_pki` (``medveil certs create``)::

    DIR/ca.crt  ca.key             the pilot CA (keep ca.key offline; only ca.crt is shared)
    DIR/server/ca.crt server.crt server.key
                                   the coordinator's TLS identity (SANs: the hosts given + loopback)
    DIR/server/sites/<site>.pub    each site's public authentication key, to register
    DIR/sites/<site>/ca.crt        to verify the server (``--root-certificates``)
    DIR/sites/<site>/auth_key      the site's private SuperNode authentication key (OpenSSH, EC P-384)
    DIR/sites/<site>/auth_key.pub  its public half (what the coordinator registers)
    DIR/sites/<site>/site.crt site.key
                                   TLS for the site's own loopback runtime API (SuperNode <-> ClientApp)

Flower authenticates a SuperNode by its EC key (``--auth-supernode-private-key`` on the site,
``flwr supernode register KEY.pub`` on the coordinator, ``--enable-supernode-auth`` on the
SuperLink); TLS authenticates the server to the sites. Flower 1.42 (like 1.41) has no client certificates
(mTLS), so a site certificate is only used for the site's local runtime API.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medveil.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class SiteFiles:
    name: str
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def auth_key(self) -> Path:
        return self.folder / "auth_key"

    @property
    def auth_pub(self) -> Path:
        return self.folder / "auth_key.pub"

    @property
    def cert(self) -> Path:
        return self.folder / "site.crt"

    @property
    def key(self) -> Path:
        return self.folder / "site.key"


@dataclass(frozen=True)
class ServerFiles:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    def site_pub(self, name: str) -> Path:
        return self.folder / "sites" / f"{name}.pub"


def server_files(root: Path) -> ServerFiles:
    return ServerFiles(Path(root) / "server")


def site_files(root: Path, name: str) -> SiteFiles:
    return SiteFiles(name, Path(root) / "sites" / name)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_HOSTS]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, public_key, issuer_name, issuer_key, days: int, ca: bool,
                 hosts: list[str] | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedVeil pilot"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(issuer_name or name).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(_san(hosts or []), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(root: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((root / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    return cert, key


def _new_ca(root: Path, days: int):
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate("MedVeil pilot CA", key.public_key(), None, key, days, ca=True)
    _write(root / "ca.key", _key_pem(key), private=True)
    _write(root / "ca.crt", _cert_pem(cert))
    return cert, key


def _tls_pair(ca, subject: str, hosts: list[str], days: int) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(subject, key.public_key(), ca_cert.subject, ca_key, days, ca=False, hosts=hosts)
    return _cert_pem(cert), _key_pem(key)


def auth_keypair() -> tuple[bytes, bytes]:
    """(private OpenSSH PEM, public OpenSSH line) of a NIST P-384 key: Flower's SuperNode auth."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise ConfigError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


def create_pki(root: Path, server_hosts: list[str], sites: list[str], days: int = 365,
               overwrite: bool = False) -> dict[str, Path]:
    """Create (or extend) the pilot PKI under ``root``; returns the main paths.

    An existing CA is reused (so sites can be added later); existing site or server files are
    kept unless ``overwrite``.
    """
    root = Path(root)
    for name in sites:
        check_site_name(name)
    if len(set(sites)) != len(sites):
        raise ConfigError("site names must be unique")
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    if (root / "ca.crt").is_file() != (root / "ca.key").is_file():
        raise ConfigError(f"{root}: has only one of ca.crt / ca.key; remove it or choose another folder")
    ca = _load_ca(root) if (root / "ca.crt").is_file() else _new_ca(root, days)
    ca_pem = (root / "ca.crt").read_bytes()
    server = server_files(root)
    if overwrite or not server.cert.is_file():
        cert, key = _tls_pair(ca, server_hosts[0] if server_hosts else "localhost", server_hosts, days)
        _write(server.key, key, private=True)
        _write(server.cert, cert)
    _write(server.ca, ca_pem)
    for name in sites:
        site = site_files(root, name)
        if overwrite or not site.auth_key.is_file():
            private, public = auth_keypair()
            _write(site.auth_key, private, private=True)
            _write(site.auth_pub, public)
            cert, key = _tls_pair(ca, f"site {name}", [], days)
            _write(site.key, key, private=True)
            _write(site.cert, cert)
        _write(site.ca, ca_pem)
        _write(server.site_pub(name), site.auth_pub.read_bytes())
    return {"ca": root / "ca.crt", "server": server.folder, "sites": root / "sites"}
