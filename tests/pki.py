"""An in-memory test PKI: certificate authorities, leaf certificates and TLS server contexts.

Every integration test that needs HTTPS (or any TLS) builds its certificates here::

    ca = TestCA("Test Root")
    cert_pem, key_pem = ca.issue(["mta-sts.example.test"])
    bundle = ca.write_bundle(tmp_path)          # a CA file for the client side
    options = server_options(cert_pem, key_pem)  # a server context factory for Twisted

Keys are EC P-256, so generating thousands of certificates stays fast; a CA reuses one leaf
key for every certificate it issues unless asked for a fresh one, and caches what it issued.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer

__all__ = [
    "SNIContextFactory",
    "TLS11OnlyContextFactory",
    "TestCA",
    "expired_leaf",
    "not_yet_valid_leaf",
    "server_options",
    "untrusted_leaf",
    "write_bundle",
    "wrong_name_leaf",
]

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signatures, and certificate and CRL signing for a CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A self-signed root that issues server certificates for DNS names."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "Test Root") -> None:
        """Create the root key and a self-signed certificate valid from yesterday for 10 years."""
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 3650 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=True),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem: bytes = self.cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = _key_pem(self._leaf_key)
        self._issued: dict[tuple[object, ...], tuple[bytes, bytes]] = {}

    def issue(
        self,
        names: Sequence[str],
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        fresh_key: bool = False,
    ) -> tuple[bytes, bytes]:
        """Return ``(cert_pem, key_pem)`` of a server certificate with ``names`` as DNS-IDs.

        The validity defaults to yesterday until 30 days ahead. Results are cached per
        arguments, and all certificates share one key unless ``fresh_key`` is set.
        """
        cache_key = (tuple(names), not_before, not_after)
        if not fresh_key and cache_key in self._issued:
            return self._issued[cache_key]
        key = ec.generate_private_key(ec.SECP256R1()) if fresh_key else self._leaf_key
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before if not_before is not None else now - _DAY)
            .not_valid_after(not_after if not_after is not None else now + 30 * _DAY)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        result = (
            cert.public_bytes(serialization.Encoding.PEM),
            self._leaf_key_pem if not fresh_key else _key_pem(key),
        )
        if not fresh_key:
            self._issued[cache_key] = result
        return result

    def write_bundle(self, directory: Path, name: str = "ca.pem") -> Path:
        """Write this root as a one-certificate PEM bundle in ``directory``; return its path."""
        return write_bundle(directory / name, [self])


def write_bundle(path: Path, cas: Iterable[TestCA]) -> Path:
    """Write the roots of ``cas`` to ``path`` as one PEM bundle; return ``path``."""
    path.write_bytes(b"".join(ca.cert_pem for ca in cas))
    return path


def expired_leaf(ca: TestCA, names: Sequence[str]) -> tuple[bytes, bytes]:
    """A certificate for ``names`` that expired yesterday."""
    now = _now()
    return ca.issue(names, not_before=now - 30 * _DAY, not_after=now - _DAY)


def not_yet_valid_leaf(ca: TestCA, names: Sequence[str]) -> tuple[bytes, bytes]:
    """A certificate for ``names`` whose validity starts tomorrow."""
    now = _now()
    return ca.issue(names, not_before=now + _DAY, not_after=now + 30 * _DAY)


def wrong_name_leaf(ca: TestCA, name: str = "mta-sts.wrong-name.test") -> tuple[bytes, bytes]:
    """A certificate that chains to ``ca`` but names only ``name``."""
    return ca.issue([name])


_untrusted: TestCA | None = None


def untrusted_leaf(names: Sequence[str]) -> tuple[bytes, bytes]:
    """A certificate for ``names`` from a second root that no test trusts."""
    global _untrusted
    if _untrusted is None:
        _untrusted = TestCA("Untrusted Root")
    return _untrusted.issue(names)


def server_options(cert_pem: bytes, key_pem: bytes, **options: Any) -> CertificateOptions:
    """A Twisted server context factory presenting ``cert_pem``; ``options`` go to it too.

    It offers ALPN ``http/1.1``: without any ALPN protocol of its own, Twisted's server
    answers a client that offers ALPN (curl does) with an internal-error alert.
    """
    options.setdefault("acceptableProtocols", [b"http/1.1"])
    # cryptography objects, not pyOpenSSL ones (deprecated there); Twisted's hints predate that.
    return CertificateOptions(
        privateKey=cast(Any, serialization.load_pem_private_key(key_pem, password=None)),
        certificate=cast(Any, x509.load_pem_x509_certificate(cert_pem)),
        **options,
    )


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """A server context factory choosing the certificate by the client's SNI name.

    Names in ``certificates`` get the given ``(cert_pem, key_pem)``; any other name gets a
    certificate for itself issued by ``ca`` on first use (cached, one shared key). A client
    that sends no SNI gets a certificate for ``default_name``.
    """

    def __init__(
        self,
        ca: TestCA,
        certificates: dict[str, tuple[bytes, bytes]] | None = None,
        default_name: str = "localhost",
    ) -> None:
        self._ca = ca
        self._certificates = dict(certificates or {})
        self._contexts: dict[str, SSL.Context] = {}
        self._default = self._context_for(default_name)
        self._default.set_tlsext_servername_callback(self._pick)

    def set_certificate(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Serve ``cert_pem`` for SNI ``name`` from now on."""
        self._certificates[name.lower()] = (cert_pem, key_pem)
        self._contexts.pop(name.lower(), None)

    def _context_for(self, name: str) -> SSL.Context:
        context = self._contexts.get(name)
        if context is None:
            cert_pem, key_pem = self._certificates.get(name) or self._ca.issue([name])
            context = server_options(cert_pem, key_pem).getContext()
            self._contexts[name] = context
        return context

    def _pick(self, connection: SSL.Connection) -> None:
        server_name = connection.get_servername()
        if server_name:
            connection.set_context(self._context_for(server_name.decode("ascii").lower()))

    def getContext(self) -> SSL.Context:
        """The default context; its SNI callback switches to the name's own context."""
        return self._default


@implementer(IOpenSSLContextFactory)
class TLS11OnlyContextFactory:
    """A server context factory that speaks TLS 1.1 and nothing else (to test refusal)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._context = server_options(
            cert_pem,
            key_pem,
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_1,
        ).getContext()
        # OpenSSL 3 refuses TLS < 1.2 above security level 0.
        self._context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def getContext(self) -> SSL.Context:
        """The TLS 1.1-only context."""
        return self._context


def tls11_available() -> bool:
    """Whether this OpenSSL can still negotiate TLS 1.1 (some builds remove it entirely).

    Runs one handshake in memory between a TLS 1.1-only server and a client allowing it.
    """
    ca = TestCA("TLS 1.1 Probe")
    try:
        server = SSL.Connection(TLS11OnlyContextFactory(*ca.issue(["probe.test"])).getContext())
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.set_min_proto_version(SSL.TLS1_1_VERSION)
        client_context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        client = SSL.Connection(client_context)
    except SSL.Error:
        return False
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for sender, receiver in ((client, server), (server, client)):
            try:
                sender.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return False
            with contextlib.suppress(SSL.WantReadError):
                receiver.bio_write(sender.bio_read(65536))
    return client.get_protocol_version_name() == "TLSv1.1"
