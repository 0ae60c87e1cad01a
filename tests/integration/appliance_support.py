"""Helpers for the appliance tests: EICAR bytes, self-signed certificates, a local HTTPS file
server standing in for an ESXi ``/guestFile`` endpoint, a real OpenSSH server on 127.0.0.N.

Used by ``tests/integration/test_appliance_*.py`` only.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import settings_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vsphere_av import config

# The EICAR test file, assembled at run time so this source file is not itself a detection.
from vsphere_av.lab import simulator

# The EICAR test file, assembled at run time so this source file is not itself a detection.
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d"
    "5354414e444152442d414e544956495255532d544553542d46494c452124482b482a")
SSHD = "/usr/sbin/sshd"


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, str]:
    """(cert, key, SHA-256 thumbprint AA:BB:..) for ``host``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{host}.crt", directory / f"{host}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return cert_path, key_path, ":".join(digest[i:i + 2] for i in range(0, 64, 2))


class FileServer:
    """HTTPS server on 127.0.0.1 serving ``files`` at ``/guestFile?id=NAME`` (ESXi stand-in)."""

    def __init__(self, directory: Path, files: dict[str, bytes]) -> None:
        self.cert, self.key, self.thumbprint = self_signed(directory)
        self.hits: list[str] = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                name = query.removeprefix("id=")
                served.hits.append(name)
                if path != "/guestFile" or name not in files:
                    self.send_error(404)
                    return
                body = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/guestFile?id={name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def appliance_settings(sim: simulator.Simulator, directory: Path, *, addresses: str, token: str,
                       toml: str = "") -> tuple[config.Settings, int]:
    """(settings, engine port): appliances on the ``addresses`` range ("A-B"), the engine token
    in a file, a port free on the first address; ``toml`` adds ``[appliances]`` lines."""
    token_file = directory / "engine.token"
    token_file.write_text(token)
    port = free_port(addresses.split("-")[0])
    body = (f'[appliances]\nenabled = true\naddresses = ["{addresses}"]\n'
            f'engine_port = {port}\nengine_token_file = "{token_file}"\n{toml}')
    return settings_for(sim, directory / "state", toml=body), port


@dataclass
class Sshd:
    """A real OpenSSH server started for one test on its own 127.0.0.N address."""

    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    host_key: Path
    client_key: Path
    user: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def regenerate_host_key(self) -> None:
        """Replace the host key and restart: what a re-imaged (or impostor) appliance looks like."""
        self.stop()
        self.host_key.unlink()
        self.host_key.with_suffix(".pub").unlink()
        _keygen(self.host_key)
        self.process = _start_sshd(self.directory / "sshd_config", self.host, self.port)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _start_sshd(config: Path, host: str, port: int) -> subprocess.Popen[bytes]:
    log = config.with_name("sshd.log")
    with log.open("ab") as err_file:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = log.read_text(errors="replace")
            raise RuntimeError(f"sshd exited with {process.returncode}: {err.strip()}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("sshd did not start listening within 10 s")


def start_sshd(directory: Path, host: str, port: int = 0) -> Sshd:
    """Start ``/usr/sbin/sshd`` on ``host`` (``port``, or a free one) with its own host and
    client keys."""
    if not os.path.exists(SSHD):
        raise RuntimeError(f"{SSHD} is missing: run `make system-deps` (openssh-server)")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd started as root insists on its privilege-separation directory (Debian's
        # service unit creates it at boot via RuntimeDirectory; we are not started by it).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    host_key, client_key = directory / "host_ed25519", directory / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = directory / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = port or free_port(host)
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {host}:{port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        f"PidFile {directory / 'sshd.pid'}",
        "UsePAM no",
        "StrictModes no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
    ]) + "\n")
    process = _start_sshd(config, host, port)
    return Sshd(host=host, port=port, directory=directory, process=process, host_key=host_key,
                client_key=client_key, user=user)


def iter_bytes(data: bytes, size: int = 7) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
