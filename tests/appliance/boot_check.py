"""Boot test of the built security appliance (``make appliance-test``, issue 13 point 3).

Unpacks the OVA that ``make appliance`` built, checks its manifest with ``sha256sum -c``,
deploys it on the bundled simulator through the controller's reconcile (ImportVApp with the
filled OVF properties, NFC upload of the real disk), and boots the VMDK it carries
(through a throw-away qcow2 overlay) in QEMU: EFI with secure boot (OVMF with Microsoft's
keys enrolled, so Debian's signed shim, GRUB and kernel are verified),
VMware's vmxnet3 NIC (the disk on virtio-scsi: OVMF cannot boot from pvscsi), and the
deploy-time settings as the OVF environment XML that guestinfo.ovfEnv would deliver, here
through the fw_cfg entry the appliance's setup service also reads. Then, from the host over
the forwarded loopback ports only:

- SSH: the host key the appliance printed on its console is the one it presents; the
  controller's ApplianceSsh connects with it pinned, a different pinned key is refused,
  passwords are not even offered as a method;
- the engine's /health over TLS verified with the CA we gave it (and refused without it);
- a signature push and activation through ApplianceSsh.push_signatures, seen in /health
  and in a scan that only the new version detects;
- EICAR detected through the engine client;
- a powered-off VM's disk read by the appliance itself: the bundled simulator (started with
  real disk images) plays vCenter and the ESXi host, the controller's ``RemoteDiskGuest``
  grants the appliance service tickets for the VM's ``/folder`` URLs, and the appliance
  walks the VMDK (GPT, ext4: Dissect and libyal in the image), reads and matches there,
  finding EICAR where it was planted (the guest reaches the host's loopback through QEMU's
  user network as 10.0.2.2, so the grants name that address; the host certificate is
  pinned by its SHA-256 as always);
- only TCP 22 and 8443 listen, / is read-only, no compiler, the engine runs sandboxed as its
  own account, and the controller's restart command works through sudo (and nothing else).

Prints the time of the boot and of each step, and ends with "N passed, N failed".
Run: python tests/appliance/boot_check.py build/appliance/vsphere-av-appliance-VERSION.ova
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import paramiko
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from vsphere_av.engine.remote import EngineClient
from vsphere_av.engine.signatures import SignatureStore
from vsphere_av.errors import EngineError, HostKeyMismatch
from vsphere_av.fleet.ssh import ApplianceSsh, fingerprint
from vsphere_av.store.audit import AuditOnUse

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
BOOT_TIMEOUT = float(os.environ.get("APPLIANCE_BOOT_TIMEOUT", "900"))
REMOTE_STATE = "/var/lib/vsphere-av"
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
HOST_FROM_GUEST = "10.0.2.2"     # QEMU's user network: the host's loopback, seen from the guest
BUILTIN = Path(__file__).resolve().parents[2] / "vsphere_av" / "engine" / "builtin"
MARKER = b"vsphere-av appliance boot test marker 4f1c9a"


class Audit:
    """Collects the audit entries ApplianceSsh writes (the controller's audit log's part)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, *, actor: str, action: str, details: Any = None) -> None:
        self.entries.append((action, dict(details or {})))


class Run:
    """Named, timed checks; a failure is recorded and the run goes on where it can."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"  ok    {name}{': ' + detail if detail else ''}")
        else:
            self.failed += 1
            print(f"  FAIL  {name}{': ' + detail if detail else ''}")

    def step(self, title: str, body: Callable[[], None]) -> None:
        started = time.monotonic()
        print(f"-- {title}")
        try:
            body()
        except Exception as exc:
            self.check(title, False, f"{type(exc).__name__}: {exc}")
        print(f"   ({time.monotonic() - started:.1f} s)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_pki(directory: Path) -> tuple[Path, bytes, bytes, str]:
    """A test CA and a server certificate for 127.0.0.1: (ca file, cert PEM, key PEM, sha256)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vsphere-av boot-test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    ca_file = directory / "engine-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (ca_file, cert.public_bytes(serialization.Encoding.PEM), key_pem,
            cert.fingerprint(hashes.SHA256()).hex(":").upper())


def make_ssh_key(directory: Path) -> tuple[Path, str]:
    """The controller's ed25519 key pair: (private key file, public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / "controller_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return path, f"{public} vsphere-av-controller"


def ovf_environment(props: dict[str, str]) -> str:
    """The OVF environment document as vSphere hands it to the guest (guestinfo.ovfEnv)."""
    lines = "\n".join(f"    <Property oe:key={quoteattr(k)} oe:value={quoteattr(v)}/>"
                      for k, v in props.items())
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"\n'
            '     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
            '     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"\n'
            '     oe:id="vsphere-av-appliance">\n'
            '  <PropertySection>\n' + lines + '\n  </PropertySection>\n</Environment>\n')


def accelerator() -> str:
    """TCG unless APPLIANCE_ACCEL says otherwise: /dev/kvm exists on the build machine but a
    nested KVM there fails on the first MSR QEMU sets, and CI has the same machine."""
    return os.environ.get("APPLIANCE_ACCEL", "tcg")


def unpack(ova: Path, into: Path, run: Run) -> Path:
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        run.check("OVA: the OVF descriptor is the first member", names[0].endswith(".ovf"),
                  ", ".join(names))
        tar.extractall(into, filter="data")
    manifest = next(into.glob("*.mf"))
    result = subprocess.run(["sha256sum", "-c", manifest.name], cwd=into, capture_output=True,
                            text=True, check=False)
    run.check("OVA: sha256sum -c of the manifest", result.returncode == 0,
              result.stdout.strip().replace("\n", "; "))
    return next(into.glob("*.vmdk"))


class Machine:
    """One QEMU process booting the appliance disk."""

    def __init__(self, *, vmdk: Path, work: Path, env_xml: Path) -> None:
        self.ssh_port = free_port()
        self.engine_port = free_port()
        self.probe_port = free_port()
        self.console = work / "console.log"
        self.accel = accelerator()
        overlay = work / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(vmdk), "-F", "vmdk",
                        str(overlay)], check=True)
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv = [
            "qemu-system-x86_64", "-machine", "q35,smm=on", "-accel", self.accel,
            "-cpu", "max" if self.accel == "tcg" else "host", "-smp", "2", "-m", "1536",
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            # OVMF has no driver for VMware's pvscsi, so the disk sits on virtio-scsi here.
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"if=none,id=disk0,format=qcow2,file={overlay}",
            "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
                       f"hostfwd=tcp:127.0.0.1:{self.engine_port}-:8443,"
                       f"hostfwd=tcp:127.0.0.1:{self.probe_port}-:{PROBE_PORT}",
            "-device", "vmxnet3,netdev=net0,romfile=",
            "-fw_cfg", f"name=opt/vsphere-av/ovfenv,file={env_xml}",
            "-display", "none", "-serial", f"file:{self.console}", "-no-reboot",
        ]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)

    def console_text(self) -> str:
        try:
            return self.console.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.console_text())
            if found:
                return found
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode(errors="replace") \
                    if self.process.stdout else ""
                raise RuntimeError(f"QEMU exited with {self.process.returncode}: {out[-2000:]}")
            time.sleep(1)
        raise TimeoutError(f"no {pattern!r} on the console after {timeout:.0f} s; last lines:\n"
                           + "\n".join(self.console_text().splitlines()[-25:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(10)
                if port and sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answers on 127.0.0.1:{port}")
        time.sleep(1)


PROBE_PORT = 9000
PROBE = ("import socket; s = socket.create_server(('0.0.0.0', 9000)); s.settimeout(50)\n"
         "while True:\n c, _ = s.accept(); c.sendall(b'hello'); c.close()")
PROBE_CLIENT = ("import socket; c = socket.create_connection(('127.0.0.1', 9000), 5); "
                "print(c.recv(5).decode())")


def probe_from_host(port: int) -> bytes:
    """What a connection through the forwarded probe port receives (b"" if nothing)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(15)
            return sock.recv(5)
    except OSError:
        return b""


def presented_host_key(port: int) -> paramiko.PKey:
    """The host key the SSH server presents, before any authentication."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=30)
            return transport.get_remote_server_key()
        finally:
            transport.close()


def deploy_on_simulator(unpacked: Path, work: Path, key_file: Path, token: str,
                        run: Run) -> None:
    """The controller's reconcile against the bundled simulator with this OVA's descriptor:
    CreateImportSpec with its properties, ImportVApp, NFC upload of the real disk, pin, power
    on. The simulator shows an import's vApp properties as extraConfig."""
    from pyVmomi import vim

    from vsphere_av import config
    from vsphere_av.config import Secret, VcenterSettings
    from vsphere_av.fleet import image
    from vsphere_av.fleet import plan as ap
    from vsphere_av.lab import simulator
    from vsphere_av.store.audit import AuditLog
    from vsphere_av.vsphere.appliances import VsphereApplianceAdapter
    from vsphere_av.vsphere.connection import connect

    descriptor = next(unpacked.glob("*.ovf"))
    token_file = work / "engine-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    sim = simulator.start(hosts=1, vms=1, guest_root=work / "vcsim-guests")
    conn = None
    audit = AuditLog.open(work / "controller-audit")
    try:
        conn = connect(VcenterSettings(server=sim.host, port=sim.port, user=sim.username,
                                       password=Secret(sim.password),
                                       thumbprint=sim.thumbprint))
        settings = config.parse({"appliances": {
            "enabled": True, "ovf": str(descriptor), "addresses": ["127.0.0.91"],
            "ssh_key_file": str(key_file), "engine_token_file": str(token_file)}},
            env={}).appliances
        adapter = VsphereApplianceAdapter(connection=conn, settings=settings,
                                          image=image.ConfiguredImage(settings))
        desired = ap.Desired.from_settings(settings)
        result = ap.reconcile_once(adapter=adapter, audit=audit, desired=desired,
                                   actor="boot-test")
        run.check("reconcile: deployed from the built OVF without error", result.ok,
                  "; ".join(r.error for r in result.results if not r.ok))
        kinds = sorted(a.kind for a in result.actions)
        observed = adapter.observe().appliances
        run.check("reconcile: one appliance, deployed, pinned and powered on",
                  kinds == ["deploy", "pin", "power_on"] and len(observed) == 1
                  and observed[0].power_state == ap.POWERED_ON,
                  f"{kinds} {[(o.name, o.power_state) for o in observed]}")
        # The simulator shows the vApp properties of an import as extraConfig.
        props = observed[0].extra_config if observed else {}
        public = paramiko.PKey.from_path(key_file)
        run.check("reconcile: the import carried the controller's SSH key and the token",
                  props.get(image.SSH_KEY_PROPERTY, "").split()[:2]
                  == [public.get_name(), public.get_base64()]
                  and props.get(image.TOKEN_PROPERTY) == token
                  and props.get(ap.ADDRESS_KEY) == "127.0.0.91")
        def secure_boot(content: Any) -> bool:
            view = content.viewManager.CreateContainerView(content.rootFolder,
                                                           [vim.VirtualMachine], True)
            vm = next(v for v in view.view if v.name.startswith("vsphere-av-appliance-"))
            return bool(vm.config.firmware == "efi" and vm.config.bootOptions.efiSecureBootEnabled)

        run.check("reconcile: EFI with secure boot on the deployed VM",
                  conn.call("read the appliance", secure_boot))
    finally:
        audit.close()
        if conn is not None:
            conn.close()
        sim.stop()


def disk_scan_by_appliance(client: EngineClient, work: Path, run: Run) -> None:
    """A powered-off Linux VM of the simulator (disks built from its guest tree: GPT, ext4,
    monolithicSparse) read by the booted appliance through the controller's grants."""
    from dataclasses import replace
    from urllib.parse import urlsplit, urlunsplit

    from vsphere_av.config import Secret, VcenterSettings
    from vsphere_av.lab import simulator
    from vsphere_av.scan.sources.remote_disk import RemoteDiskGuest
    from vsphere_av.vsphere import disks, inventory, lab
    from vsphere_av.vsphere.connection import connect

    name = "DC0_C0_RP0_VM0"
    tree = work / "disk-guests" / name
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n", encoding="utf-8")
    (tree / "srv").mkdir()
    # Not the EICAR step's bytes (trailing whitespace is allowed): a content the
    # appliance's verdict cache has not seen, so it is matched there, not looked up.
    (tree / "srv" / "eicar.com").write_bytes(EICAR + b"\r\n")
    (tree / "srv" / "motd").write_bytes(b"welcome\n")
    sim = simulator.start(hosts=1, vms=1, guest_root=work / "disk-guests", disks=True,
                          timeout=300.0)
    conn = guest = None
    try:
        conn = connect(VcenterSettings(server=sim.host, port=sim.port, user=sim.username,
                                       password=Secret(sim.password),
                                       thumbprint=sim.thumbprint))
        (vm,) = inventory.find_vms(conn, [name])
        lab.power_off(conn, vm.moref)       # the simulator brings the disk up to date
        with disks.DatastoreFiles(connection=conn) as files:
            def grant(*args: Any, **kwargs: Any) -> Any:
                given = files.grant(*args, **kwargs)
                parts = urlsplit(given.url)
                return replace(given, url=urlunsplit(parts._replace(
                    netloc=f"{HOST_FROM_GUEST}:{parts.port}")))

            guest = RemoteDiskGuest(vm=vm, disks=disks.disks_of(conn, vm.moref),
                                    client=client, reader="the host's appliance",
                                    grant=grant, excludes=())
            walked = sorted(f.path for f in guest.walk(
                ["/"], prune=lambda _: False, on_error=lambda p, e: None))
            run.check("disk: the appliance walked the VM's ext4 disk",
                      {"/etc/fstab", "/srv/eicar.com", "/srv/motd"} <= set(walked),
                      str(walked[:10]))
            clean, infected = guest.scan([("/srv/motd", "motd", ""),
                                          ("/srv/eicar.com", "eicar.com", "")])
            run.check("disk: the appliance read and matched the files there",
                      getattr(clean, "status", clean) == "clean"
                      and getattr(infected, "status", infected) == "infected"
                      and "EICAR-Test-File" in [d.threat for d in infected.detections]
                      and not clean.cached and not infected.cached,
                      f"{clean!r} {infected!r}")
            run.check("disk: the bytes were read by the appliance, from the host's datastore",
                      guest.bytes_read() > 0, str(guest.bytes_read()))
    finally:
        if guest is not None:
            guest.close()
        if conn is not None:
            conn.close()
        sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ova", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not args.ova.is_file():
        print(f"{args.ova} not found: run make appliance first", file=sys.stderr)
        return 2
    run = Run()
    work = Path(tempfile.mkdtemp(prefix="vsphere-av-appliance-test-"))
    machine: Machine | None = None
    total = time.monotonic()
    try:
        vmdk_box: list[Path] = []
        run.step("unpack and verify the OVA", lambda: vmdk_box.append(unpack(args.ova, work, run)))
        if not vmdk_box:
            return finish(run, total)
        ca_file, cert_pem, key_pem, cert_sha256 = make_pki(work)
        key_file, public_key = make_ssh_key(work)
        token = secrets.token_urlsafe(32)
        run.step("appliances reconcile deploys this OVA on the simulator",
                 lambda: deploy_on_simulator(vmdk_box[0].parent, work, key_file, token, run))
        env_xml = work / "ovf-env.xml"
        env_xml.write_text(ovf_environment({
            "vsphere_av.ssh_authorized_key": public_key,
            "vsphere_av.engine_token": token,
            "vsphere_av.engine_tls_cert": cert_pem.decode(),
            "vsphere_av.engine_tls_key": key_pem.decode(),
            "guestinfo.ipaddress": "", "guestinfo.dns": "",
        }), encoding="utf-8")
        os.chmod(env_xml, 0o600)

        machine = Machine(vmdk=vmdk_box[0], work=work, env_xml=env_xml)
        print(f"-- boot (QEMU, {machine.accel}, EFI secure boot, virtio-scsi + vmxnet3; "
              f"SSH on 127.0.0.1:{machine.ssh_port}, engine on 127.0.0.1:{machine.engine_port})")
        booted = time.monotonic()
        found = machine.wait_console(r"vsphere-av-setup: SSH host key \(ed25519\): (SHA256:\S+)",
                                     BOOT_TIMEOUT)
        console_key = found.group(1)
        wait_tcp(machine.ssh_port, 120)
        print(f"   boot to SSH: {time.monotonic() - booted:.1f} s")
        console = machine.console_text()
        run.check("console: secure boot was on", "Secure boot enabled" in console)
        run.check("console: the engine certificate given is the one in use",
                  f"engine TLS certificate SHA-256: {cert_sha256}" in console)

        state = work / "controller-state"
        state.mkdir(mode=0o700)
        audit = Audit()

        def conn() -> ApplianceSsh:
            return ApplianceSsh(host="127.0.0.1", port=machine_port(), user="vsphere-av",
                                key_file=key_file, state_dir=state, audit=audit,
                                actor="boot-test", appliance="qemu", timeout=30)

        def machine_port() -> int:
            assert machine is not None
            return machine.ssh_port

        def probe_port() -> int:
            assert machine is not None
            return machine.probe_port

        def ssh_checks() -> None:
            key = presented_host_key(machine_port())
            run.check("SSH: presented host key is the one on the console",
                      fingerprint(key) == console_key, f"{fingerprint(key)} vs {console_key}")
            wrong = state / "wrong"
            wrong.mkdir()
            other = paramiko.Ed25519Key.from_private_key_file(str(key_file))
            hosts = paramiko.HostKeys()
            hosts.add(f"[127.0.0.1]:{machine_port()}", other.get_name(), other)
            hosts.save(str(wrong / "known_hosts"))
            try:
                with ApplianceSsh(host="127.0.0.1", port=machine_port(), user="vsphere-av",
                                  key_file=key_file, state_dir=wrong, audit=audit,
                                  actor="boot-test", timeout=30):
                    mismatch = False
            except HostKeyMismatch:
                mismatch = True
            run.check("SSH: another pinned host key is refused", mismatch)
            hosts = paramiko.HostKeys()
            hosts.add(f"[127.0.0.1]:{machine_port()}", key.get_name(), key)
            hosts.save(str(state / "known_hosts"))
            with conn() as ssh:
                result = ssh.run(["id", "-un"])
                run.check("SSH: key login with the pinned host key", result.stdout.strip()
                          == "vsphere-av" and not any(a == "appliance.ssh.host_key_pinned"
                                                      for a, _ in audit.entries))
            with socket.create_connection(("127.0.0.1", machine_port()), timeout=30) as sock:
                transport = paramiko.Transport(sock)
                transport.start_client(timeout=30)
                try:
                    transport.auth_none("vsphere-av")
                    allowed: list[str] = []
                except paramiko.BadAuthenticationType as exc:
                    allowed = list(exc.allowed_types)
                finally:
                    transport.close()
            run.check("SSH: public key is the only method offered", allowed == ["publickey"],
                      str(allowed))

        run.step("SSH", ssh_checks)
        base = f"https://127.0.0.1:{machine.engine_port}"
        client = EngineClient(base, token=token, ca_file=str(ca_file), timeout=60)

        def health() -> None:
            deadline = time.monotonic() + 120
            while True:
                try:
                    doc = client.health()
                    break
                except EngineError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)
            run.check("engine: /health over TLS verified with the given CA",
                      doc.get("status") == "ok" and doc.get("signature_version") == 1, str(doc))
            unverified = EngineClient(base, token=token, timeout=30)
            try:
                unverified.health()
                refused = False
            except EngineError:
                refused = True
            finally:
                unverified.close()
            run.check("engine: without the CA the certificate is not trusted", refused)
            wrong = EngineClient(base, token="x" * 32, ca_file=str(ca_file), timeout=30)
            try:
                detailed = "signature_version" in wrong.health()
            finally:
                wrong.close()
            run.check("engine: a wrong token gets no details", not detailed)

        run.step("engine health over TLS", health)

        def scan(data: bytes, name: str) -> Any:
            return client.scan_stream([data], path=f"/boot-test/{name}", name=name)

        def push() -> None:
            first = scan(EICAR, "eicar.com")
            run.check("scan: EICAR detected under the built-in signatures",
                      "EICAR-Test-File" in [d.threat for d in first.detections],
                      f"{first.status} {[d.threat for d in first.detections]}")
            before = scan(MARKER, "marker.txt")
            run.check("scan: the test marker is clean under the built-in signatures",
                      not before.detections, before.status)
            store = SignatureStore(state_dir=work / "controller-state",
                                   audit=AuditOnUse(work / "controller-state"),
                                   actor="boot-test")
            store.ensure_builtin()
            bundle = work / "bundle"
            bundle.mkdir()
            (bundle / "marker.yar").write_text(
                'rule Boot_Test_Marker\n{\n  meta:\n    threat = "Boot-Test-Marker"\n'
                f'  strings:\n    $m = "{MARKER.decode()}"\n  condition:\n    $m\n}}\n',
                encoding="utf-8")
            # A version is a whole rule set, not an addition: keep the built-in EICAR rule.
            shutil.copyfile(BUILTIN / "eicar.yar", bundle / "eicar.yar")
            result = store.import_bundle(bundle, audit=False, label="boot test")
            version = store.active_version()
            with conn() as ssh:
                pushed = ssh.push_signatures(
                    version_dir=work / "controller-state" / "signatures" / f"v{version:04d}",
                    remote_state_dir=REMOTE_STATE)
            run.check("push: the new version travelled and was activated",
                      pushed.installed and pushed.version == version == 2,
                      f"v{pushed.version} {pushed.size} bytes sha256 {pushed.sha256[:16]}... "
                      f"({result})")
            doc = client.health()
            run.check("push: /health reports the pushed version",
                      doc.get("signature_version") == version, str(doc.get("signature_version")))
            after = scan(MARKER, "marker.txt")
            run.check("scan: the pushed rule detects the marker",
                      [d.threat for d in after.detections] == ["Boot-Test-Marker"],
                      f"{after.status} {[d.threat for d in after.detections]}")

        run.step("signature push and activation (ApplianceSsh.push_signatures)", push)

        def eicar() -> None:
            outcome = scan(EICAR, "eicar.com")
            run.check("scan: EICAR detected under the pushed version",
                      "EICAR-Test-File" in [d.threat for d in outcome.detections],
                      f"{outcome.status} {[d.threat for d in outcome.detections]}")

        run.step("EICAR scan through the engine", eicar)
        run.step("a powered-off VM's disk read and scanned by the appliance",
                 lambda: disk_scan_by_appliance(client, work, run))

        def hardening() -> None:
            with conn() as ssh:
                tcp = ssh.run("ss -Htln | awk '{print $4}'").stdout.split()
                ports = sorted({addr.rsplit(":", 1)[1] for addr in tcp})
                run.check("listening: only TCP 22 and 8443", ports == ["22", "8443"], str(tcp))
                # systemd-networkd's DHCP client keeps a UDP socket on port 68 for renewals
                # (the firewall admits only replies to it); nothing else may be bound.
                udp = ssh.run("ss -Hluna | awk '{print $4}'").stdout.split()
                run.check("listening: no UDP socket but the DHCP client's",
                          all(addr.rsplit(":", 1)[1] == "68" for addr in udp), str(udp))
                mount = ssh.run(["findmnt", "-n", "-o", "OPTIONS", "/"]).stdout
                run.check("/ is mounted read-only", mount.split(",")[0] == "ro", mount.strip())
                tools = ssh.run("for t in gcc cc c++ make as ld; do command -v $t; done; true")
                run.check("no compiler or build tool", not tools.stdout.strip(), tools.stdout)
                # The sandbox as the kernel applies it to the running engine (the account may
                # not ask systemd over D-Bus: there is no bus for it).
                status = ssh.run("pid=$(pgrep -u vsphere-av -f 'vsphere-av engine serve' | head -1)"
                                 " && cat /proc/$pid/status").stdout
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                got = {k: " ".join(fields.get(k, "").split()) for k in
                       ("Uid", "NoNewPrivs", "Seccomp", "CapBnd", "CapEff", "CapPrm")}
                uid = ssh.run(["id", "-u", "vsphere-av"]).stdout.strip()
                run.check("engine: runs as vsphere-av, no new privileges, seccomp, no capability",
                          got["Uid"].split()[:1] == [uid] and uid != "0"
                          and got["NoNewPrivs"] == "1" and got["Seccomp"] == "2"
                          and got["CapBnd"] == got["CapEff"] == got["CapPrm"]
                          == "0000000000000000", str(got))
                journal = ssh.run(["journalctl", "-b", "-u", "nftables", "-o", "cat",
                                   "--no-pager"]).stdout
                run.check("firewall: nftables loaded its rules at boot",
                          "Finished nftables" in journal and "rror" not in journal
                          and "Failed" not in journal, journal.strip()[-300:])
                # A listener on a port the firewall does not admit: reachable from inside,
                # not through the forwarded port from the host.
                ssh.run(f"nohup timeout 60 python3 -c {shlex.quote(PROBE)} >/dev/null 2>&1 &")
                time.sleep(3)
                inside = ssh.run(["python3", "-c", PROBE_CLIENT]).stdout.strip()
                outside = probe_from_host(probe_port())
                run.check("firewall: another port is dropped from outside",
                          inside == "hello" and outside == b"",
                          f"inside {inside!r}, outside {outside!r}")
                shadow = ssh.run("sudo -n cat /etc/shadow")
                run.check("sudo allows nothing but the engine restart", shadow.status != 0,
                          shadow.stderr.strip()[:100])
                started = time.monotonic()
                ssh.restart_engine(command="sudo -n systemctl restart vsphere-av-engine")
            deadline = time.monotonic() + 120
            while True:
                try:
                    doc = client.health()
                    break
                except EngineError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            run.check("restart: the engine is back with the pushed signatures",
                      doc.get("signature_version") == 2 and doc.get("uptime_seconds", 99) <
                      time.monotonic() - started + 5, str(doc))

        run.step("hardening seen from inside (over SSH)", hardening)
        client.close()
    finally:
        if machine:
            machine.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return finish(run, total)


def finish(run: Run, started: float) -> int:
    print(f"appliance boot test took {time.monotonic() - started:.1f} s")
    print(f"{run.passed} passed, {run.failed} failed")
    return 0 if run.failed == 0 and run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
