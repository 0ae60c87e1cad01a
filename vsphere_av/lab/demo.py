"""``make demo``: the whole product end to end on the bundled simulator.

Called by ``make demo`` (``python -m vsphere_av.lab.demo``). Starts the simulator with real
virtual disks (each VM's disk is built from its guest tree when it powers off), plants test
files (the harmless EICAR test string) in guests, then runs the real ``vsphere-av``
commands a person would type and prints their output, so what you see is what you get.
Uses ``vsphere.lab`` for what an administrator would do in the vSphere Client (power a VM
on or off, set its guest OS). Everything lives under ``build/demo/`` and is recreated each
run.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vsphere_av import config
from vsphere_av.errors import VsphereAvError
from vsphere_av.lab import simulator
from vsphere_av.models import VmInfo

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ROOT = Path(__file__).resolve().parents[2]
APPLIANCE_POOL_FIRST, APPLIANCE_POOL_LAST = "127.0.0.101", "127.0.0.120"
WORK = ROOT / "build" / "demo"


def banner(text: str) -> None:
    """A section heading."""
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def run(env: dict[str, str], *args: str, check_codes: Sequence[int] = (0,)) -> int:
    """Run one vsphere-av command as a person would and show its output."""
    print(f"$ vsphere-av {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "vsphere_av", *args], env=env, check=False)
    if proc.returncode not in check_codes:
        raise SystemExit(f"demo: `vsphere-av {' '.join(args)}` exited {proc.returncode}")
    return proc.returncode


def plant(sim: simulator.Simulator, vm: str, path: str, data: bytes) -> None:
    """Put a file into a VM's guest file system (what a user or an attacker would have done)."""
    target = sim.guest_root / vm / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def zipped(name: str, data: bytes) -> bytes:
    """A zip archive holding one member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def free_port(address: str) -> int:
    """A TCP port free on ``address`` (and, by luck of the draw, on its neighbours)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def port_open(address: str, port: int) -> bool:
    """True when something accepts TCP connections there."""
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def show_tags(settings: config.Settings, vms: Sequence[VmInfo]) -> None:
    """Print the vSphere tag each VM carries now (read through the Automation API)."""
    from vsphere_av.app import App

    print("  vSphere tags ([tagging] enabled; the tag follows the VM's state):")
    with App(settings) as app:
        tag = settings.tagging.label
        for vm in vms:
            print(f"    {vm.name:18} {tag if app.tagging.is_marked(vm.moref) else '(none)'}")


class SyslogSink:
    """A stand-in SIEM: takes syslog over TCP (octet-counted frames) on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.data = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                with self._lock:
                    self.data += chunk

    def messages(self) -> list[bytes]:
        """Every complete message received so far."""
        from vsphere_av.store.siem import unframe

        with self._lock:
            return unframe(bytes(self.data))

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll until ``predicate`` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def show_nics(settings: config.Settings, vm: VmInfo) -> None:
    """Print each vNIC's flags as vCenter reports them now."""
    from vsphere_av.app import App
    from vsphere_av.vsphere.isolation import read_nics

    with App(settings) as app:
        for nic in read_nics(app.connection, vm.moref):
            print(f"    vNIC {nic.label} of {vm.name}: connected={str(nic.connected).lower()},"
                  f" startConnected={str(nic.start_connected).lower()}")


def audit_story(settings: config.Settings, vm: VmInfo, *, since: str) -> None:
    """Print what the audit log says happened to one VM since ``since`` (ISO time)."""
    from vsphere_av.store.audit import AuditLog

    with AuditLog.open(settings.state_dir) as log:
        for e in log.entries():
            d = e.details
            if d.get("moref") != vm.moref or e.time < since or not e.action.startswith(
                    ("scan.", "detection", "remediation", "isolation.", "job.")):
                continue
            what = {"detection": f"detection: {d.get('path')} ({d.get('threat')})",
                    "remediation": f"remediation: {d.get('path')} -> {d.get('result')}",
                    "scan.end": f"scan end: {d.get('status')}",
                    "isolation.isolate": f"isolation.isolate: {d.get('reason')}"}
            print(f"    {e.time[11:23]}  {what.get(e.action, e.action)}")


def guest_credentials(vms: Sequence[VmInfo], guest_user: str) -> str:
    """``[[guest.credentials]]`` for each VM named: the VMs left out have no guest login."""
    return "".join(f'[[guest.credentials]]\nvm = "{vm.name}"\nuser = "{guest_user}"\n'
                   'password_env = "VSPHERE_AV_DEMO_GUEST_PASSWORD"\n' for vm in vms)


def keeps_each_host_busy(vms: Sequence[VmInfo], off: Sequence[VmInfo]) -> bool:
    """True when every host still runs a VM with ``off`` powered off (each appliance works)."""
    hosts = {vm.host.moref for vm in vms if vm.host}
    return hosts == {vm.host.moref for vm in vms if vm.host and vm not in off}


def new_bundle(target: Path) -> Path:
    """The built-in bundle plus one new rule: the signature update of the demo."""
    import vsphere_av.engine

    shutil.copytree(Path(vsphere_av.engine.__file__).parent / "builtin", target)
    (target / "demo-update.yar").write_text(
        'rule Demo_Update_Marker { strings: $a = "VSPHERE-AV-DEMO-UPDATE-2f9c" '
        "condition: $a }\n")
    return target


def main() -> int:
    """Run the demo; 0 when every step behaved as expected."""
    from vsphere_av.app import App, instant_on_timeline
    from vsphere_av.store.jobs import JobStore
    from vsphere_av.vsphere import inventory, lab

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "guests").mkdir(parents=True)
    state = WORK / "state"

    banner("1. Start the bundled vSphere simulator (1 datacenter, 1 cluster, 3 hosts, 6 VMs,"
           " real virtual disks)")
    sim = simulator.start(hosts=3, vms=6, guest_root=WORK / "guests", disks=True)
    serve: subprocess.Popen[bytes] | None = None
    engines: list[subprocess.Popen[bytes]] = []
    siem = SyslogSink()
    try:
        print(f"SDK URL: https://{sim.host}:{sim.port}/sdk   (SHA-256 thumbprint pinned: "
              f"{sim.thumbprint[:23]}...)")
        env = {**os.environ, "VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
               "VSPHERE_AV_STATE_DIR": str(state), "COLUMNS": "160",
               "VSPHERE_AV_DEMO_GUEST_PASSWORD": sim.guest_password}
        for name in ("VSPHERE_AV_GUEST_USER", "VSPHERE_AV_GUEST_PASSWORD", "VSPHERE_AV_CONFIG"):
            env.pop(name, None)
        token = WORK / "engine.token"
        token.write_text(secrets.token_hex(24))
        token.chmod(0o600)
        engine_port = free_port(APPLIANCE_POOL_FIRST)
        cfg = WORK / "config.toml"
        base = ("[appliances]\nenabled = true\n"
                f'addresses = ["{APPLIANCE_POOL_FIRST}-{APPLIANCE_POOL_LAST}"]\n'
                f'engine_port = {engine_port}\nengine_token_file = "{token}"\n'
                "[tagging]\nenabled = true\n"
                f'[siem]\ntarget = "tcp://127.0.0.1:{siem.port}"\ninterval = 1\n')
        cfg.write_text(base)
        env["VSPHERE_AV_CONFIG"] = str(cfg)
        with App(config.load(config_file=cfg, env=env)) as app:
            vms = sorted(inventory.list_vms(app.connection), key=lambda v: v.name)
        for vm in vms:
            print(f"  {vm.moref:7} {vm.name:18} on {vm.host.name if vm.host else '?':12}"
                  f" {vm.power_state}")
        linux, windows, dormant, sleeper = vms[0], vms[1], vms[2], vms[3]
        # A third dormant VM, clean; every host keeps a running VM for its appliance to scan.
        spare = next(vm for vm in reversed(vms[4:])
                     if keeps_each_host_busy(vms, [dormant, sleeper, vm]))
        # Guest logins for every VM but the dormant Windows one: nobody gave its password.
        cfg.write_text(base + guest_credentials([vm for vm in vms if vm is not sleeper],
                                                sim.guest_user))
        settings = config.load(config_file=cfg, env=env)
        with App(settings) as app:
            banner("2. Plant test files in the guests (EICAR test string, harmless)")
            for vm in (windows, sleeper):
                lab.set_guest_id(app.connection, vm.moref, "windows9_64Guest")
            plant(sim, linux.name, "/home/alice/Downloads/eicar.com", EICAR)
            plant(sim, linux.name, "/srv/backup/site.zip", zipped("assets/payload.exe", EICAR))
            plant(sim, windows.name, "C/Users/Bob/Downloads/invoice.exe", EICAR)
            plant(sim, dormant.name, "/opt/app/dropper.bin", EICAR)
            plant(sim, sleeper.name, "C/ProgramData/Updater/update.exe", EICAR)
            for vm in vms:
                root = "C/Windows/System32" if vm in (windows, sleeper) else "/etc"
                plant(sim, vm.name, f"{root}/hosts", b"127.0.0.1 localhost\n")
            for vm in (dormant, sleeper, spare):   # each disk is written as the VM stops
                lab.power_off(app.connection, vm.moref)
            print(f"  {linux.name}: /home/alice/Downloads/eicar.com, /srv/backup/site.zip")
            print(f"  {windows.name} (Windows guest): C:\\Users\\Bob\\Downloads\\invoice.exe")
            print(f"  {dormant.name}: powered off (dormant), /opt/app/dropper.bin")
            print(f"  {sleeper.name} (Windows guest, no guest password given): powered off"
                  " (dormant), C:\\ProgramData\\Updater\\update.exe")
            print(f"  {spare.name}: powered off (dormant), clean")

        banner("3. Signatures: the built-in bundle is active on a new installation")
        run(env, "signatures", "list")

        banner("4. One hardened security appliance per ESXi host: deploy, pin, harden")
        run(env, "appliances", "reconcile", "--dry-run")
        run(env, "appliances", "reconcile")
        run(env, "appliances", "reconcile")            # nothing left to do: zero actions
        with App(settings) as app:
            from vsphere_av.fleet.manager import open_manager

            addresses = [a.address for a in open_manager(
                settings, connection=app.connection, audit=app.audit,
                actor="demo").appliances() if a.address]
        print("  each appliance runs the engine service on its own address (here 127.0.0.N;")
        print("  on vSphere it runs inside the appliance VM):")
        for address in addresses:
            print(f"$ vsphere-av engine serve --listen {address}:{engine_port}"
                  f" --token-file {token.name}")
            engines.append(subprocess.Popen(
                [sys.executable, "-m", "vsphere_av", "engine", "serve", "--listen",
                 f"{address}:{engine_port}", "--token-file", str(token)],
                env={**env, "VSPHERE_AV_STATE_DIR": str(WORK / f"appliance-{address}")},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: all(port_open(a, engine_port) for a in addresses), timeout=30,
                 what="the appliances' engine services")
        run(env, "appliances", "list")

        banner("5. On-demand scan of every VM through Guest Operations (no agent),"
               " each host's files scanned by its own appliance")
        run(env, "scan", "--all", "--via", "guest", check_codes=(1,))
        from vsphere_av.engine.remote import EngineClient

        for address in addresses:
            health = EngineClient(f"http://{address}:{engine_port}",
                                  token=token.read_text()).health()
            print(f"  appliance {address}: pulled {health['pulls_total']} transfer URL(s) from "
                  f"its own host, scanned {health['scans_total']} file(s)")
        run(env, "detections")
        run(env, "quarantine", "list")
        show_tags(settings, vms)

        banner("6. Instant-on: the dormant VM is powered on while the controller runs")
        serve = subprocess.Popen([sys.executable, "-m", "vsphere_av", "serve"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        print(f"$ vsphere-av serve   (running, pid {serve.pid})")

        def rescanned() -> bool:
            if serve is not None and serve.poll() is not None:
                raise SystemExit("demo: `vsphere-av serve` exited: "
                                 + (serve.stderr.read().decode() if serve.stderr else ""))
            with App(settings) as app:
                return all(r["state"] == "protected" for r in app.status(refresh=False)
                           if r["moref"] in (linux.moref, windows.moref))

        # Its first listing queues the VMs running at start that are not clean under the
        # active version: once they are rescanned, it watches every power state change (a
        # VM powered on before that listing is one it found running, not an instant-on).
        wait_for(rescanned, timeout=60, what="serve's start-up rescans")
        print(f"  it rescanned the VMs it found running and not clean: {linux.name} and"
              f" {windows.name} are clean now (their files are in the quarantine)")
        with App(settings) as app:
            print(f"  powering on {dormant.name} ...")
            lab.power_on(app.connection, dormant.moref)

        def infected() -> bool:
            with App(settings) as app:
                return any(r["moref"] == dormant.moref and r["state"] == "infected"
                           for r in app.status(refresh=False))

        wait_for(infected, timeout=30, what=f"{dormant.name} to be scanned")
        wait_for(lambda: any(r["what"].startswith("exposure closed")
                             for r in instant_on_timeline(settings, dormant.moref)),
                 timeout=30, what=f"{dormant.name}'s verdict")
        print(f"  timeline of {dormant.name}:")
        for row in instant_on_timeline(settings, dormant.moref):
            print(f"    +{row['seconds']:7.3f}s  {row['what']}")

        print(f"  {dormant.name} stays cut off the network until a rescan is clean; the file"
              " is already quarantined, so an operator asks for one:")
        run(env, "scan", dormant.name)      # handed to the running controller
        wait_for(lambda: any(r["what"] == "isolation.release" for r in
                             instant_on_timeline(settings, dormant.moref)),
                 timeout=30, what=f"{dormant.name} to be released")
        for row in instant_on_timeline(settings, dormant.moref)[-3:]:
            print(f"    +{row['seconds']:7.3f}s  {row['what']}")
        show_tags(settings, [dormant])

        banner("7. A signature update: the dormant VMs are swept through their disks"
               " (no guest password, no power-on)")
        since = datetime.now(UTC).isoformat()
        bundle = new_bundle(WORK / "bundle-update")
        # The appliances get the bundle first, so that the sweep the activation starts reads
        # every VM under the new version. On vSphere `appliances push-signatures` (and serve's
        # health loop) copies it over SSH; here each appliance is a local process.
        print("  each appliance gets the new bundle (on vSphere: appliances push-signatures)")
        for address in addresses:
            subprocess.run([sys.executable, "-m", "vsphere_av", "signatures", "import",
                            str(bundle)], check=True, stdout=subprocess.DEVNULL,
                           env={**env, "VSPHERE_AV_STATE_DIR": str(WORK / f"appliance-{address}")})
        run(env, "signatures", "import", str(bundle))

        def swept() -> bool:
            with App(settings) as app:
                version = app.engine.active_version()
                states = {r["moref"]: r for r in app.status(refresh=False)}
            with JobStore.open(state) as jobs:
                cut = jobs.isolation(sleeper.moref)
            return (states[spare.moref]["state"] == "protected"
                    and states[spare.moref]["signature_version"] == version
                    and states[sleeper.moref]["state"] == "infected"
                    and cut is not None and bool(cut.held))

        wait_for(swept, timeout=60, what="the dormant VMs to be swept")
        print(f"  {sleeper.name}, read through its NTFS disk while powered off:")
        audit_story(settings, sleeper, since=since)
        print("  cut off before it boots (nothing connected, nothing set to connect):")
        show_nics(settings, sleeper)
        print(f"  {spare.name} was read the same way and found clean: protected under the new"
              " version before it wakes")
        with App(settings) as app:
            for vm in (spare, sleeper):
                print(f"  powering on {vm.name} ...")
                lab.power_on(app.connection, vm.moref)
        wait_for(lambda: any(r["what"].startswith("exposure closed")
                             for r in instant_on_timeline(settings, sleeper.moref)),
                 timeout=60, what=f"{sleeper.name}'s verdict at power-on")
        with JobStore.open(state) as jobs:
            opened = len(jobs.exposures(spare.moref))
        print(f"  {spare.name}: not an instant-on ({opened} exposure(s) opened), its network as"
              " it was:")
        show_nics(settings, spare)
        print(f"  timeline of {sleeper.name} (no guest password: read under a snapshot; the file"
              " stays for the operator, the VM stays cut off):")
        for row in instant_on_timeline(settings, sleeper.moref):
            print(f"    +{row['seconds']:7.3f}s  {row['what']}")
        show_nics(settings, sleeper)
        show_tags(settings, [sleeper, spare])

        banner("8. Protection status and the audit trail")
        run(env, "status")
        serve.terminate()
        serve.wait(timeout=30)
        serve = None
        run(env, "audit", "verify")
        print("$ vsphere-av audit export --format cef   (last 3 lines)")
        out = subprocess.run([sys.executable, "-m", "vsphere_av", "audit", "export", "--format",
                              "cef"], env=env, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines()[-3:]:
            print("  " + (line if len(line) < 200 else line[:197] + "..."))
        entries = len(out.splitlines())
        received = wait_for(lambda: (lambda m: m if len(m) >= entries else None)(
            siem.messages()), timeout=10, what="the SIEM to receive every entry")
        print(f"  the SIEM (syslog over TCP, 127.0.0.1:{siem.port}) received {len(received)} "
              f"message(s) for {entries} audit entries; the last one:")
        print("  " + received[-1].decode()[:197] + "...")
        banner("Done: state, quarantine and audit log are in build/demo/state")
        return 0
    finally:
        if serve is not None:
            serve.terminate()
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
        for proc in engines:
            proc.terminate()
        for proc in engines:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        sim.stop()
        siem.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VsphereAvError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
