"""Benchmark: the same file tree scanned locally, through Guest Operations and from VM disks.

Run by ``make bench-disk-scan`` (or ``.venv/bin/python bench/disk_scan.py --corpus-mb 50``).
Calls ``vsphere-av scan-files``, ``vsphere-av scan --via guest`` and ``vsphere-av scan --via
disk`` as subprocesses against the bundled simulator started with real disk images
(``simulator.start(disks=True)``, vcsim/README.md "Virtual disks"); reuses
``bench/guest_scan.py`` (tree builder, split over VMs, rule import, fresh state, measured
runs) and ``bench/engine.py`` (corpus builder, process-tree sampler).

What is compared, and how it is kept fair:
  * Same files: the tree is the corpus with duplicate contents dropped (so the verdict cache,
    on and empty on every side as in production, can never answer for any side). The guest
    side's VMs (powered on) and the disk side's VMs (powered off) get the same split of it
    as hard links in their guest trees under ``/data``; the simulator built each disk VM's
    disk from its tree (GPT, ext4, ``monolithicSparse``, one ``/etc/fstab`` so the volume
    is ``/``), so the disk side reads the very same bytes out of ext4 inside a VMDK. Every
    VM holds about the same bytes.
  * Same rules: one signature import, copied into a fresh state directory for every run
    (cold verdict cache, empty file index and disk index: every side reads and matches
    every byte; ``--full`` on both scans).
  * Same cores: the local side runs JOBS worker processes; the guest and disk sides scan
    JOBS VMs at once (per-host limit JOBS, all VMs on one host); the disk side reads and
    matches each VM in the scanning process, or in a disk-scan worker process with
    ``--disk-workers N`` (``scan.disk_workers``: a pool of N worker processes, reused
    from VM to VM, their CPU time counted with the scan's). The simulator that plays
    vCenter and the ESXi host (Guest Operations transfers, datastore ``/folder`` range
    reads) runs on the same cores and its CPU time is reported.
  * Page cache warm for all (the corpus is read once before the first run; the disk images
    are read by the simulator's first build and power-off).
  * Timing: each side's own report (engine opened to last verdict: rule loading, pool or
    engine start, vCenter login and listing included) and the process wall time; several
    interleaved rounds (the machine is shared; the order turns round every round), every
    round printed with the machine's load average after it (other work on a shared
    machine moves every figure). The ratios compare throughput (MB/s) of sides run in the
    same round; the median over the rounds is the result.

A fourth run, "disk reads only", is the reader without a scanner: one process per disk VM
opens the VM's disks through the product's ``DatastoreFiles`` (service ticket, HTTPS range
GETs on the host), ``RangeFile``, ``open_virtual_disk`` and ``DiskFiles``, walks ``/data``
and reads every file, the bytes thrown away: no engine, no state. A disk scan cannot beat it.

A fifth run, "disk floor", is that reader with the engine and nothing else: the same
processes also open the engine (rule loading included, as the local side's time includes
it) and match every file as it is read (``Session.scan_stream``), with no controller, no
scan job, no index, audit or state bookkeeping, no worker pool. It is what the product's
reader and engine cost before the controller adds anything, so ``floor/local`` is the
ceiling of ``disk/local`` on this machine for this reader.

The last line is exactly ``disk/local ratio X.XX; disk/guest ratio Y.YY`` (medians; higher
is better for the disk path; goals disk/local >= 0.8, disk/guest >= 3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import engine as engine_bench  # noqa: E402  (bench/engine.py: corpus builder, sampler)
import guest_scan  # noqa: E402  (bench/guest_scan.py: tree, split, rules, measured runs)

from vsphere_av.config import ScanPolicy  # noqa: E402
from vsphere_av.lab import simulator  # noqa: E402

GOAL_LOCAL = 0.8
GOAL_GUEST = 3.0
ROOTS = ["/data"]
# The disk VMs' root file system must hold /etc/fstab to be mounted at "/" (and /data to be
# /data): an fstab naming nothing else, as a one-disk guest has.
FSTAB = "# <file system> <mount point> <type> <options> <dump> <pass>\n"


def _read_disk_vm(name: str, *, match: bool = False) -> tuple[int, int]:
    """Walk one VM's scan roots on its disks and read every file, matching each with the
    engine when ``match``; (files, bytes)."""
    from vsphere_av import config
    from vsphere_av.engine import Engine
    from vsphere_av.scan.sources import DiskFiles, RangeFile, open_virtual_disk
    from vsphere_av.vsphere import connection, disks, inventory

    settings = config.load()
    conn = connection.connect(settings.vcenter)
    try:
        (vm,) = inventory.find_vms(conn, [name])
        with disks.DatastoreFiles(connection=conn) as datastore:
            opened = []
            for disk in disks.disks_of(conn, vm.moref):
                assert disk.host is not None, f"{name}: no host"
                top = disk.chain[0].descriptor

                def open_file(path: str, host=disk.host, ds=top.datastore) -> RangeFile:
                    handle = datastore.open(host, ds, path)
                    return RangeFile(handle.read_range, handle.size, name=handle.name)

                opened.append(open_virtual_disk(top.path, open_file=open_file))
            files = size = 0
            with contextlib.ExitStack() as stack:
                session = (stack.enter_context(Engine.open(settings).session()) if match
                           else None)
                found = stack.enter_context(
                    DiskFiles.mount(opened, windows=vm.guest_id.startswith("win")))
                for entry in found.walk(ROOTS):
                    with found.open(entry) as stream:
                        if session is None:
                            for chunk in stream.chunks():
                                size += len(chunk)
                        else:
                            outcome = session.scan_stream(stream.chunks(), path=entry.path,
                                                          size_hint=entry.size)
                            if outcome.status not in ("clean", "infected"):
                                raise RuntimeError(f"{name}: {entry.path}: {outcome.status} "
                                                 f"({outcome.reason})")
                            size += entry.size
                    files += 1
            return files, size
    finally:
        conn.close()


def _scan_disk_vm(name: str) -> tuple[int, int]:
    """``_read_disk_vm`` with the engine: the "disk floor" side's work for one VM."""
    return _read_disk_vm(name, match=True)


def disk_reads_only(names: list[str], *, match: bool = False) -> None:
    """The "disk reads only" side, or with ``match`` the "disk floor" side (run as a
    child): one process per VM, JSON on stdout."""
    from vsphere_av import config, engine  # noqa: F401
    from vsphere_av.scan import sources  # noqa: F401
    from vsphere_av.vsphere import connection, disks, inventory  # noqa: F401
    guest_scan.read_in_processes(names, _scan_disk_vm if match else _read_disk_vm)


def power_off(sim: simulator.Simulator, names: list[str]) -> None:
    """Power the VMs off (the simulator brings each disk up to date with its tree)."""
    from vsphere_av.config import Secret, VcenterSettings
    from vsphere_av.vsphere import connection, inventory, lab

    conn = connection.connect(VcenterSettings(
        server=sim.host, port=sim.port, user=sim.username, password=Secret(sim.password),
        thumbprint=sim.thumbprint))
    try:
        for vm in inventory.find_vms(conn, names):
            if vm.power_state != "poweredOff":
                lab.power_off(conn, vm.moref)
    finally:
        conn.close()


def main() -> None:
    """Parse arguments, run the sides in interleaved rounds, print the comparison."""
    parser = guest_scan.common_parser(__doc__)
    parser.add_argument("--no-guest", action="store_true",
                        help="leave the Guest Operations side out (no disk/guest ratio)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--disk-workers", type=int, default=None,
                        help="scan.disk_workers for the disk side (default: the product's, "
                        "0: read in the scanning process)")
    parser.add_argument("--reads-only", metavar="VM", nargs="+",
                        help=argparse.SUPPRESS)     # internal: the reads-only run, as a child
    parser.add_argument("--floor", metavar="VM", nargs="+",
                        help=argparse.SUPPRESS)     # internal: the floor run, as a child
    args = parser.parse_args()
    if args.disk_workers is not None and args.disk_workers < 0:
        parser.error("--disk-workers must be 0 or more")
    if args.reads_only or args.floor:
        disk_reads_only(args.reads_only or args.floor, match=bool(args.floor))
        return
    vms = args.vms or args.jobs
    cli = str(Path(sys.executable).parent / "vsphere-av")
    if not simulator.binary_path().exists():
        sys.exit("build/vcsim is missing: run make vcsim")

    corpus = engine_bench.build_corpus(args.corpus_mb)
    engine_bench.corpus_stats(corpus)          # read once: every side starts from page cache

    # Work area on the corpus's file system so the trees can be hard links.
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=HERE / ".corpus") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        files, size, dups = guest_scan.build_tree(corpus, tree, min_size=args.min_kb * 1024)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_AV_")}
        template = work / "state-template"
        rules = guest_scan.import_rules(cli, args.rules, template, base_env)

        # VMs 0..n-1 stay on for the guest side, n..2n-1 are powered off for the disk side.
        # Their trees are in place before the simulator starts: it builds every disk then.
        guest_root = work / "guests"
        guest_names = [f"DC0_C0_RP0_VM{i}" for i in range(vms)]
        disk_names = [f"DC0_C0_RP0_VM{i}" for i in range(vms, 2 * vms)]
        per_vm = guest_scan.split_into_guests(tree, guest_root, guest_names)
        if guest_scan.split_into_guests(tree, guest_root, disk_names) != per_vm:
            sys.exit("the disk VMs' split differs from the guest VMs'")
        for name in guest_names + disk_names:
            (guest_root / name / "etc").mkdir(parents=True, exist_ok=True)
            (guest_root / name / "etc" / "fstab").write_text(FSTAB)
        started = time.monotonic()
        sim = simulator.start(guest_root=guest_root, hosts=1, vms=2 * vms, disks=True,
                              timeout=600.0)
        try:
            power_off(sim, disk_names)
            built = time.monotonic() - started
            config = work / "scan.toml"
            config.write_text(
                f'[scan]\nlinux_roots = {json.dumps(ROOTS)}\naction = "report"\n'
                f'fallback_action = ""\nper_host_limit = {args.jobs}\n'
                f"max_file_size = {64 * 1024 * 1024}\n"
                + ("" if args.disk_workers is None else
                   f"disk_workers = {args.disk_workers}\n"))
            workers = (ScanPolicy().disk_workers if args.disk_workers is None
                       else args.disk_workers)
            sim_env = {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
                       "VSPHERE_AV_GUEST_USER": sim.guest_user,
                       "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password,
                       "VSPHERE_AV_CONFIG": str(config)}
            print(f"tree: {files} files, {size / 1e6:.1f} MB (corpus {corpus}, files >= "
                  f"{args.min_kb} KB, {dups} duplicate contents left out); rules {rules}\n"
                  f"local: scan-files, {args.jobs} worker processes; guest: {vms} powered-on "
                  f"VMs, disk: {vms} powered-off VMs (ext4 on GPT in monolithicSparse VMDKs, "
                  f"built in {built:.1f} s), all on 1 host, {args.jobs} VMs scanned at once; "
                  f"files per VM {', '.join(f'{n}/{b / 1e6:.0f} MB' for n, b in per_vm)}; "
                  f"disk side: {workers or 'no'} disk-scan worker processes; all with the "
                  f"simulator on the same {os.cpu_count()} cores\n"
                  f"verdict cache on and empty, file and disk index empty, page cache warm; "
                  f"{args.repeat} interleaved rounds", flush=True)
            sides = ["local", "disk", "reads", "floor"] + ([] if args.no_guest else ["guest"])
            rounds = []
            for n in range(args.repeat):
                got: dict[str, dict] = {}
                for side in (sides if n % 2 == 0 else sides[::-1]):
                    env = guest_scan.fresh_state(template, work / side, base_env)
                    if side == "local":
                        got[side] = guest_scan.measure_local(cli, tree, args.jobs, env)
                    elif side in ("reads", "floor"):
                        got[side] = _measure_reads(disk_names, {**env, **sim_env}, sim,
                                                   floor=side == "floor")
                    else:
                        names = disk_names if side == "disk" else guest_names
                        got[side] = guest_scan.measure_scan(
                            [cli, "scan", "--via", side, "--full", "--json", *names],
                            {**env, **sim_env}, sim)
                        got[side]["complete"] = sum(
                            r["status"] in ("clean", "infected")
                            for r in got[side]["report"]["vms"])
                        got[side]["reasons"] = sorted({
                            r["reason"] for r in got[side].pop("report")["vms"]
                            if r["reason"]})
                for side in got.values():
                    side["mb_per_s"] = side["bytes"] / 1e6 / side["seconds"]
                got["disk/local"] = got["disk"]["mb_per_s"] / got["local"]["mb_per_s"]
                got["reads/local"] = got["reads"]["mb_per_s"] / got["local"]["mb_per_s"]
                got["floor/local"] = got["floor"]["mb_per_s"] / got["local"]["mb_per_s"]
                if "guest" in got:
                    got["disk/guest"] = got["disk"]["mb_per_s"] / got["guest"]["mb_per_s"]
                got["load"] = [round(x, 2) for x in os.getloadavg()]
                rounds.append(got)
                if not args.json:
                    print(_round_line(n + 1, got), flush=True)
        finally:
            sim.stop()

    figures = _figures(rounds, files=files, size=size, dups=dups, per_vm=per_vm, rules=rules,
                       jobs=args.jobs, vms=vms, min_kb=args.min_kb)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for name in ("local", "guest", "disk", "reads", "floor"):
        for r in rounds:
            side = r.get(name)
            if side is None:
                continue
            if side["files"] != files or side["errors"] or side["skipped"] or \
                    side.get("complete", vms) != vms:
                print(f"WARNING: {name} scanned {side['files']} of {files} files "
                      f"({side['errors']} errors, {side['skipped']} skipped, "
                      f"{side.get('complete', vms)} of {vms} VMs scanned completely"
                      f"{': ' + '; '.join(side['reasons']) if side.get('reasons') else ''})")
                break
    best = figures["best"]
    med = figures["median"]
    guest_part = (f", guest {best['guest']['mb_per_s']:.1f}" if "guest" in best else "")
    print(f"best MB/s: local {best['local']['mb_per_s']:.1f}{guest_part}, disk "
          f"{best['disk']['mb_per_s']:.1f}, disk reads only {best['reads']['mb_per_s']:.1f}, "
          f"disk floor {best['floor']['mb_per_s']:.1f}\n"
          f"disk/local per round {_span(rounds, 'disk/local')}, median {med['disk/local']:.2f} "
          f"(goal >= {GOAL_LOCAL}: {_met(med['disk/local'] >= GOAL_LOCAL)}); disk reads only "
          f"/ local median {med['reads/local']:.2f} (the reader's ceiling); disk floor / local "
          f"per round {_span(rounds, 'floor/local')}, median {med['floor/local']:.2f} (the "
          f"ceiling of disk/local on this machine)")
    if "disk/guest" in med:
        print(f"disk/guest per round {_span(rounds, 'disk/guest')}, median "
              f"{med['disk/guest']:.2f} (goal >= {GOAL_GUEST}: "
              f"{_met(med['disk/guest'] >= GOAL_GUEST)})")
    guest_ratio = f"{med['disk/guest']:.2f}" if "disk/guest" in med else "n/a"
    print(f"disk/local ratio {med['disk/local']:.2f}; disk/guest ratio {guest_ratio}")


def _measure_reads(names: list[str], env: dict[str, str], sim: simulator.Simulator, *,
                   floor: bool = False) -> dict:
    sim_cpu = guest_scan._cpu_seconds(sim.process.pid)
    wall, peak, cpu, rep = guest_scan._measure(
        [sys.executable, __file__, "--floor" if floor else "--reads-only", *names], env)
    return {"seconds": float(rep["seconds"]), "wall": wall, "cpu": cpu, "peak_rss": peak,
            "files": rep["files"], "bytes": rep["bytes"], "errors": 0, "skipped": 0,
            "simulator_cpu": guest_scan._cpu_seconds(sim.process.pid) - sim_cpu}


def _figures(rounds: list[dict], *, files: int, size: int, dups: int,
             per_vm: list[tuple[int, int]], rules: str, jobs: int, vms: int,
             min_kb: int) -> dict:
    names = [k for k in ("local", "guest", "disk", "reads", "floor") if k in rounds[0]]
    ratios = [k for k in ("disk/local", "disk/guest", "reads/local", "floor/local")
              if k in rounds[0]]
    median = {k: round(statistics.median(r[k] for r in rounds), 3) for k in ratios}
    figures = {
        "tree": {"files": files, "mb": round(size / 1e6, 1), "min_kb": min_kb,
                 "duplicates_dropped": dups,
                 "per_vm": [{"files": n, "mb": round(b / 1e6, 1)} for n, b in per_vm]},
        "rules": rules, "jobs": jobs, "vms_per_side": vms, "rounds": rounds,
        "best": {k: max((r[k] for r in rounds), key=lambda s: s["mb_per_s"]) for k in names},
        "median": median,
        "goals": {"disk/local": GOAL_LOCAL, "disk/guest": GOAL_GUEST},
    }
    figures["meets_goals"] = all(median[k] >= goal for k, goal in figures["goals"].items()
                                 if k in median)
    return figures


def _span(rounds: list[dict], key: str) -> str:
    values = [r[key] for r in rounds]
    return f"{min(values):.2f}-{max(values):.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _round_line(n: int, got: dict) -> str:
    def side(name: str) -> str:
        s = got[name]
        sim = f" (+ simulator {s['simulator_cpu']:4.1f} s)" if "simulator_cpu" in s else ""
        return (f"{name} {s['seconds']:6.2f} s {s['mb_per_s']:6.1f} MB/s {s['files']} files "
                f"cpu {s['cpu']:5.1f} s{sim} peak {s['peak_rss'] / 2**20:4.0f} MiB")

    lines = [f"round {n}: {side('local')}"]
    lines += [f"         {side(name)}" for name in ("guest", "disk", "reads", "floor")
              if name in got]
    ratios = [f"{k} {got[k]:.2f}" for k in ("disk/local", "disk/guest", "reads/local",
                                            "floor/local") if k in got]
    load = "/".join(f"{x:.1f}" for x in got["load"])
    lines.append(f"         {'; '.join(ratios)}; load average {load} (1/5/15 min)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
