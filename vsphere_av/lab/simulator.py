"""Start and stop the bundled vSphere simulator (``build/vcsim``, built by ``make vcsim``).

Called by the ``vsphere-av vcsim`` command, the demo, benchmarks and the integration test
fixtures (``tests/integration/conftest.py``); calls only the binary (a subprocess) and a
local TLS connect to see that it answers. The binary prints its SDK URL and certificate
thumbprint on its first two stdout lines and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vsphere_av import errors

#: environment variable naming another simulator binary
BINARY_ENV = "VSPHERE_AV_VCSIM"

#: the extraConfig key that keeps a VM's tools "not running" (set with ReconfigVM_Task)
TOOLS_DISABLED_KEY = "vcsim.tools.disabled"

_REPO = Path(__file__).resolve().parents[2]


def binary_path() -> Path:
    """The simulator binary; raises SimulatorMissing if it has not been built."""
    configured = os.environ.get(BINARY_ENV)
    path = Path(configured) if configured else _REPO / "build" / "vcsim"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise errors.SimulatorMissing(f"simulator binary not found at {path}: run `make vcsim`")
    return path


def command_line(
    *,
    listen: str = "127.0.0.1:0",
    datacenters: int = 1,
    clusters: int = 1,
    hosts: int = 3,
    vms: int = 2,
    username: str = "user",
    password: str = "pass",
    guest_root: Path | None = None,
    guest_user: str = "root",
    guest_password: str = "vmware",
    cert_file: Path | None = None,
    identity: Path | None = None,
    disks: bool = False,
    ticket_delay: float = 0.0,
) -> list[str]:
    """The argv that starts the simulator with these settings (validated)."""
    counts = {"datacenters": datacenters, "clusters": clusters, "hosts": hosts, "vms": vms}
    for name, value in counts.items():
        if not 0 <= value <= 1000:
            raise errors.ConfigError(f"--{name} must be between 0 and 1000, got {value}")
    if datacenters < 1:
        raise errors.ConfigError("--datacenters must be at least 1")
    if not 0.0 <= ticket_delay <= 60.0:
        raise errors.ConfigError(f"the ticket delay must be 0 to 60 seconds, got {ticket_delay}")
    if not username or not password:
        raise errors.ConfigError("the simulator needs a non-empty username and password")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise errors.ConfigError(f"--listen {listen!r}: want HOST:PORT, e.g. 127.0.0.1:0")
    argv = [
        str(binary_path()),
        f"-listen={listen}",
        f"-datacenters={datacenters}",
        f"-clusters={clusters}",
        f"-hosts={hosts}",
        f"-vms={vms}",
        f"-username={username}",
        f"-password={password}",
        f"-guest-user={guest_user}",
        f"-guest-password={guest_password}",
    ]
    if guest_root is not None:
        argv.append(f"-guest-root={guest_root}")
    if cert_file is not None:
        argv.append(f"-cert={cert_file}")
    if identity is not None:
        argv.append(f"-identity={identity}")
    if disks:
        argv.append("-disks")
    if ticket_delay:
        argv.append(f"-ticket-delay={round(ticket_delay * 1000)}ms")
    return argv


@dataclass(frozen=True)
class Simulator:
    """A running simulator process; ``stop()`` ends it. Passwords stay out of ``repr``."""

    url: str = field(repr=False)  # https://USER:PASSWORD@127.0.0.1:PORT/sdk
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    thumbprint: str  # SHA-256, upper-case hex pairs joined by ':'
    cert_file: Path  # the server certificate (PEM), for ssl contexts
    guest_root: Path
    guest_user: str
    guest_password: str = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    @property
    def sdk_url(self) -> str:
        """The SDK URL without credentials."""
        return f"https://{self.host}:{self.port}/sdk"

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this simulator's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.cert_file))
        ctx.check_hostname = False  # the certificate names the IP; pinning the CA is enough
        return ctx

    def running(self) -> bool:
        """True while the process is alive."""
        return self.process.poll() is None

    def stop(self, *, timeout: float = 10.0) -> int:
        """Terminate (SIGTERM), wait, kill if needed; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.cert_file.unlink(missing_ok=True)
        return self.process.returncode


def _read_line(stream: object, deadline: float) -> str:
    """One stdout line of the starting simulator, or a timeout (read in a helper thread)."""
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)  # type: ignore[attr-defined]
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not box:
        raise errors.VsphereAvError("the simulator did not print its URL in time")
    return box[0].decode("utf-8", "replace").strip()


def start(
    *,
    listen: str = "127.0.0.1:0",
    datacenters: int = 1,
    clusters: int = 1,
    hosts: int = 3,
    vms: int = 2,
    username: str = "user",
    password: str = "pass",
    guest_root: Path,
    guest_user: str = "root",
    guest_password: str = "vmware",
    identity: Path | None = None,
    timeout: float = 60.0,
    disks: bool = False,
    ticket_delay: float = 0.0,
) -> Simulator:
    """Start the simulator and return once it accepts TLS connections.

    ``disks``: every VM gets a real disk image built from its guest tree (vcsim/README.md).
    ``ticket_delay``: seconds each ``AcquireGenericServiceTicket`` answer waits, standing for
    a real vCenter's round trip (the simulator answers in about a millisecond).

    ``identity``: a PEM file for the TLS key and certificate, created on first use; a
    simulator started again with the same file, ``listen`` address and ``guest_root`` is
    the same vCenter to its clients (same pinned thumbprint, same VMs and hosts with the
    same morefs).
    """
    guest_root = Path(guest_root)
    guest_root.mkdir(parents=True, exist_ok=True)
    cert_fd, cert_name = tempfile.mkstemp(prefix="vcsim-", suffix=".pem")
    os.close(cert_fd)
    cert_file = Path(cert_name)
    argv = command_line(
        listen=listen, datacenters=datacenters, clusters=clusters, hosts=hosts, vms=vms,
        username=username, password=password, guest_root=guest_root, guest_user=guest_user,
        guest_password=guest_password, cert_file=cert_file, identity=identity,
        disks=disks, ticket_delay=ticket_delay,
    )
    deadline = time.monotonic() + timeout
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        url_line = _read_line(process.stdout, deadline)
        thumb_line = _read_line(process.stdout, deadline)
        if not url_line.startswith("https://") or not thumb_line.startswith("thumbprint="):
            try:
                code: int | None = process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise errors.VsphereAvError(
                f"the simulator did not start (exit status {code}); see its stderr above"
            )
        parts = urlsplit(url_line)
        sim = Simulator(
            url=url_line,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 443,
            username=unquote(parts.username or username),
            password=unquote(parts.password or password),
            thumbprint=thumb_line.removeprefix("thumbprint="),
            cert_file=cert_file,
            guest_root=guest_root,
            guest_user=guest_user,
            guest_password=guest_password,
            process=process,
        )
        _wait_ready(sim, deadline)
        return sim
    except BaseException:
        cert_file.unlink(missing_ok=True)
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        raise


def _wait_ready(sim: Simulator, deadline: float) -> None:
    """Poll a TLS handshake until the simulator answers."""
    ctx = sim.ssl_context()
    while True:
        if not sim.running():
            status = sim.process.returncode
            raise errors.VsphereAvError(f"the simulator exited with status {status}")
        try:
            with socket.create_connection((sim.host, sim.port), timeout=2.0) as raw, \
                    ctx.wrap_socket(raw, server_hostname=sim.host):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise errors.VsphereAvError(f"the simulator did not answer in time: {exc}") from exc
            time.sleep(0.1)


def exec_foreground(argv: list[str]) -> None:
    """Replace this process with the simulator (for the ``vsphere-av vcsim`` command)."""
    os.execv(argv[0], argv)
