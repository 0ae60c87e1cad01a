"""Benchmark: the same file tree scanned through Guest Operations and locally with scan-files.

Run by ``make bench-guest-scan`` (or ``.venv/bin/python bench/guest_scan.py --corpus-mb 200``).
Calls ``vsphere-av scan-files`` and ``vsphere-av scan`` as subprocesses against the bundled
simulator; reuses ``bench/engine.py``'s corpus builder (copies of system files) and its
process-tree sampler (peak RSS, CPU time).

What is compared, and how it is kept fair:
  * Same files: the tree is the corpus with duplicate contents dropped (so the verdict cache,
    on and empty on both sides as in production, can never answer for either side); the
    guests' ``/data`` trees are hard links to the very same inodes, split so that every VM
    holds about the same bytes (local workers share files out as they go; a VM cannot).
  * Same rules: one signature import, copied into a fresh state directory for every run
    (cold verdict cache, empty file index, so both sides read and match every byte).
  * Same cores: the local side runs JOBS worker processes; the guest side scans JOBS VMs at
    once (one scan thread per VM plus its transfer thread; one transfer per VM at a time).
    The simulator that plays vCenter and the ESXi host runs on the same cores and its CPU
    time is reported (a real ESXi host would serve the bytes with its own CPUs).
  * Page cache warm for both (the corpus is read once before the first run).
  * Timing: each side's own report (engine opened to last verdict: rule loading, pool start,
    vCenter login and listing included) and the process wall time; several interleaved
    rounds (the machine is shared), every round printed, the best and the median compared.
Prints files, MB, rules, parallelism, MB/s, CPU seconds and peak RSS of both, and the ratio
guest / local (goal: >= 0.7).

A third run, "transfers only", is the ceiling of any scanner that reads files through Guest
Operations on this machine: the same VMs, one process per VM (no GIL shared between VMs),
listing with ListFilesInGuest and reading every file with InitiateFileTransferFromGuest +
HTTPS GET through the product's own ``GuestFiles``, the bytes thrown away: no engine, no
state, no audit. Its ratio against local is printed too; a guest ratio cannot exceed it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import engine as engine_bench  # noqa: E402  (bench/engine.py: corpus builder, sampler)

from vsphere_av.lab import simulator  # noqa: E402

GOAL = 0.7


def build_tree(corpus: Path, tree: Path, *, min_size: int = 0) -> tuple[int, int, int]:
    """Hard-link corpus files (>= min_size, first copy of each content) into ``tree``.

    Returns (files, bytes, duplicate contents left out).
    """
    files = size = dups = 0
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(corpus):
        dirnames.sort()
        for name in sorted(filenames):
            src = Path(dirpath) / name
            length = src.stat().st_size
            if length < min_size:
                continue
            digest = hashlib.sha256()
            with open(src, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() in seen:
                dups += 1
                continue
            seen.add(digest.hexdigest())
            _link(src, tree / src.relative_to(corpus))
            files += 1
            size += length
    return files, size, dups


def split_into_guests(tree: Path, guest_root: Path, vm_names: list[str],
                      ) -> list[tuple[int, int]]:
    """Hard-link the tree's files into the VMs' /data, balanced by bytes; (files, bytes) per VM.

    Largest files first, each to the VM with the fewest bytes so far (then the fewest
    files): a round-robin split by count can leave one VM with twice the bytes of another,
    and the slower VM alone decides the guest side's time while a core idles.
    """
    files: list[tuple[int, Path]] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        files.extend(((Path(dirpath) / n).stat().st_size, Path(dirpath) / n)
                     for n in sorted(filenames))
    load = [[0, 0] for _ in vm_names]             # bytes, files
    for size, src in sorted(files, key=lambda f: (-f[0], str(f[1]))):
        i = min(range(len(vm_names)), key=lambda k: (load[k][0], load[k][1]))
        _link(src, guest_root / vm_names[i] / "data" / src.relative_to(tree))
        load[i][0] += size
        load[i][1] += 1
    return [(n, b) for b, n in load]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one running process (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_vm(name: str) -> tuple[int, int]:
    """Walk one VM's scan roots and read every file through Guest Operations; (files, bytes)."""
    from vsphere_av import config
    from vsphere_av.vsphere import connection, inventory
    from vsphere_av.vsphere.guest import GuestFiles

    settings = config.load()
    conn = connection.connect(settings.vcenter)
    try:
        (vm,) = inventory.find_vms(conn, [name])
        user, password = settings.guest.for_vm(vm_name=vm.name)
        guest = GuestFiles(connection=conn, vm=vm, user=user, password=password)
        roots = settings.scan.windows_roots if vm.is_windows else settings.scan.linux_roots
        files = size = 0
        for entry in guest.walk(roots):
            with guest.open_download(entry.path) as download:
                for chunk in download.chunks():
                    size += len(chunk)
            files += 1
        return files, size
    finally:
        conn.close()


def read_in_processes(names: list[str], read_vm: Callable[[str], tuple[int, int]]) -> None:
    """A ceiling run (as a child): ``read_vm`` for each VM, one process per VM, JSON on stdout.

    The caller imports what ``read_vm`` needs first, before the clock starts and before
    forking, as the CLI has before it scans.
    """
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(len(names)) as pool:
        got = pool.map(read_vm, names)
    print(json.dumps({"seconds": time.monotonic() - started, "files": sum(f for f, _ in got),
                      "bytes": sum(b for _, b in got)}))


def transfers_only(names: list[str]) -> None:
    """The "transfers only" side (run as a child): one process per VM, JSON on stdout."""
    from vsphere_av import config  # noqa: F401
    from vsphere_av.vsphere import connection, guest, inventory  # noqa: F401
    read_in_processes(names, _read_vm)


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, float, dict]:
    """Run one side; (wall seconds, peak RSS bytes, CPU seconds, its JSON report)."""
    wall, peak, out = engine_bench.run_measured(cmd, env)
    return wall, peak, engine_bench.LAST_CPU[0], json.loads(out)


def import_rules(cli: str, rules: Path, state: Path, env: dict[str, str]) -> str:
    """Import the rule set (built-in rules when it is missing) into ``state``; its name."""
    env = {**env, "VSPHERE_AV_STATE_DIR": str(state)}
    if not rules.exists():
        subprocess.run([cli, "signatures", "list"], check=True, capture_output=True, env=env)
        return "built-in"
    count = len(engine_bench.rule_files(rules)) if rules.is_dir() else 1
    subprocess.run([cli, "signatures", "import", "--skip-invalid", str(rules)], check=True,
                   env=env, capture_output=True)
    return f"{rules} ({count} files)"


def fresh_state(template: Path, state: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with a state directory copied from ``template`` (rules imported, verdict cache
    and file index empty)."""
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(template, state)
    return {**env, "VSPHERE_AV_STATE_DIR": str(state)}


def measure_local(cli: str, tree: Path, jobs: int, env: dict[str, str]) -> dict:
    """``scan-files`` over ``tree``: its own seconds, wall, CPU, peak RSS and counts."""
    wall, peak, cpu, rep = _measure([cli, "scan-files", "--json", "--jobs", str(jobs), str(tree)],
                                    env)
    return {"seconds": float(rep["seconds"]), "wall": wall, "cpu": cpu, "peak_rss": peak,
            "files": rep["files"], "bytes": rep["bytes"], "cached": rep["cached"],
            "errors": len(rep["errors"]), "skipped": len(rep["skipped"])}


def measure_scan(cmd: list[str], env: dict[str, str], sim: simulator.Simulator) -> dict:
    """One ``vsphere-av scan ... --json`` run: its own duration, wall, CPU, peak RSS and
    counts, and the CPU seconds the simulator spent meanwhile."""
    sim_cpu = _cpu_seconds(sim.process.pid)
    wall, peak, cpu, rep = _measure(cmd, env)
    s = rep["summary"]
    return {"seconds": float(s["duration"]), "wall": wall, "cpu": cpu, "peak_rss": peak,
            "files": s["scanned"], "bytes": s["bytes"], "errors": s["errors"],
            "skipped": s["skipped_files"],
            "simulator_cpu": _cpu_seconds(sim.process.pid) - sim_cpu,
            "peak_per_host": rep["peak_per_host"], "report": rep}


def common_parser(doc: str) -> argparse.ArgumentParser:
    """The options every scan benchmark takes (also ``bench/disk_scan.py``'s)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int,
                        default=int(os.environ.get("BENCH_CORPUS_MB", "200")),
                        help="corpus size in MB (env BENCH_CORPUS_MB, default 200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="local scan-files processes = VMs scanned at once (default: cores)")
    parser.add_argument("--vms", type=int, default=0,
                        help="VMs the tree is split over, per side (default: as many as jobs)")
    default_rules = os.environ.get("BENCH_RULES", str(engine_bench.DEFAULT_RULES))
    parser.add_argument("--rules", type=Path, default=Path(default_rules),
                        help="YARA rule set imported on every side (default: signature-base)")
    parser.add_argument("--min-kb", type=int, default=0,
                        help="only files of at least this size (shows the per-file overhead)")
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", "3")),
                        help="interleaved rounds (env BENCH_REPEAT, default 3)")
    return parser


def main() -> None:
    """Parse arguments, run both sides in interleaved rounds, print the comparison."""
    parser = common_parser(__doc__)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--transfers-only", metavar="VM", nargs="+",
                        help=argparse.SUPPRESS)     # internal: the ceiling run, as a child
    args = parser.parse_args()
    if args.transfers_only:
        transfers_only(args.transfers_only)
        return
    vms = args.vms or args.jobs
    cli = str(Path(sys.executable).parent / "vsphere-av")
    if not simulator.binary_path().exists():
        sys.exit("build/vcsim is missing: run make vcsim")

    corpus = engine_bench.build_corpus(args.corpus_mb)
    engine_bench.corpus_stats(corpus)          # read once: both sides start from page cache

    # Work area on the corpus's file system so the trees can be hard links.
    with tempfile.TemporaryDirectory(prefix="bench-guest-", dir=HERE / ".corpus") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        files, size, dups = build_tree(corpus, tree, min_size=args.min_kb * 1024)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_AV_")}
        template = work / "state-template"
        rules = import_rules(cli, args.rules, template, base_env)

        guest_root = work / "guests"
        sim = simulator.start(guest_root=guest_root, hosts=1, vms=vms)
        try:
            names = [f"DC0_C0_RP0_VM{i}" for i in range(vms)]
            per_vm = split_into_guests(tree, guest_root, names)
            g_files, g_size = sum(n for n, _ in per_vm), sum(b for _, b in per_vm)
            config = work / "guest.toml"
            config.write_text(
                '[scan]\nlinux_roots = ["/data"]\naction = "report"\nfallback_action = ""\n'
                f"per_host_limit = {args.jobs}\nmax_file_size = {64 * 1024 * 1024}\n")
            sim_env = {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
                       "VSPHERE_AV_GUEST_USER": sim.guest_user,
                       "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password,
                       "VSPHERE_AV_CONFIG": str(config)}
            print(f"tree: {files} files, {size / 1e6:.1f} MB (corpus {corpus}, files >= "
                  f"{args.min_kb} KB, {dups} duplicate contents left out); rules {rules}\n"
                  f"local: scan-files, {args.jobs} worker processes; guest: {vms} VMs on 1 "
                  f"host, {args.jobs} scanned at once (scan thread + transfer thread each, "
                  f"1 transfer per VM; files per VM "
                  f"{', '.join(f'{n}/{b / 1e6:.0f} MB' for n, b in per_vm)}), 1 process + "
                  f"the simulator on the same "
                  f"{os.cpu_count()} cores\nverdict cache on and empty, file index empty, "
                  f"page cache warm; {args.repeat} interleaved rounds", flush=True)
            rounds = []
            for n in range(args.repeat):
                sides = (["local", "guest", "transfers"] if n % 2 == 0
                         else ["transfers", "guest", "local"])
                got: dict[str, dict] = {}
                for side in sides:
                    if side == "local":
                        got["local"] = measure_local(cli, tree, args.jobs,
                                                     fresh_state(template, work / "local",
                                                                 base_env))
                    elif side == "transfers":
                        sim_cpu = _cpu_seconds(sim.process.pid)
                        wall, peak, cpu, rep = _measure(
                            [sys.executable, __file__, "--transfers-only", *names],
                            {**fresh_state(template, work / "transfers", base_env), **sim_env})
                        got["transfers"] = {"seconds": float(rep["seconds"]), "wall": wall,
                                            "cpu": cpu, "peak_rss": peak, "files": rep["files"],
                                            "bytes": rep["bytes"], "errors": 0, "skipped": 0,
                                            "simulator_cpu": _cpu_seconds(sim.process.pid)
                                            - sim_cpu}
                    else:
                        got["guest"] = measure_scan(
                            [cli, "scan", "--all", "--full", "--json"],
                            {**fresh_state(template, work / "guest", base_env), **sim_env}, sim)
                        del got["guest"]["report"]
                for side in got.values():
                    side["mb_per_s"] = side["bytes"] / 1e6 / side["seconds"]
                got["ratio"] = got["guest"]["mb_per_s"] / got["local"]["mb_per_s"]
                got["ceiling"] = got["transfers"]["mb_per_s"] / got["local"]["mb_per_s"]
                rounds.append(got)
                if not args.json:
                    print(_round_line(n + 1, got), flush=True)
        finally:
            sim.stop()

    ratios = [r["ratio"] for r in rounds]
    best = {side: max(rounds, key=lambda r, s=side: r[s]["mb_per_s"])[side]
            for side in ("local", "guest", "transfers")}
    figures = {
        "tree": {"files": files, "mb": round(size / 1e6, 1), "min_kb": args.min_kb,
                 "duplicates_dropped": dups, "guest_files": g_files, "guest_mb":
                 round(g_size / 1e6, 1), "per_vm": [{"files": n, "mb": round(b / 1e6, 1)}
                                                    for n, b in per_vm]},
        "rules": rules, "jobs": args.jobs, "vms": vms, "rounds": rounds,
        "best": best, "ratio_of_best": round(best["guest"]["mb_per_s"] /
                                             best["local"]["mb_per_s"], 3),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "goal": GOAL,
        "ceiling_of_best": round(best["transfers"]["mb_per_s"] / best["local"]["mb_per_s"], 3),
        "ceiling_median": round(statistics.median(r["ceiling"] for r in rounds), 3),
    }
    figures["meets_goal"] = figures["ratio_median"] >= GOAL
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for name, side in best.items():
        if side["files"] != files or side["errors"] or side["skipped"]:
            print(f"WARNING: {name} scanned {side['files']} of {files} files "
                  f"({side['errors']} errors, {side['skipped']} skipped)")
    print(f"best local {best['local']['mb_per_s']:.1f} MB/s, best guest "
          f"{best['guest']['mb_per_s']:.1f} MB/s: ratio {figures['ratio_of_best']:.2f}; "
          f"per round {figures['ratio_range'][0]:.2f}-{figures['ratio_range'][1]:.2f}, median "
          f"{figures['ratio_median']:.2f} (goal >= {GOAL}: "
          f"{'met' if figures['meets_goal'] else 'NOT met'})\n"
          f"ceiling: transfers only (no scan, one process per VM) best "
          f"{best['transfers']['mb_per_s']:.1f} MB/s = {figures['ceiling_of_best']:.2f} x local, "
          f"median {figures['ceiling_median']:.2f}; the guest scan reaches "
          f"{best['guest']['mb_per_s'] / best['transfers']['mb_per_s']:.2f} of it")


def _round_line(n: int, got: dict) -> str:
    loc, gst, trn = got["local"], got["guest"], got["transfers"]
    return (f"round {n}: local {loc['seconds']:6.2f} s {loc['mb_per_s']:6.1f} MB/s "
            f"{loc['files']} files cpu {loc['cpu']:5.1f} s peak {loc['peak_rss'] / 2**20:4.0f} MiB"
            f" | guest {gst['seconds']:6.2f} s {gst['mb_per_s']:6.1f} MB/s {gst['files']} files "
            f"cpu {gst['cpu']:5.1f} s (+ simulator {gst['simulator_cpu']:4.1f} s) peak "
            f"{gst['peak_rss'] / 2**20:4.0f} MiB peak/host {max(gst['peak_per_host'].values())}"
            f" | ratio {got['ratio']:.2f}\n         transfers only {trn['seconds']:6.2f} s "
            f"{trn['mb_per_s']:6.1f} MB/s {trn['files']} files cpu {trn['cpu']:5.1f} s "
            f"(+ simulator {trn['simulator_cpu']:4.1f} s) | ceiling {got['ceiling']:.2f}")


if __name__ == "__main__":
    main()
