"""Tests of ``veil certs`` and the credential checks.

The generated files are checked against references other than our own code: signatures with the CA's public key,
a TLS handshake through the standard library's OpenSSL binding, keys loaded by ``cryptography``'s SSH loaders as
Flower loads them, and (when installed) Flower's own SuperLink serving TLS and registering the node keys.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from veil.cli import main
from veil.errors import CredentialError
from veil.security import certs
from veil.security.credentials import (
    check_ca_certificate,
    check_node_private_key,
    check_node_public_key,
    check_server_certificate,
    load_public_keys,
)

NAMES = "localhost,127.0.0.1,::1,coord.example.org,10.1.2.3"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "creds"
    assert main(["certs", "--out", str(out), "--server-names", NAMES, "--nodes", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other") / "creds"
    assert main(["certs", "--out", str(out), "--nodes", "1"]) == 0
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(directory.iterdir())}


# --- what `veil certs` writes --------------------------------------------------------------------------------------


def test_ca_signs_server_certificate(bundle: Path) -> None:
    ca, server = _cert(bundle / "ca.crt"), _cert(bundle / "server.pem")
    assert server.signature_hash_algorithm is not None
    # Reference: the raw signature check with the CA's public key (raises InvalidSignature on failure).
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and isinstance(ca_key.curve, ec.SECP384R1)
    ca_key.verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_server_sans_cover_names_and_ips(bundle: Path) -> None:
    san = _cert(bundle / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}


def test_tls_handshake_with_stdlib_openssl(bundle: Path) -> None:
    """Reference: OpenSSL (via ssl) serves server.pem/server.key and a client trusting only ca.crt accepts it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(bundle / "server.pem", bundle / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    for host in ("localhost", "127.0.0.1", "::1"):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        done = [False, False]
        for _ in range(10):
            for i, (side, out, peer_in) in enumerate(((client, c_out, s_in), (server, s_out, c_in))):
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                peer_in.write(out.read())
        assert all(done), host


def test_node_keys_are_openssh_p384_pairs(bundle: Path) -> None:
    for i in (1, 2, 3):
        private_bytes = (bundle / f"node-{i}.key").read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        lines = (bundle / f"node-{i}.pub").read_bytes().splitlines()
        assert len(lines) == 1 and lines[0].startswith(b"ecdsa-sha2-nistp384 AAAA")
        public = serialization.load_ssh_public_key(lines[0])
        assert public == private.public_key()


def test_file_modes(bundle: Path) -> None:
    for name in ("ca.key", "server.key", "node-1.key", "node-2.key", "node-3.key"):
        assert (bundle / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("ca.crt", "server.pem", "node-1.pub"):
        assert (bundle / name).stat().st_mode & 0o077 == 0o044, name
    assert not list(bundle.glob(".veil-certs-*"))  # staging directory removed


def test_refuses_overwrite_then_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert main(["certs", "--out", str(out), "--nodes", "2"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["certs", "--out", str(out), "--nodes", "2"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(out) in err
    assert _snapshot(out) == before
    assert main(["certs", "--out", str(out), "--nodes", "2", "--force"]) == 0
    after = _snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[name][0] != before[name][0] for name in before)
    check_server_certificate(out / "server.pem", out / "server.key", out / "ca.crt", names=["localhost"])


def test_failed_write_restores_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c"
    assert main(["certs", "--out", str(out), "--nodes", "1"]) == 0
    before = _snapshot(out)
    real_replace, calls = os.replace, []

    def flaky_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(src)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(certs.os, "replace", flaky_replace)
    files = certs.build_files(server_names="localhost", nodes=1, days=1)
    with pytest.raises(CredentialError, match="nothing was changed"):
        certs.write_files(out, files, force=True)
    assert _snapshot(out) == before


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path / "x"), "--nodes", "0"]) == 2
    assert main(["certs", "--out", str(tmp_path / "x"), "--nodes", "1", "--server-name", "bad name"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--nodes" in err and "--server-name" in err
    assert not (tmp_path / "x").exists()


# --- checks: success ------------------------------------------------------------------------------------------------


def test_checks_accept_generated_files(bundle: Path) -> None:
    check_ca_certificate(bundle / "ca.crt")
    names = ["localhost", "127.0.0.1", "::1", "COORD.example.org", "10.1.2.3"]
    check_server_certificate(bundle / "server.pem", bundle / "server.key", bundle / "ca.crt", names=names)
    assert isinstance(check_node_private_key(bundle / "node-1.key").curve, ec.SECP384R1)
    assert check_node_public_key(bundle / "node-1.pub") == check_node_private_key(bundle / "node-1.key").public_key()
    keys = load_public_keys(bundle)
    assert [p.name for p in keys] == ["node-1.pub", "node-2.pub", "node-3.pub"]
    assert list(load_public_keys([bundle / "node-2.pub"])) == [bundle / "node-2.pub"]


def test_exposed_node_key_warns(bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "node.key"
    key.write_bytes((bundle / "node-1.key").read_bytes())
    key.chmod(0o644)
    with caplog.at_level("WARNING", logger="veil.security"):
        check_node_private_key(key)
    assert "chmod 600" in caplog.text


# --- checks: failures, each one line naming the file ---------------------------------------------------------------


def _expired_server_cert(bundle: Path, path: Path) -> Path:
    ca = _cert(bundle / "ca.crt")
    ca_key = serialization.load_pem_private_key((bundle / "ca.key").read_bytes(), password=None)
    server_key = serialization.load_pem_private_key((bundle / "server.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey) and isinstance(server_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ed25519_files(tmp_path: Path) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = tmp_path / "ed.key", tmp_path / "ed.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    ssh = serialization.Encoding.OpenSSH
    public.write_bytes(key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH))
    return private, public


def _pem_node_key(bundle: Path, tmp_path: Path, fmt: serialization.PrivateFormat) -> Path:
    key = serialization.load_ssh_private_key((bundle / "node-1.key").read_bytes(), password=None)
    path = tmp_path / f"pem-{id(fmt)}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    return path


def _failure_cases(bundle: Path, other: Path, tmp: Path) -> list[tuple[str, object, Path, str]]:
    garbage = tmp / "garbage"
    garbage.write_bytes(os.urandom(300))
    missing = tmp / "missing.pem"
    ed_key, ed_pub = _ed25519_files(tmp)
    pem_pub = tmp / "pem.pub"
    pem_pub.write_bytes(check_node_public_key(bundle / "node-1.pub").public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    two_lines = tmp / "two.pub"
    two_lines.write_bytes((bundle / "node-1.pub").read_bytes() + (bundle / "node-2.pub").read_bytes())
    expired = _expired_server_cert(bundle, tmp / "expired.pem")
    pkcs8 = _pem_node_key(bundle, tmp, serialization.PrivateFormat.PKCS8)
    sec1 = _pem_node_key(bundle, tmp, serialization.PrivateFormat.TraditionalOpenSSL)
    ca, pem, key = bundle / "ca.crt", bundle / "server.pem", bundle / "server.key"

    def server(cert: Path = pem, k: Path = key, c: Path = ca, names: list[str] | None = None) -> object:
        return lambda: check_server_certificate(cert, k, c, names=names)

    return [
        ("ca missing", lambda: check_ca_certificate(missing), missing, "does not exist"),
        ("ca garbage", lambda: check_ca_certificate(garbage), garbage, "not a PEM certificate"),
        ("ca is a directory", lambda: check_ca_certificate(tmp), tmp, "directory"),
        ("ca is a key", lambda: check_ca_certificate(key), key, "private key"),
        ("ca is a leaf", lambda: check_ca_certificate(pem), pem, "not a CA"),
        ("server wrong CA", server(c=other / "ca.crt"), pem, "different CA"),
        ("server expired", server(cert=expired), expired, "expired"),
        ("server garbage", server(cert=garbage), garbage, "not a PEM certificate"),
        ("server key mismatch", server(k=other / "server.key"), other / "server.key", "does not belong"),
        ("server key garbage", server(k=garbage), garbage, "not a PEM private key"),
        ("server key missing", server(k=missing), missing, "does not exist"),
        ("server name not covered", server(names=["elsewhere.org"]), pem, "elsewhere.org"),
        ("node key missing", lambda: check_node_private_key(missing), missing, "does not exist"),
        ("node key garbage", lambda: check_node_private_key(garbage), garbage, "OpenSSH"),
        ("node key ed25519", lambda: check_node_private_key(ed_key), ed_key, "ed25519"),
        ("node key pkcs8", lambda: check_node_private_key(pkcs8), pkcs8, "PEM private key"),
        ("node key sec1", lambda: check_node_private_key(sec1), sec1, "PEM private key"),
        ("node key is pub", lambda: check_node_private_key(bundle / "node-1.pub"), bundle / "node-1.pub", "public"),
        ("node pub missing", lambda: check_node_public_key(missing), missing, "does not exist"),
        ("node pub garbage", lambda: check_node_public_key(garbage), garbage, "ecdsa-sha2-nistp"),
        ("node pub ed25519", lambda: check_node_public_key(ed_pub), ed_pub, "ed25519"),
        ("node pub PEM", lambda: check_node_public_key(pem_pub), pem_pub, "PEM public key"),
        ("node pub is private", lambda: check_node_public_key(bundle / "node-1.key"), bundle / "node-1.key",
         "private key"),
        ("node pub two lines", lambda: check_node_public_key(two_lines), two_lines, "one OpenSSH line"),
        ("no keys in dir", lambda: load_public_keys(tmp / "empty"), tmp / "empty", "no node public keys"),
        ("duplicate keys", lambda: load_public_keys([bundle / "node-1.pub", tmp / "copy.pub"]), tmp / "copy.pub",
         "same key"),
    ]


def test_every_failure_is_one_line_naming_the_file(bundle: Path, other_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "copy.pub").write_bytes((bundle / "node-1.pub").read_bytes())
    for label, call, path, fragment in _failure_cases(bundle, other_bundle, tmp_path):
        with pytest.raises(CredentialError) as info:
            call()  # type: ignore[operator]
        message = str(info.value)
        assert "\n" not in message, label
        assert str(path) in message, (label, message)
        assert fragment in message, (label, message)


def test_unreadable_file(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 0 would not stop root, who runs some CI
    with pytest.raises(CredentialError, match="not readable") as info:
        check_node_private_key(bundle / "node-1.key")
    assert str(bundle / "node-1.key") in str(info.value)


def test_expired_ca(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=9))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA384())
    )
    path = tmp_path / "old-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CredentialError, match="expired") as info:
        check_ca_certificate(path)
    assert "\n" not in str(info.value)


# --- Flower itself accepts the files --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_tls(port: int, ca: Path, deadline: float) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    return str(tls.version())
        except OSError:  # refused while starting; ssl.SSLError (bad certificate) is an OSError too
            time.sleep(0.2)
    raise AssertionError(f"SuperLink did not accept a TLS connection on port {port}")


def test_flower_superlink_serves_tls_and_registers_node_keys(bundle: Path, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists() or not (bin_dir / "flwr").exists():
        pytest.skip("Flower's command-line tools are not installed next to this Python")
    port = _free_port()
    # The SuperLink starts `flower-superexec` by name: the venv's bin must be on PATH.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{bundle / "ca.crt"}"\n'
    )
    cmd = [str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(bundle / "ca.crt"),
           "--ssl-certfile", str(bundle / "server.pem"), "--ssl-keyfile", str(bundle / "server.key"),
           "--enable-supernode-auth", "--database", str(tmp_path / "s.db"),
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    log = (tmp_path / "superlink.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_for_tls(port, bundle / "ca.crt", time.monotonic() + 20).startswith("TLS")
        register = subprocess.run([str(bin_dir / "flwr"), "supernode", "register", str(bundle / "node-1.pub"), "t"],
                                  env=env, capture_output=True, text=True, timeout=20)
        assert register.returncode == 0 and "registered" in register.stdout, register.stdout + register.stderr
    finally:
        # The SuperLink's own child (flower-superexec) shares its new session: signal that group, by id.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        log.close()
