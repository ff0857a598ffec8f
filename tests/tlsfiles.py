"""Throw-away TLS material for test servers: a CA, a server and a client certificate.

    tls = make_tls_files(tmp_path / "tls")
    RedisProcess(tmp_path / "redis", tls=tls)              # tls-port, port 0
    redis.Redis(host="127.0.0.1", port=port, **tls.redis_kwargs())
    f"rediss://127.0.0.1:{port}/0?{tls.url_query()}"

Generated with the ``cryptography`` package (EC P-256 keys, fast to make). The server
certificate names 127.0.0.1, ::1 and localhost and may also act as a TLS client, as
redis-server does for replication and the cluster bus. Each call makes a new CA, so two
calls give material that does not trust each other (for negative tests).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AuthClients = Literal["no", "optional", "yes"]
_VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files in ``directory``: keys are unencrypted and readable by the owner only."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, auth_clients: AuthClients = "optional") -> list[str]:
        """redis-server options for the certificate files (the caller sets the ports)."""
        return [
            "--tls-cert-file",
            str(self.server_cert),
            "--tls-key-file",
            str(self.server_key),
            "--tls-ca-cert-file",
            str(self.ca_cert),
            "--tls-auth-clients",
            auth_clients,
        ]

    def client_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """A verifying client context that trusts our CA, optionally presenting a cert."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def redis_kwargs(self, *, client_cert: bool = True) -> dict[str, Any]:
        """Keyword arguments for redis-py clients (Redis, RedisCluster, Sentinel)."""
        kwargs: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_certs": str(self.ca_cert),
            "ssl_cert_reqs": "required",
        }
        if client_cert:
            kwargs["ssl_certfile"] = str(self.client_cert)
            kwargs["ssl_keyfile"] = str(self.client_key)
        return kwargs

    def url_query(self, *, client_cert: bool = True) -> str:
        """The same options as a ``rediss://`` URL query string (redis-py's names)."""
        params = {k: v for k, v in self.redis_kwargs(client_cert=client_cert).items() if k != "ssl"}
        return urlencode(params)


def make_tls_files(directory: Path, common_name: str = "taskrunner-test") -> TLSFiles:
    """Generate a CA, a server cert (127.0.0.1, ::1, localhost) and a client cert."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name} CA")
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server = _leaf(
        ca,
        ca_key,
        "127.0.0.1",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        san=True,
    )
    client_key, client = _leaf(
        ca, ca_key, f"{common_name}-client", [ExtendedKeyUsageOID.CLIENT_AUTH], san=False
    )
    files = TLSFiles(
        directory=directory,
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    _write_cert(files.ca_cert, ca)
    _write_cert(files.server_cert, server)
    _write_key(files.server_key, server_key)
    _write_cert(files.client_cert, client)
    _write_key(files.client_key, client_key)
    return files


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALID)
    )


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    *,
    san: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if san:
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("localhost"),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600)
    path.write_bytes(data)
