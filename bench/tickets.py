"""Benchmark: what vCenter's service-ticket round trips cost an in-process disk scan.

Run as ``.venv/bin/python bench/tickets.py [--delays 0,0.02] [--runs 3]``. Starts the bundled
simulator with real disk images (``simulator.start(disks=True, ticket_delay=D)``, vcsim
README "Ticket latency": each ``AcquireGenericServiceTicket`` answer waits D seconds, as a
real vCenter's round trip would), gives one powered-off Linux VM a guest tree of a few
hundred small files and some MB of random data, and scans it with ``App.scan(via="disk",
full=True)`` in this process (``scan.disk_workers = 0``: the controller reads the disk
itself through ``DatastoreFiles``), a fresh state directory each run.

Prints per run the wall time, the range requests sent and the tickets fetched, used and
dropped unused (``DatastoreFiles.statistics()``, read around the scan's
``DatastoreFiles.close``: the one place this script reaches into the product), then each
delay's median and its ratio to the delay-0 median (the same scan on a vCenter that answers
at once, run in the same command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vsphere_av import config  # noqa: E402
from vsphere_av.app import App  # noqa: E402
from vsphere_av.lab import simulator  # noqa: E402
from vsphere_av.vsphere import disks  # noqa: E402

VM = "DC0_C0_RP0_VM0"
FSTAB = b"LABEL=root / ext4 defaults 0 1\n"


def plant_tree(root: Path, *, small: int, big_mb: int) -> None:
    """``small`` files of 1-8 KiB and ``big_mb`` MiB in 1 MiB files, random bytes."""
    vm = root / VM
    (vm / "etc").mkdir(parents=True, exist_ok=True)
    (vm / "etc" / "fstab").write_bytes(FSTAB)
    for i in range(small):
        d = vm / "srv" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(1024 * (1 + i % 8)))
    for i in range(big_mb):
        (vm / "data").mkdir(parents=True, exist_ok=True)
        (vm / "data" / f"big{i}.bin").write_bytes(os.urandom(1024 * 1024))


def power_off(sim: simulator.Simulator) -> None:
    from vsphere_av.vsphere import connection, inventory, lab

    conn = connection.connect(config.VcenterSettings(
        server=sim.host, port=sim.port, user=sim.username,
        password=config.Secret(sim.password), thumbprint=sim.thumbprint))
    try:
        (vm,) = inventory.find_vms(conn, [VM])
        if vm.power_state != "poweredOff":
            lab.power_off(conn, vm.moref)
    finally:
        conn.close()


def one_run(sim: simulator.Simulator, work: Path, n: int) -> dict[str, Any]:
    state = work / f"state-{n}"
    cfg = work / f"state-{n}.toml"
    cfg.write_text("[scan]\ndisk_workers = 0\n")
    env = {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
           "VSPHERE_AV_STATE_DIR": str(state)}
    seen: list[disks.ReadStatistics] = []
    close = disks.DatastoreFiles.close

    def counting_close(self: disks.DatastoreFiles) -> None:
        requests = self.statistics().requests
        close(self)         # tickets still coming land (and count as unused) first
        seen.append(replace(self.statistics(), requests=requests))

    disks.DatastoreFiles.close = counting_close  # type: ignore[method-assign]
    try:
        with App(config.load(config_file=cfg, env=env)) as app:
            started = time.monotonic()
            report = app.scan(names=[VM], full=True, via="disk")
            took = time.monotonic() - started
    finally:
        disks.DatastoreFiles.close = close  # type: ignore[method-assign]
    r = report.results[0]
    if r.status != "clean" or r.incomplete:
        raise SystemExit(f"run {n}: {r.status} ({r.reason})")
    stats = seen[-1]
    return {"seconds": took, "files": r.scanned, "requests": stats.requests,
            "tickets": stats.tickets, "used": getattr(stats, "tickets_used", stats.tickets),
            "unused": getattr(stats, "tickets_unused", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,0.02", help="ticket delays in seconds")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=300, help="small files in the tree")
    parser.add_argument("--big-mb", type=int, default=32, help="MiB in 1 MiB files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tickets-") as tmp:
        work = Path(tmp)
        plant_tree(work / "guests", small=args.small, big_mb=args.big_mb)
        medians: dict[float, float] = {}
        for delay in (float(d) for d in args.delays.split(",")):
            sim = simulator.start(guest_root=work / "guests", hosts=1, vms=1, disks=True,
                                  ticket_delay=delay)
            try:
                power_off(sim)
                runs = [one_run(sim, work, n) for n in range(args.runs)]
            finally:
                sim.stop()
            for n, got in enumerate(runs):
                print(f"delay {delay * 1000:.0f} ms run {n + 1}: {got['seconds']:.2f} s, "
                      f"{got['files']} files, {got['requests']} range requests, "
                      f"{got['tickets']} tickets fetched, "
                      f"{got['used']} used, {got['unused']} unused",
                      flush=True)
            medians[delay] = statistics.median(g["seconds"] for g in runs)
            print(f"delay {delay * 1000:.0f} ms median {medians[delay]:.2f} s", flush=True)
        # The peer in the same command: the scan on a vCenter that answers tickets at once.
        base = medians.get(0.0)
        for delay, median in medians.items():
            if delay and base:
                print(f"delay {delay * 1000:.0f} ms / delay 0 ratio {median / base:.2f} "
                      f"(1.00: vCenter's ticket round trips cost the scan nothing)")


if __name__ == "__main__":
    main()
