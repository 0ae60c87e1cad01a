"""Benchmark: the same file tree scanned through Guest Operations and locally with scan-files.

Run by ``make bench-guest-scan`` (or ``.venv/bin/python bench/guest_scan.py --corpus-mb 200``).
Calls ``vsphere-av scan-files`` and ``vsphere-av scan`` as subprocesses against the bundled
simulator; reuses ``bench/engine.py``'s corpus builder (copies of system files).

1. Builds (or reuses) the corpus ``bench/.corpus/<size>MB`` and reads it once (page cache).
2. Local: ``vsphere-av scan-files --jobs JOBS`` with a fresh state directory (cold cache).
3. Guest: the simulator with one ESXi host and VMS VMs; the corpus is split round-robin over
   the VMs' guest file systems (hard links, so the bytes are the same files), and
   ``vsphere-av scan --all --full`` streams every file out of the guests through
   ``InitiateFileTransferFromGuest`` + HTTPS into the engine (fresh state, cold cache). VMs
   of one host are scanned at most ``per_host_limit`` at a time, as in production.
Both use the same signature set (imported before timing) and the same cores. Each side is
timed by its own report (engine opened to last verdict), not by interpreter start-up.
Prints files, MB, MB/s of both and the ratio guest / local (goal: >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import engine as engine_bench  # noqa: E402  (bench/engine.py: corpus builder)

from vsphere_av import simulator  # noqa: E402

GOAL = 0.7


def split_into_guests(corpus: Path, guest_root: Path, vm_names: list[str],
                      min_size: int = 0) -> tuple[int, int]:
    """Hard-link corpus files (>= min_size) round-robin into each VM's /data; (files, bytes)."""
    files = size = 0
    index = 0
    for dirpath, dirnames, filenames in os.walk(corpus):
        dirnames.sort()
        for name in sorted(filenames):
            src = Path(dirpath) / name
            if src.stat().st_size < min_size:
                continue
            rel = src.relative_to(corpus)
            vm = vm_names[index % len(vm_names)]
            index += 1
            dst = (guest_root / vm / "data" / rel) if vm != "." else guest_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            files += 1
            size += src.stat().st_size
    return files, size


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a command; (wall seconds, stdout). Exit 1 (detections) is not a failure."""
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, proc.stdout


def main() -> None:
    """Parse arguments, run both sides, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int,
                        default=int(os.environ.get("BENCH_CORPUS_MB", "200")),
                        help="corpus size in MB (env BENCH_CORPUS_MB, default 200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="local scan-files processes (default: cores)")
    parser.add_argument("--vms", type=int, default=0,
                        help="VMs the tree is split over (default: as many as jobs)")
    default_rules = os.environ.get("BENCH_RULES", str(engine_bench.DEFAULT_RULES))
    parser.add_argument("--rules", type=Path, default=Path(default_rules),
                        help="YARA rule set imported on both sides (default: signature-base)")
    parser.add_argument("--min-kb", type=int, default=0,
                        help="only files of at least this size (shows the per-file overhead)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
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
        files, size = split_into_guests(corpus, tree, ["."], min_size=args.min_kb * 1024)
        print(f"tree: {files} files, {size / 1e6:.0f} MB (from {corpus}, files >= "
              f"{args.min_kb} KB); local jobs {args.jobs}; guest VMs {vms}; rules "
              f"{args.rules if args.rules.exists() else 'built-in'}", flush=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_AV_")}

        def state_env(name: str) -> dict[str, str]:
            env = {**base_env, "VSPHERE_AV_STATE_DIR": str(work / name)}
            if args.rules.exists():
                subprocess.run([cli, "signatures", "import", "--skip-invalid", str(args.rules)],
                               check=True, env=env, capture_output=True)
            return env

        local_env = state_env("local")
        _, out = run([cli, "scan-files", "--json", "--jobs", str(args.jobs), str(tree)],
                     local_env)
        local = json.loads(out)
        local_s = float(local["seconds"])

        guest_root = work / "guests"
        sim = simulator.start(guest_root=guest_root, hosts=1, vms=vms)
        try:
            names = [f"DC0_C0_RP0_VM{i}" for i in range(vms)]
            g_files, g_size = split_into_guests(tree, guest_root, names)
            config = work / "guest.toml"
            config.write_text(
                '[scan]\nlinux_roots = ["/data"]\naction = "report"\nfallback_action = ""\n'
                f"per_host_limit = {max(4, vms)}\nmax_file_size = {64 * 1024 * 1024}\n")
            guest_env = {**state_env("guest"), "VSPHERE_AV_SERVER": sim.url,
                         "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
                         "VSPHERE_AV_GUEST_USER": sim.guest_user,
                         "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password,
                         "VSPHERE_AV_CONFIG": str(config)}
            _, out = run([cli, "scan", "--all", "--full", "--json"], guest_env)
        finally:
            sim.stop()
        guest = json.loads(out)
        summary = guest["summary"]
        guest_s = float(summary["duration"])

    local_mbs = size / 1e6 / local_s
    guest_mbs = g_size / 1e6 / guest_s
    ratio = guest_mbs / local_mbs
    figures = {
        "files": files, "mb": round(size / 1e6, 1), "min_kb": args.min_kb,
        "local": {"seconds": round(local_s, 2), "mb_per_s": round(local_mbs, 1),
                  "files": local["files"], "jobs": args.jobs},
        "guest": {"seconds": round(guest_s, 2), "mb_per_s": round(guest_mbs, 1),
                  "files_scanned": summary["scanned"], "skipped": summary["skipped_files"],
                  "errors": summary["errors"], "vms": vms,
                  "peak_per_host": guest["peak_per_host"], "guest_files": g_files},
        "ratio": round(ratio, 3), "goal": GOAL, "meets_goal": ratio >= GOAL,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{'path':<34}{'seconds':>9}{'files':>8}{'MB/s':>9}")
    print(f"{'local scan-files -j ' + str(args.jobs):<34}{local_s:>9.2f}{local['files']:>8}"
          f"{local_mbs:>9.1f}")
    print(f"{'guest operations, ' + str(vms) + ' VM(s) / 1 host':<34}{guest_s:>9.2f}"
          f"{summary['scanned']:>8}{guest_mbs:>9.1f}")
    print(f"ratio guest / local: {ratio:.2f} (goal >= {GOAL}: "
          f"{'met' if ratio >= GOAL else 'NOT met'}); guest skipped {summary['skipped_files']}, "
          f"errors {summary['errors']}, peak scans per host {guest['peak_per_host']}")


if __name__ == "__main__":
    main()
