"""Benchmark: a VDI boot storm. Many clones of one image power on at once on a few hosts.

Run by ``make bench-storm`` (full size: 4 hosts x 50 VMs) or, smaller,
``.venv/bin/python bench/storm.py --hosts 2 --vms-per-host 10``.
Calls the bundled simulator (``vsphere_av.lab.simulator``), pyVmomi (to clone and power VMs, as
an administrator would) and the real controller in-process (``app.start_controller``: the
same threads as ``vsphere-av serve``), with the real engine and SQLite state.

1. The simulator starts with HOSTS hosts and one "golden image" VM whose guest file system
   gets FILES files of FILE_KB KiB (distinct random content). It is cloned VMS_PER_HOST times
   onto every host (a clone copies the guest tree with its timestamps, as a linked clone
   shares its base disk); the clones stay powered off.
2. Controller run, sharing on (the default): every clone is powered on at once. Each one is
   stale (never scanned), so it is contained (vNICs cut) and queued at instant-on priority;
   at most ``per_host_limit`` scans run per host. Measured: exposure window p50 / p99 / max
   (power-on seen to isolation or clean verdict), time until all are protected, the largest
   number of concurrent scans on any host (scheduler and audit log), bytes pulled from guests.
3. The same run with ``share_across_vms = false`` (fresh state, VMs powered off and on again):
   bytes pulled, for the sharing ratio.
4. Naive per-VM agents: every VM scans its own disk at the same moment, nothing shared, no
   cap (``vsphere-av scan`` with per-host and global limits as large as the VM count): total
   time and peak concurrency per host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVmomi import vim  # noqa: E402

from vsphere_av import config  # noqa: E402
from vsphere_av.app import App, start_controller  # noqa: E402
from vsphere_av.lab import simulator  # noqa: E402
from vsphere_av.store.audit import AuditLog  # noqa: E402


def wait_tasks(tasks: list[Any], timeout: float = 600.0) -> None:
    """Wait for vim tasks; raise on the first error."""
    deadline = time.monotonic() + timeout
    pending = list(tasks)
    while pending:
        still = []
        for t in pending:
            state = t.info.state
            if state == "error":
                raise SystemExit(f"task failed: {t.info.error}")
            if state != "success":
                still.append(t)
        pending = still
        if pending and time.monotonic() > deadline:
            raise SystemExit("tasks did not finish in time")
        if pending:
            time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def audit_peak(state: Path) -> dict[str, int]:
    """Most scans running at once per host, from scan.start / scan.end in the audit log."""
    running: dict[str, set[Any]] = {}
    peak: dict[str, int] = {}
    with AuditLog.open(state) as log:
        for e in log.entries():
            host = e.details.get("host", "")
            if e.action == "scan.start":
                running.setdefault(host, set()).add(e.details.get("scan_id"))
                peak[host] = max(peak.get(host, 0), len(running[host]))
            elif e.action == "scan.end":
                running.setdefault(host, set()).discard(e.details.get("scan_id"))
    return peak


class Lab:
    """The simulator, an admin session and the cloned VMs."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.workdir = workdir
        self.sim = simulator.start(guest_root=workdir / "guests", hosts=args.hosts, vms=1,
                                   timeout=120)
        self.si = SmartConnect(host=self.sim.host, port=self.sim.port, user=self.sim.username,
                               pwd=self.sim.password, sslContext=self.sim.ssl_context())
        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine, vim.HostSystem], True)
        try:
            objs = list(view.view)
        finally:
            view.DestroyView()
        golden = next(o for o in objs if isinstance(o, vim.VirtualMachine))
        self.hosts = sorted((o for o in objs if isinstance(o, vim.HostSystem)),
                            key=lambda h: h.name)
        image = self.sim.guest_root / golden.name
        for i in range(args.files):
            target = image / "opt" / "vdi" / f"lib{i:03}.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(os.urandom(args.file_kb * 1024))
        (image / "etc").mkdir(parents=True, exist_ok=True)
        (image / "etc" / "hostname").write_bytes(b"golden\n")
        wait_tasks([golden.PowerOffVM_Task()])
        self.vms: list[Any] = []
        folder = golden.parent
        started = time.monotonic()
        for h in self.hosts:
            pool = h.parent.resourcePool
            tasks = [golden.CloneVM_Task(
                folder=folder, name=f"vdi-{h.name}-{n:03}",
                spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(host=h, pool=pool),
                                      powerOn=False, template=False))
                for n in range(args.vms_per_host)]
            wait_tasks(tasks)
            self.vms += [t.info.result for t in tasks]
        self.golden = golden
        print(f"lab: {len(self.hosts)} hosts, {len(self.vms)} clones of one image "
              f"({args.files} files x {args.file_kb} KiB) in {time.monotonic() - started:.1f}s")

    def power(self, on: bool) -> float:
        """Power every clone on (or off) at once; returns when the requests were sent."""
        method = "PowerOnVM_Task" if on else "PowerOffVM_Task"
        wanted = "poweredOn" if on else "poweredOff"
        vms = [vm for vm in self.vms if vm.runtime.powerState != wanted]
        sent = time.monotonic()
        tasks = [getattr(vm, method)() for vm in vms]
        wait_tasks(tasks)
        return sent

    def settings(self, state: Path, **scan: Any) -> config.Settings:
        """Settings for the simulator with ``[scan]`` overrides."""
        toml = "[scan]\n" + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                                    for k, v in scan.items())
        cfg = state.parent / f"{state.name}.toml"
        cfg.write_text(toml)
        env = {"VSPHERE_AV_SERVER": self.sim.url, "VSPHERE_AV_THUMBPRINT": self.sim.thumbprint,
               "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": self.sim.guest_user,
               "VSPHERE_AV_GUEST_PASSWORD": self.sim.guest_password}
        return config.load(config_file=cfg, env=env)

    def close(self) -> None:
        """Log out and stop the simulator."""
        try:
            Disconnect(self.si)
        finally:
            self.si._stub.DropConnections()
            self.sim.stop()


def controller_run(lab: Lab, args: argparse.Namespace, *, share: bool) -> dict[str, Any]:
    """Power every clone on under the controller; measure containment, scans and bytes."""
    state = lab.workdir / f"state-share-{'on' if share else 'off'}"
    lab.power(False)
    settings = lab.settings(state, per_host_limit=args.per_host_limit,
                            global_limit=args.global_limit, share_across_vms=share)
    rt = start_controller(settings)
    try:
        if not (rt.controller.inventory_ready.wait(60) and rt.controller.events_ready.wait(60)):
            raise SystemExit("controller did not start watching in time")
        wall_start = time.time()
        lab.power(True)
        total = len(lab.vms)
        deadline = time.monotonic() + args.timeout
        while True:
            exposures = rt.jobs.exposures()
            done = [e for e in exposures if e.closed is not None]
            if len(done) >= total and rt.controller.scheduler.idle():
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(done)} of {total} VMs protected in {args.timeout}s")
            time.sleep(0.1)
        protected_after = max(e.clean or e.closed or 0 for e in exposures) - wall_start
        windows = [e.window for e in exposures if e.window is not None]
        outcomes = {e.outcome for e in exposures}
        stats = rt.controller.stats
        peak_sched = max(rt.controller.scheduler.peak_per_host().values())
    finally:
        rt.stop(grace=30)
    peak_audit = max(audit_peak(state).values())
    return {"share": share, "vms": total, "p50": statistics.median(windows),
            "p99": percentile(windows, 99), "max": max(windows),
            "all_protected": protected_after, "peak_per_host": max(peak_sched, peak_audit),
            "bytes": stats.bytes, "outcomes": sorted(outcomes), "scans": stats.scans}


def naive_run(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    """Every VM scans itself at the same moment, nothing shared (per-VM agents)."""
    state = lab.workdir / "state-naive"
    total = len(lab.vms)
    settings = lab.settings(state, per_host_limit=total, global_limit=total,
                            share_across_vms=False)
    names = [vm.name for vm in lab.vms]
    with App(settings) as app:
        app.engine.active_version()
        started = time.monotonic()
        report = app.scan(names=names)
        elapsed = time.monotonic() - started
    statuses = {r.status for r in report.results}
    return {"elapsed": elapsed, "peak_per_host": max(report.peak_per_host.values()),
            "bytes": sum(r.bytes for r in report.results), "statuses": sorted(statuses)}


def main() -> None:
    """Parse options, build the lab, run the three measurements, print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--vms-per-host", type=int, default=50)
    p.add_argument("--files", type=int, default=24, help="files in the golden image")
    p.add_argument("--file-kb", type=int, default=64, help="size of each image file (KiB)")
    p.add_argument("--per-host-limit", type=int, default=4)
    p.add_argument("--global-limit", type=int, default=16)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.hosts < 1 or args.vms_per_host < 1 or args.files < 1 or args.file_kb < 1:
        p.error("--hosts, --vms-per-host, --files and --file-kb must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="vsphere-av-storm-"))
    lab = Lab(args, workdir)
    try:
        shared = controller_run(lab, args, share=True)
        unshared = controller_run(lab, args, share=False)
        lab.power(True)
        naive = naive_run(lab, args)
    finally:
        lab.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    mb = 1024 * 1024
    print(f"\nstorm: {shared['vms']} VMs on {args.hosts} hosts powered on at once "
          f"(per-host cap {args.per_host_limit}, global cap {args.global_limit})")
    print(f"  exposure window   p50 {shared['p50'] * 1000:7.1f} ms   p99 "
          f"{shared['p99'] * 1000:7.1f} ms   max {shared['max'] * 1000:7.1f} ms")
    print(f"  all protected in  {shared['all_protected']:.2f} s "
          f"(outcomes: {', '.join(shared['outcomes'])})")
    print(f"  peak concurrent scans on one host: {shared['peak_per_host']}"
          f" (cap {args.per_host_limit})")
    ratio = unshared["bytes"] / shared["bytes"] if shared["bytes"] else float("inf")
    print(f"  bytes pulled from guests: {shared['bytes'] / mb:.1f} MiB with sharing, "
          f"{unshared['bytes'] / mb:.1f} MiB without  -> {ratio:.1f}x less")
    print(f"  (without sharing: all protected in {unshared['all_protected']:.2f} s, "
          f"exposure max {unshared['max'] * 1000:.1f} ms)")
    print("naive per-VM agents (every VM scans itself at once, nothing shared):")
    print(f"  total time {naive['elapsed']:.2f} s, peak concurrent scans on one host "
          f"{naive['peak_per_host']}, {naive['bytes'] / mb:.1f} MiB pulled "
          f"(statuses: {', '.join(naive['statuses'])})")
    print(f"  controller vs naive: time {shared['all_protected']:.2f} s vs "
          f"{naive['elapsed']:.2f} s, peak per host {shared['peak_per_host']} vs "
          f"{naive['peak_per_host']}")


if __name__ == "__main__":
    main()
