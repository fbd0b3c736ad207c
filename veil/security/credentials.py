"""Checks of the TLS certificates and node keys a veil deployment runs on (DESIGN.md decision 9).

Flower fails late and tersely on a bad credential ("Unable to parse the private key file", a TLS handshake error
on the far side of the network). These checks run before Flower starts and turn every problem into one line that
names the file, what is wrong with it and how to fix it (:class:`veil.errors.CredentialError`).

All parsing and signature checks are done by ``cryptography`` (the library Flower itself uses for node keys); no
cryptography is hand-rolled here. The formats follow what Flower 1.41 accepts (LIBRARY_NOTES.md): PEM certificates
and server key, node private keys in OpenSSH format on a NIST curve, node public keys as one OpenSSH line.

A private key file that group or others can access is allowed, with a warning on the ``veil.security`` logger:
Flower itself accepts it, and on some mounts (containers' secret volumes, network shares) the mode bits do not
reflect who can really read the file, so refusing would block working setups for no gain.

Over 300 lines: one check per credential file and failure, each with its own one-line message; they share parsing
helpers, so they stay together.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from veil.errors import CredentialError

__all__ = [
    "check_ca_certificate",
    "check_node_private_key",
    "check_node_public_key",
    "check_server_certificate",
    "load_public_keys",
]

log = logging.getLogger("veil.security")

# The curves Flower's node authentication accepts that OpenSSH can also encode (ecdsa-sha2-nistp256/384/521).
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_REGENERATE = "create new ones with `veil certs`"
PathLike = str | os.PathLike[str]


def _read(path: PathLike, what: str) -> bytes:
    """Read a credential file, turning every OS failure into a one-line CredentialError."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{what} {p} does not exist; check the path or {_REGENERATE}") from None
    except IsADirectoryError:
        raise CredentialError(f"{what} {p} is a directory, not a file; give the file's path") from None
    except PermissionError:
        raise CredentialError(f"{what} {p} is not readable by this user; fix its owner or permissions") from None
    except OSError as err:
        raise CredentialError(f"{what} {p} cannot be read ({err.strerror}); check the path") from None


def _warn_if_exposed(path: PathLike, what: str) -> None:
    """Warn (not fail, see the module docstring) when group or others can access a private key file."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("%s %s is accessible by group or others (mode %o); run `chmod 600 %s`", what, path, mode, path)


def _describe_wrong_format(data: bytes) -> str | None:
    """Name the kind of file ``data`` is when it is a recognisable credential of the wrong kind."""
    if b"BEGIN CERTIFICATE" in data:
        return "is a certificate"
    if b"BEGIN OPENSSH PRIVATE KEY" in data:
        return "is an OpenSSH private key"
    if b"PRIVATE KEY-----" in data:
        return "is a PEM private key"
    if b"BEGIN PUBLIC KEY" in data:
        return "is a PEM public key"
    if re.match(rb"\s*(ssh-|ecdsa-sha2-)", data):
        return "is an OpenSSH public key"
    return None


def _load_certificate(path: PathLike, what: str) -> x509.Certificate:
    """Parse a PEM certificate and check that today lies within its validity period."""
    data = _read(path, what)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        kind = _describe_wrong_format(data)
        if kind is None or kind == "is a certificate":  # a CERTIFICATE block that does not parse
            kind = "is not a PEM certificate (garbage, corrupt or truncated)"
        raise CredentialError(f"{what} {path} {kind}, expected a PEM certificate; {_REGENERATE}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise CredentialError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {_REGENERATE} (--force)"
        )
    if now < cert.not_valid_before_utc:
        raise CredentialError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock or wait"
        )
    return cert


def check_ca_certificate(path: PathLike) -> x509.Certificate:
    """Check the CA certificate (PEM, e.g. ``ca.crt``) that the server and every node trust; return it parsed.

    Raises
    ------
    CredentialError
        Missing, unreadable, not a certificate, expired or not yet valid, not a CA (BasicConstraints), not
        self-signed.
    """
    cert = _load_certificate(path, "CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CredentialError(f"CA certificate {path} is not a CA certificate (no CA=True); give the CA's ca.crt")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialError(f"CA certificate {path} is not self-signed; give the root CA's ca.crt") from None
    return cert


def _check_signed_by(cert: x509.Certificate, ca: x509.Certificate, cert_path: PathLike, ca_path: PathLike) -> None:
    """Verify the certificate's signature with the CA's public key (and that it names the CA as issuer)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialError(
            f"server certificate {cert_path} was not issued by the CA in {ca_path} (different CA); "
            f"give the matching ca.crt or {_REGENERATE}"
        ) from None


def _load_server_key(key_path: PathLike) -> PrivateKeyTypes:
    """Load the server's PEM private key (unencrypted, as Flower's --ssl-keyfile needs)."""
    data = _read(key_path, "server key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CredentialError(
            f"server key {key_path} is password-protected; Flower needs an unencrypted key, {_REGENERATE}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        kind = _describe_wrong_format(data)
        if kind is None or kind == "is a PEM private key":  # a PRIVATE KEY block that does not parse
            kind = "is not a PEM private key (garbage, corrupt or truncated)"
        raise CredentialError(f"server key {key_path} {kind}, expected a PEM private key; {_REGENERATE}") from None


def _missing_names(cert: x509.Certificate, names: Iterable[str]) -> list[str]:
    """Return the host names / IP addresses of ``names`` that the certificate's SANs do not cover."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return list(names)
    dns = [d.lower() for d in san.get_values_for_type(x509.DNSName)]
    ips = set(san.get_values_for_type(x509.IPAddress))
    missing = []
    for name in names:
        try:
            covered = ipaddress.ip_address(name) in ips
        except ValueError:
            host = name.lower().rstrip(".")
            covered = host in dns or any(d.startswith("*.") and host.partition(".")[2] == d[2:] for d in dns)
        if not covered:
            missing.append(name)
    return missing


def check_server_certificate(
    cert_path: PathLike, key_path: PathLike, ca_path: PathLike, names: Iterable[str] | None = None
) -> x509.Certificate:
    """Check the SuperLink's TLS certificate and key against the CA the nodes trust.

    Parameters
    ----------
    cert_path, key_path
        PEM certificate and unencrypted PEM private key (``server.pem``, ``server.key``).
    ca_path
        The CA certificate the nodes are given (``ca.crt``).
    names
        Host names / IP addresses the nodes connect to; each must be in the certificate's SANs. None: no check.

    Returns
    -------
    cryptography.x509.Certificate

    Raises
    ------
    CredentialError
        Any file missing or malformed, a certificate expired, the server certificate signed by another CA, the key
        not matching the certificate, a name not covered, or the certificate not meant for TLS servers.
    """
    ca = check_ca_certificate(ca_path)
    cert = _load_certificate(cert_path, "server certificate")
    _check_signed_by(cert, ca, cert_path, ca_path)
    key = _load_server_key(key_path)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CredentialError(
            f"server key {key_path} does not belong to certificate {cert_path}; use the pair `veil certs` wrote"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise CredentialError(f"server certificate {cert_path} is not for TLS servers (no serverAuth); {_REGENERATE}")
    missing = _missing_names(cert, names or [])
    if missing:
        raise CredentialError(
            f"server certificate {cert_path} does not cover {', '.join(missing)} in its SANs; "
            f"create new ones with `veil certs --server-name {','.join(missing)},... --force`"
        )
    if os.path.exists(key_path):
        _warn_if_exposed(key_path, "server key")
    return cert


def check_node_private_key(path: PathLike) -> ec.EllipticCurvePrivateKey:
    """Check a node's authentication key as ``flower-supernode --auth-supernode-private-key`` will load it.

    Parameters
    ----------
    path
        OpenSSH private key file (``node-<i>.key``), unencrypted, ECDSA on a NIST curve.

    Returns
    -------
    cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePrivateKey
        Group/world access to the file only logs a warning (see the module docstring).

    Raises
    ------
    CredentialError
        Missing, unreadable, garbage, PEM instead of OpenSSH, password-protected, ed25519/RSA, or a non-NIST curve.
    """
    data = _read(path, "node private key")
    if b"BEGIN OPENSSH PRIVATE KEY" not in data:
        kind = _describe_wrong_format(data) or "is not an OpenSSH private key (garbage or truncated)"
        if kind == "is an OpenSSH public key":
            raise CredentialError(f"node private key {path} is a public key; give the node's .key file, not the .pub")
        raise CredentialError(
            f"node private key {path} {kind}; Flower needs OpenSSH format (BEGIN OPENSSH PRIVATE KEY), {_REGENERATE}"
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise CredentialError(
            f"node private key {path} is password-protected; Flower cannot use a passphrase, {_REGENERATE}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"node private key {path} is corrupt or truncated; {_REGENERATE}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise CredentialError(
            f"node private key {path} is ed25519, which Flower's node authentication rejects; it needs ECDSA on a "
            f"NIST curve (ecdsa-sha2-nistp384), {_REGENERATE}"
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CredentialError(
            f"node private key {path} is not an ECDSA key on a NIST curve, which Flower needs; {_REGENERATE}"
        )
    _warn_if_exposed(path, "node private key")
    return key


def check_node_public_key(path: PathLike) -> ec.EllipticCurvePublicKey:
    """Check a node's public key as ``flwr supernode register`` will load it.

    Parameters
    ----------
    path
        File holding one OpenSSH line ``ecdsa-sha2-nistp384 AAAA... [comment]`` (``node-<i>.pub``).

    Raises
    ------
    CredentialError
        Missing, unreadable, not one line, a private key or PEM, ed25519/RSA, or unparsable.
    """
    data = _read(path, "node public key")
    kind = _describe_wrong_format(data)
    if kind is not None and kind != "is an OpenSSH public key":
        raise CredentialError(
            f"node public key {path} {kind}; Flower needs one OpenSSH line (ecdsa-sha2-nistp384 AAAA...), "
            "give the node's .pub file"
        )
    lines = data.strip().splitlines()
    key_type = lines[0].split(maxsplit=1)[0] if lines and lines[0].strip() else b""
    if key_type == b"ssh-ed25519":
        raise CredentialError(
            f"node public key {path} is ed25519, which Flower's node authentication rejects; {_REGENERATE}"
        )
    if not key_type.startswith(b"ecdsa-sha2-nistp"):
        raise CredentialError(
            f"node public key {path} is not an ecdsa-sha2-nistp* OpenSSH public key line, which Flower needs; "
            "give the node's .pub file or create new ones with `veil certs`"
        )
    if len(lines) != 1:
        raise CredentialError(f"node public key {path} must hold exactly one OpenSSH line, it has {len(lines)}")
    try:
        key = serialization.load_ssh_public_key(lines[0])
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"node public key {path} is corrupt or truncated; {_REGENERATE}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CredentialError(f"node public key {path} is not on a NIST curve, which Flower needs; {_REGENERATE}")
    return key


def _natural_key(path: Path) -> list[int | str]:
    """Sort key putting node-2.pub before node-10.pub."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_public_keys(dir_or_paths: PathLike | Iterable[PathLike]) -> dict[Path, ec.EllipticCurvePublicKey]:
    """Load and check the node public keys to register with the SuperLink.

    Parameters
    ----------
    dir_or_paths
        A directory (every ``*.pub`` in it is loaded, in natural order) or an iterable of ``.pub`` file paths.

    Returns
    -------
    dict[pathlib.Path, EllipticCurvePublicKey]
        One entry per file, in order.

    Raises
    ------
    CredentialError
        No key found, any file failing :func:`check_node_public_key`, or one key in two files (Flower refuses to
        register a key twice: "Public key already in use").
    """
    if isinstance(dir_or_paths, (str, os.PathLike)):
        source = Path(dir_or_paths)
        if not source.is_dir():
            paths = [source]
        else:
            paths = sorted(source.glob("*.pub"), key=_natural_key)
            if not paths:
                raise CredentialError(f"no node public keys (*.pub) in {source}; give the directory `veil certs --out` wrote")
    else:
        paths = [Path(p) for p in dir_or_paths]
        if not paths:
            raise CredentialError("no node public keys given; pass node-<i>.pub files or their directory")
    keys: dict[Path, ec.EllipticCurvePublicKey] = {}
    seen: dict[bytes, Path] = {}
    for path in paths:
        key = check_node_public_key(path)
        raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        if raw in seen:
            raise CredentialError(
                f"node public key {path} is the same key as {seen[raw]}; every node needs its own key pair"
            )
        seen[raw], keys[path] = path, key
    return keys
