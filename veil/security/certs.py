"""``veil certs``: the credentials of a veil deployment — a CA, the SuperLink's TLS certificate, node key pairs.

Transport security is on by default (DESIGN.md decision 9): the SuperLink serves TLS with a certificate signed by a
private CA that every node trusts, and only nodes whose public key was registered may connect. This module creates
those files in the formats Flower 1.41 accepts (LIBRARY_NOTES.md, "Flower deployment"): PEM for the CA and server
certificate (EC P-384, SANs for every host name and IP the nodes dial), and for each node an OpenSSH private key and
one OpenSSH public-key line on NIST P-384 — Flower's node authentication rejects PKCS8 PEM keys and ed25519.

Every key, certificate and signature comes from ``cryptography``; nothing cryptographic is hand-rolled. All files are
generated in memory first, then staged in a temporary directory and renamed into place, so a failure leaves either
the old files or the complete new set, never a mix; private keys are created with mode 0600 from the first byte.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.atomic import fsync_dir
from veil.errors import ConfigError, CredentialError

__all__ = ["build_files", "configure_parser", "make_ca", "make_node_key_pair", "make_server_certificate",
           "parse_server_names", "run", "write_files"]

log = logging.getLogger("veil.security")

DEFAULT_SERVER_NAMES = "localhost,127.0.0.1,::1"  # what a single-machine trial dials
_CURVE = ec.SECP384R1  # P-384: verified with Flower 1.41 for TLS and for node authentication
_HASH = hashes.SHA384  # matches the curve's strength
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # a node whose clock is a little behind still accepts a fresh cert
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PRIVATE, _PUBLIC = 0o600, 0o644


def parse_server_names(text: str) -> list[x509.GeneralName]:
    """Turn ``"host,10.0.0.1,::1"`` into SAN entries: IPAddress for IP literals, DNSName for host names.

    Raises
    ------
    ConfigError
        Empty list or a name that is neither an IP address nor a valid (ASCII, optionally ``*.``) host name.
    """
    entries: list[x509.GeneralName] = []
    for raw in text.split(","):
        name = raw.strip().strip("[]")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        labels = name.rstrip(".").split(".")
        if labels and labels[0] == "*":
            labels = labels[1:]
        if not name or not labels or not all(_DNS_LABEL.fullmatch(label) for label in labels) or len(name) > 253:
            raise ConfigError(
                f"--server-names {name!r} is not a host name or IP address; give e.g. 'coordinator.example.org,10.0.0.5'"
                " (internationalised names in punycode)"
            )
        entries.append(x509.DNSName(name.rstrip(".").lower()))
    return entries


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - _CLOCK_SKEW, now + datetime.timedelta(days=days)


def make_ca(*, days: int, common_name: str = "veil CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed CA (EC P-384, BasicConstraints CA=True, KeyUsage cert_sign + crl_sign)."""
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "veil"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, names: list[x509.GeneralName], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the SuperLink's TLS key and certificate (EC P-384, SANs ``names``, serverAuth), signed by the CA."""
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "veil"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "veil SuperLink")])
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)  # a leaf must not outlive its CA
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )
    return key, cert


def make_node_key_pair(comment: str = "") -> tuple[bytes, bytes]:
    """Create one node's authentication key pair on NIST P-384.

    Returns
    -------
    tuple[bytes, bytes]
        The OpenSSH private key (``BEGIN OPENSSH PRIVATE KEY``, unencrypted) and the one-line OpenSSH public key
        ``ecdsa-sha2-nistp384 AAAA... comment`` ending in a newline.
    """
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def build_files(*, server_names: str, nodes: int, days: int) -> dict[str, tuple[bytes, int]]:
    """Generate every file of a deployment in memory: file name -> (content, mode)."""
    names = parse_server_names(server_names)
    pem = serialization.Encoding.PEM

    def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, names=names, days=days)
    files = {
        "ca.crt": (ca_cert.public_bytes(pem), _PUBLIC),
        "ca.key": (private_pem(ca_key), _PRIVATE),
        "server.pem": (server_cert.public_bytes(pem), _PUBLIC),
        "server.key": (private_pem(server_key), _PRIVATE),
    }
    for i in range(1, nodes + 1):
        private, public = make_node_key_pair(comment=f"veil-node-{i}")
        files[f"node-{i}.key"] = (private, _PRIVATE)
        files[f"node-{i}.pub"] = (public, _PUBLIC)
    return files


def _stage(staging: Path, name: str, content: bytes, mode: int) -> Path:
    """Write one file into the staging directory, created with ``mode`` so a key is never readable by others."""
    path = staging / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # the umask may have removed bits from a public file; never adds any to a private one
    return path


def _rollback(placed: list[tuple[Path, Path | None]]) -> bool:
    """Undo the renames of :func:`write_files`; returns False when some old file could not be put back."""
    complete = True
    for dest, backup in reversed(placed):
        try:
            if backup is None:
                dest.unlink(missing_ok=True)
            else:
                os.replace(backup, dest)
        except OSError:
            log.error("could not restore %s from %s", dest, backup)
            complete = False
    return complete


def write_files(out: Path, files: dict[str, tuple[bytes, int]], *, force: bool) -> list[Path]:
    """Put ``files`` into ``out`` all-or-nothing: stage, then rename each in place; undo everything on failure.

    Raises
    ------
    CredentialError
        A file exists and ``force`` is False (nothing is written), or ``out`` cannot be written to.
    """
    existing = [out / name for name in files if (out / name).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CredentialError(f"refusing to overwrite {existing[0]}{more}; pass --force to replace them")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".veil-certs-", dir=out))
    except OSError as err:
        raise CredentialError(f"cannot write to {out} ({err.strerror}); choose another --out") from None
    placed: list[tuple[Path, Path | None]] = []  # (destination, backup of the file it replaces)
    keep_staging = False
    try:
        staged = {name: _stage(staging, name, content, mode) for name, (content, mode) in files.items()}
        for name, path in staged.items():
            dest, backup = out / name, None
            if dest.exists():
                backup = staging / f"{name}.old"
                os.replace(dest, backup)
            placed.append((dest, backup))
            os.replace(path, dest)
        fsync_dir(out)
    except BaseException as err:
        keep_staging = not _rollback(placed)
        if not isinstance(err, OSError):
            raise
        where = f"; the replaced files are in {staging}" if keep_staging else "; nothing was changed"
        raise CredentialError(f"cannot write to {out} ({err.strerror or err}){where}") from None
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in files]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``veil certs`` options."""
    parser.add_argument("--out", required=True, type=Path, help="directory to write the files into")
    parser.add_argument("--server-names", "--server-name", dest="server_name", default=DEFAULT_SERVER_NAMES,
                        metavar="HOST[,HOST...]",
                        help=f"the names and IP addresses nodes dial to reach the server, comma-separated; each becomes "
                             f"a SAN of its certificate (default: {DEFAULT_SERVER_NAMES})")
    parser.add_argument("--nodes", required=True, type=int, metavar="N", help="number of node key pairs to create")
    parser.add_argument("--days", type=int, default=365, metavar="D", help="certificate validity (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace existing files of the same names")


def run(args: argparse.Namespace) -> int:
    """Create the credentials, print what was written and how to use it; returns the exit status."""
    if not 1 <= args.nodes <= 10_000:
        raise ConfigError(f"--nodes must be between 1 and 10000, got {args.nodes}")
    if not 1 <= args.days <= 36_500:
        raise ConfigError(f"--days must be between 1 and 36500, got {args.days}")
    out: Path = args.out
    files = build_files(server_names=args.server_name, nodes=args.nodes, days=args.days)
    write_files(out, files, force=args.force)
    stale = sorted(p.name for p in out.glob("node-*.*") if p.name not in files and p.suffix in (".key", ".pub"))
    if stale:
        log.warning("%s also holds node keys from an earlier run: %s; delete the ones no longer used",
                    out, ", ".join(stale))
    names = ", ".join(n.strip() for n in args.server_name.split(","))
    nodes = "" if args.nodes == 1 else f" .. node-{args.nodes}"
    print(f"Wrote to {out}:")
    print("  ca.crt                 CA certificate: give to the server and every node")
    print("  ca.key                 CA private key: keep offline, only needed to issue new certificates")
    print(f"  server.pem server.key  server TLS certificate and key (SANs: {names})")
    print(f"  node-1{nodes}.key   node i's private key: give to data owner i only")
    print(f"  node-1{nodes}.pub   node public keys: register them on the server")
    print("Next:")
    print(f"  server: veil server ...   (TLS: {out / 'server.pem'}, {out / 'server.key'}, {out / 'ca.crt'})")
    print(f"  node i: veil client --superlink HOST:PORT --root-cert {out / 'ca.crt'} --key {out / 'node-1.key'}"
          " --data FILE")
    print("          (HOST: one of the server names above; node i uses node-i.key)")
    return 0
