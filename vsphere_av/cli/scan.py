"""``vsphere-av scan``, ``status`` and ``detections``: scan VMs, show their protection and
what was found.

Registered by ``cli/__init__.py``; calls the application (``app``) and, for the
hosts' list in ``status``, ``vsphere.inventory``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from vsphere_av import errors
from vsphere_av.cli.common import app_from, print_json, print_table, settings_from


def _scan_progress(enabled: bool) -> Any:
    """A rich progress display on a terminal (stderr), else a no-op context."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"),
                    TextColumn("{task.fields[files]} files, {task.fields[mb]:.1f} MB"),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


@click.command("scan")
@click.argument("vms", nargs=-1)
@click.option("--all", "all_vms", is_flag=True,
              help="Scan every VM (powered-off ones through their disks, unless --via guest).")
@click.option("--full", is_flag=True, help="Read every file, even unchanged ones.")
@click.option("--via", default=None, metavar="auto|disk|guest",
              help="Read files through the VMs' disks or Guest Operations (default: scan.via, "
                   "auto: disk for VMs off, without guest credentials or tools).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def scan_cmd(ctx: click.Context, vms: tuple[str, ...], all_vms: bool, full: bool,
             via: str | None, as_json: bool) -> None:
    """Scan VMs' files (Guest Operations or their virtual disks) and remediate detections."""
    if bool(vms) == all_vms:
        raise errors.ConfigError("name one or more VMs, or use --all (not both)")
    from vsphere_av.config import SCAN_VIA
    if via is not None and via not in SCAN_VIA:
        raise errors.ConfigError(f"--via {via!r}: must be one of {', '.join(SCAN_VIA)}")
    # controller (issue 5): with `vsphere-av serve` running, the work is queued there (same
    # storm limits) instead of scanning beside it; None when no controller is running. The
    # controller reads the disks of powered-off VMs (scan.via auto or disk); an explicit
    # --via disk (a running VM under a snapshot) scans here.
    from vsphere_av.app import hand_over_scan
    handed = None if via == "disk" else hand_over_scan(settings_from(ctx), names=vms,
                                                       all_vms=all_vms, full=full, via=via)
    app = app_from(ctx)
    show = not as_json and sys.stderr.isatty()
    with _scan_progress(show) as progress:
        tasks: dict[str, Any] = {}

        def on_start(selected: list[Any]) -> None:
            if progress is not None:
                for vm in selected:
                    tasks[vm.name] = progress.add_task(vm.name, files=0, mb=0.0)

        def on_progress(event: Any) -> None:
            if progress is not None and event.vm in tasks:
                progress.update(tasks[event.vm], files=event.files, mb=event.bytes / 1e6,
                                description=f"{event.vm}" + (" done" if event.done else ""))

        report = handed or app.scan(names=vms, all_vms=all_vms, full=full,
                                    on_progress=on_progress, on_start=on_start, via=via)
    if as_json:
        print_json(report.as_dict(files_of=app.store.scan_files))
    else:
        rows = [{"vm": r.vm, "host": r.host, "via": r.via, "status": r.status,
                 "scanned": r.scanned, "unchanged": r.unchanged, "skipped": r.skipped,
                 "incomplete": r.incomplete, "detections": len(r.found), "reason": r.reason}
                for r in report.results]
        print_table(rows, ["vm", "host", "via", "status", "scanned", "unchanged", "skipped",
                           "incomplete", "detections", "reason"],
                    title=f"scan (signature version {report.signature_version})")
        for r in report.results:
            for u in r.files:
                click.echo(f"{r.vm}: {u['kind']}: {u['path']}: {u['reason']}")
            if len(r.files) < r.incomplete + r.skipped_by_policy:
                click.echo(f"{r.vm}: ... {r.incomplete + r.skipped_by_policy - len(r.files)} "
                           f"more: vsphere-av scan --json or status --json lists them all")
            for f in r.found:
                member = f" [{f.member}]" if f.member else ""
                click.echo(f"{r.vm}: {f.path}{member}: {f.threat} -> {f.action}"
                           + (f" (quarantine id {f.quarantine_id})" if f.quarantine_id else "")
                           + (f" ({f.detail})" if f.detail else ""))
        s = report.summary()
        click.echo(f"{s['vms']} VM(s): {s['scanned']} scanned, {s['unchanged']} unchanged, "
                   f"{s['skipped_files']} skipped, {s['incomplete_files']} incomplete, "
                   f"{s['detections']} detection(s) in {s['duration']:.1f}s")
    ctx.exit(report.exit_code())


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every VM's protection state: protected, stale, infected, unprotected, unreachable."""
    app = app_from(ctx)
    rows = app.status()
    # controller (issue 5): per-host queues and scans, and which VMs are network-isolated
    from vsphere_av.app import controller_status
    from vsphere_av.vsphere import inventory

    ctl = controller_status(app.settings, read_hosts=(
        (lambda: inventory.list_hosts(app.connection)) if app.settings.vcenter.server else None))
    isolated = set(ctl["isolated"])
    for row in rows:
        row["isolated"] = row["moref"] in isolated
    if as_json:
        print_json({"vms": rows, "hosts": ctl["hosts"]})
        return
    print_table(rows,
                ["name", "moref", "host", "state", "reason", "last_scan", "signature_version"],
                title="protection status")


@click.command("detections")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def detections_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every detection found by guest scans and what was done about it."""
    rows = app_from(ctx).detections()
    if as_json:
        print_json({"detections": rows})
        return
    print_table(rows, ["time", "vm", "path", "threat", "sha256", "action"], title="detections")
