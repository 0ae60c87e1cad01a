"""Command line: parse, validate, call the application, print. Nothing else lives here.

Exit codes (as clamscan and yara): 0 clean / success, 1 something detected, 2 error.
Every ``errors.VsphereAvError`` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from vsphere_av import errors

EXIT_CLEAN = 0
EXIT_DETECTED = 1
EXIT_ERROR = 2


def fail(message: str) -> NoReturn:
    """Print one error line and exit 2."""
    click.echo(f"vsphere-av: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def shown(name: str) -> str:
    """A file name safe to print on a terminal: bytes that are not UTF-8 and control
    characters (ESC would drive the terminal) as ``\\xNN`` escapes."""
    from vsphere_av.engine.matcher import utf8_name

    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in utf8_name(name))


def print_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str = "") -> None:
    """Print rows as a table for people (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    # On a terminal fit its width; in a pipe or a log never cut a VM name or a path.
    console = Console() if sys.stdout.isatty() else Console(width=400)
    console.print(table)


class _Group(click.Group):
    """Turns product errors into one line and exit 2, whatever the command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.VsphereAvError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted")


@click.group(cls=_Group)
@click.option("--config", "config_file", envvar="VSPHERE_AV_CONFIG",
              type=click.Path(dir_okay=False),
              help="TOML settings file (or VSPHERE_AV_CONFIG).")
@click.option("--insecure", is_flag=True, default=False,
              help="Skip TLS verification of vCenter and ESXi (or VSPHERE_AV_INSECURE=1).")
@click.version_option(package_name="vsphere-av")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, insecure: bool) -> None:
    """Agentless antivirus for VMware vSphere."""
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file
    ctx.obj["insecure"] = insecure


def settings_from(ctx: click.Context) -> Any:
    """Load settings once per command from --config / environment."""
    from vsphere_av import config

    root = ctx.find_root()
    if "settings" not in root.obj:
        root.obj["settings"] = config.load(
            config_file=root.obj.get("config_file"), insecure=root.obj.get("insecure", False)
        )
    return root.obj["settings"]


Command = Callable[..., Any]

# --- simulator commands (vcsim) ---


@main.command("vcsim")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT (port 0: a free port).")
@click.option("--datacenters", type=int, default=1, show_default=True,
              help="Number of datacenters.")
@click.option("--clusters", type=int, default=1, show_default=True, help="Clusters per datacenter.")
@click.option("--hosts", type=int, default=3, show_default=True, help="Hosts per cluster.")
@click.option("--vms", type=int, default=2, show_default=True, help="VMs per cluster.")
@click.option("--username", default="user", show_default=True, help="vCenter login user.")
@click.option("--password", default="pass", show_default=True, help="vCenter login password.")
@click.option("--guest-root", type=click.Path(file_okay=False), default=None,
              help="One guest file tree per VM (<root>/<VM name>/); default: a temporary one.")
@click.option("--guest-user", default="root", show_default=True,
              help="The guest account every VM accepts.")
@click.option("--guest-password", default="vmware", show_default=True, help="Its password.")
@click.option("--disks", is_flag=True, default=False,
              help="Give every VM a real disk image built from its guest tree.")
def vcsim_command(listen: str, datacenters: int, clusters: int, hosts: int, vms: int,
                  username: str, password: str, guest_root: str | None, guest_user: str,
                  guest_password: str, disks: bool) -> None:
    """Run the bundled vSphere simulator in the foreground (first line: the SDK URL)."""
    from pathlib import Path

    from vsphere_av.lab import simulator

    argv = simulator.command_line(
        listen=listen, datacenters=datacenters, clusters=clusters, hosts=hosts, vms=vms,
        username=username, password=password,
        guest_root=Path(guest_root) if guest_root else None,
        guest_user=guest_user, guest_password=guest_password, disks=disks,
    )
    sys.stdout.flush()
    simulator.exec_foreground(argv)


# --- engine commands (signatures, scan-files, engine serve) ---

@main.group("signatures")
def signatures_group() -> None:
    """Signature versions: import, list, activate, roll back."""


def _signature_store(ctx: click.Context) -> Any:
    from vsphere_av.engine import Engine

    return Engine.open(settings_from(ctx), use_cache=False, **_signature_audit(ctx)).store


def _signature_audit(ctx: click.Context) -> dict[str, Any]:
    """Where the signature store records changes: the audit log, and who acts."""
    from vsphere_av.store.audit import AuditOnUse, current_actor

    state_dir = settings_from(ctx).state_dir
    return {"audit": AuditOnUse(state_dir), "actor": current_actor(state_dir=state_dir)}


@signatures_group.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--skip-invalid", is_flag=True, help="Import the valid files and list the others.")
@click.option("--no-activate", is_flag=True, help="Store the new version without activating it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def signatures_import(ctx: click.Context, path: str, skip_invalid: bool, no_activate: bool,
                      as_json: bool) -> None:
    """Compile and check a bundle (directory or .tar.gz) and store it as the next version."""
    from pathlib import Path

    store = _signature_store(ctx)
    result = store.import_bundle(Path(path), skip_invalid=skip_invalid, activate=not no_activate)
    if as_json:
        print_json({**result.info.as_dict(), "skipped": list(result.skipped)})
        return
    info = result.info
    state = "active" if info.active else "stored, not active"
    click.echo(f"imported version {info.version} ({state}): {info.rule_count} rules, "
               f"{info.hash_entries} hashes, hash {info.content_hash[:16]}")
    for problem in result.skipped:
        click.echo(f"skipped: {problem}")


@signatures_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def signatures_list(ctx: click.Context, as_json: bool) -> None:
    """Show every stored signature version."""
    infos = _signature_store(ctx).infos()
    if as_json:
        print_json([i.as_dict() for i in infos])
        return
    print_table([{"version": i.version, "active": "*" if i.active else "",
                  "rules": i.rule_count, "hashes": i.hash_entries,
                  "hash": i.content_hash[:16], "imported at": i.imported_at,
                  "source": i.source} for i in infos],
                ["version", "active", "rules", "hashes", "hash", "imported at", "source"],
                title="signature versions")


@signatures_group.command("activate")
@click.argument("version", type=int)
@click.pass_context
def signatures_activate(ctx: click.Context, version: int) -> None:
    """Make VERSION the active signature version."""
    info = _signature_store(ctx).activate(version)
    click.echo(f"active signature version: {info.version} ({info.rule_count} rules)")


@signatures_group.command("rollback")
@click.pass_context
def signatures_rollback(ctx: click.Context) -> None:
    """Go back to the previously active signature version."""
    info = _signature_store(ctx).rollback()
    click.echo(f"rolled back; active signature version: {info.version} ({info.rule_count} rules)")


@main.command("scan-files")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the verdict cache.")
@click.pass_context
def scan_files(ctx: click.Context, paths: tuple[str, ...], jobs: int | None, as_json: bool,
               no_cache: bool) -> None:
    """Scan local files and directories with the active signatures (exit 1 on detection)."""
    from vsphere_av.engine import TOO_LARGE
    from vsphere_av.engine.localscan import detection_path, scan_paths

    settings = settings_from(ctx)
    if as_json or not sys.stderr.isatty():
        report = scan_paths(settings=settings, paths=paths, jobs=jobs, use_cache=not no_cache,
                            **_signature_audit(ctx))
    else:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("scanning"), BarColumn(bar_width=None),
                      TextColumn("{task.fields[files]} files"), DownloadColumn(),
                      TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("scan", total=None, files=0)

            def advance(files: int, nbytes: int) -> None:
                bar.update(task, completed=nbytes, files=files)

            report = scan_paths(settings=settings, paths=paths, jobs=jobs,
                                use_cache=not no_cache, progress=advance,
                                **_signature_audit(ctx))
    if as_json:
        print_json(report.as_dict())
    else:
        for outcome in report.detected:
            for d in outcome.detections:
                click.echo(f"INFECTED {shown(detection_path(outcome.path, d.member))}: "
                           f"{d.threat} [{d.source} {d.rule}]")
        for outcome in report.skipped:
            click.echo(f"skipped  {shown(outcome.path)}: {shown(outcome.reason)}")
        for outcome in report.errors:
            click.echo(f"error    {shown(outcome.path)}: {shown(outcome.reason)}", err=True)
        mb = report.bytes / 1e6
        rate = mb / report.seconds if report.seconds else 0.0
        click.echo(f"{report.files} files, {mb:.1f} MB in {report.seconds:.1f} s ({rate:.1f} MB/s, "
                   f"{report.cached} from cache), signature version {report.signature_version}: "
                   f"{len(report.detected)} infected, {len(report.skipped)} skipped, "
                   f"{len(report.errors)} errors")
    if report.detected:
        sys.exit(EXIT_DETECTED)
    # A file not read to the end is as unchecked here as in a guest scan (exit 2), unless
    # the policy skips large files on purpose (scan.skip_large).
    unchecked = [o for o in report.skipped
                 if not (settings.scan.skip_large and o.reason == TOO_LARGE)]
    if report.errors or unchecked:
        sys.exit(EXIT_ERROR)


# --- guest scan commands (scan, status, detections, quarantine, audit) ---

def _app(ctx: click.Context) -> Any:
    from vsphere_av.app import App

    app = App(settings_from(ctx))
    ctx.call_on_close(app.close)
    return app


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


@main.command("scan")
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
    app = _app(ctx)
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


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every VM's protection state: protected, stale, infected, unprotected, unreachable."""
    app = _app(ctx)
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


@main.command("detections")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def detections_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every detection found by guest scans and what was done about it."""
    rows = _app(ctx).detections()
    if as_json:
        print_json({"detections": rows})
        return
    print_table(rows, ["time", "vm", "path", "threat", "sha256", "action"], title="detections")


@main.group("quarantine")
def quarantine_group() -> None:
    """Files taken out of guests: list, restore, purge."""


@quarantine_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def quarantine_list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Quarantined files (id, VM, guest path, threat, sha256, size, when)."""
    rows = _app(ctx).quarantine_list()
    if as_json:
        print_json({"items": rows})
        return
    print_table(rows, ["id", "vm", "path", "threat", "sha256", "size", "time", "restored"],
                title="quarantine")


@quarantine_group.command("restore")
@click.argument("item_id", metavar="ID")
@click.option("--force", is_flag=True, help="Overwrite a file that now exists at the path.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def quarantine_restore_cmd(ctx: click.Context, item_id: str, force: bool, as_json: bool) -> None:
    """Put the identical bytes back at the original guest path."""
    row = _app(ctx).quarantine_restore(item_id, force=force)
    if as_json:
        print_json(row)
    else:
        click.echo(f"restored {row['path']} in {row['vm']} "
                   f"({row['size']} bytes, sha256 {row['sha256']})")


@quarantine_group.command("purge")
@click.argument("item_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def quarantine_purge_cmd(ctx: click.Context, item_id: str, as_json: bool) -> None:
    """Delete a quarantined file's bytes for good."""
    row = _app(ctx).quarantine_purge(item_id)
    if as_json:
        print_json(row)
    else:
        click.echo(f"purged {row['id']} ({row['path']} from {row['vm']})")


# --- audit commands ---


@main.group()
def audit() -> None:
    """Verify and export the tamper-evident audit log."""


@audit.command("verify")
@click.option("--head", "kept_head", metavar="SEQ:HASH",
              help="A head kept from 'audit head' or a checkpoint at the SIEM: that entry "
                   "must still be in the log, unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_verify(ctx: click.Context, kept_head: str | None, as_json: bool) -> None:
    """Exit 0 when the hash chain is intact, 2 naming the first bad entry otherwise."""
    from vsphere_av.store.audit import AuditLog, parse_head

    head = parse_head(kept_head) if kept_head is not None else None
    with AuditLog.open(settings_from(ctx).state_dir) as log:
        result = log.verify(head=head)
    if as_json:
        print_json({"ok": result.ok, "entries": result.entries,
                    "first_bad_entry": result.first_bad_seq, "message": result.message})
    elif result.ok:
        click.echo(f"audit log intact: {result.entries} entries")
    if not result.ok:
        fail(f"audit log broken at entry {result.first_bad_seq}: {result.message}")


@audit.command("head")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_head(ctx: click.Context, as_json: bool) -> None:
    """Print the last entry as SEQ:HASH, to keep off this machine for 'audit verify --head'.

    The chain is verified first: a broken log has no head worth keeping (exit 2).
    """
    from vsphere_av.store.audit import AuditLog

    with AuditLog.open(settings_from(ctx).state_dir) as log:
        log.require_intact()
        seq, digest = log.head()
    if as_json:
        print_json({"seq": seq, "hash": digest, "head": f"{seq}:{digest}"})
    else:
        click.echo(f"{seq}:{digest}")


@audit.command("forward")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_forward(ctx: click.Context, as_json: bool) -> None:
    """Send the entries not yet forwarded to the SIEM in [siem] target (syslog), then exit.

    ``serve`` does the same every siem.interval seconds.
    """
    from vsphere_av.store.siem import Forwarder

    settings = settings_from(ctx)
    forwarder = Forwarder(settings=settings.siem, state_dir=settings.state_dir)
    try:
        sent = forwarder.forward()
    finally:
        forwarder.close()
    cursor = forwarder.cursor()
    if as_json:
        print_json({"target": settings.siem.target, "sent": sent, "last_seq": cursor.seq})
    else:
        click.echo(f"forwarded {sent} entr{'y' if sent == 1 else 'ies'} to "
                   f"{settings.siem.target} (last entry sent: {cursor.seq})")


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "cef"]), default="jsonl",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this new file instead of stdout (never over an existing file, "
                   "never inside the state directory).")
@click.pass_context
def audit_export(ctx: click.Context, fmt: str, output: str | None) -> None:
    """Write every entry as JSON lines or CEF (one event per line)."""
    import os

    from vsphere_av import __version__
    from vsphere_av.files import create_outside
    from vsphere_av.store.audit import AuditLog, to_cef, to_jsonl

    state_dir = settings_from(ctx).state_dir
    with AuditLog.open(state_dir) as log:
        lines = (to_cef(e, version=__version__) if fmt == "cef" else to_jsonl(e)
                 for e in log.entries())
        if output:
            # Never into the state directory, never over a file: run through sudo as the
            # service account, "-o audit.sqlite" would otherwise wipe the log it exports.
            with os.fdopen(create_outside(output, state_dir=state_dir), "w",
                           encoding="utf-8") as fh:
                for line in lines:
                    fh.write(line + "\n")
        else:
            for line in lines:
                click.echo(line)


# --- appliance commands ---


@main.group("engine")
def engine_group() -> None:
    """Run the scan engine as a service (inside each appliance)."""


@engine_group.command("serve")
@click.option("--listen", default="127.0.0.1:8443", show_default=True,
              help="HOST:PORT to listen on (loopback unless TLS is configured).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding the bearer token (or VSPHERE_AV_ENGINE_TOKEN).")
@click.option("--max-concurrent", type=int, default=4, show_default=True,
              help="Scans at once; more get HTTP 503 + Retry-After.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default="", help="PEM certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default="", help="PEM private key.")
@click.option("--allow-plaintext", is_flag=True,
              help="Allow plain HTTP on a non-loopback address (the token travels in clear).")
@click.pass_context
def engine_serve(ctx: click.Context, listen: str, token_file: str | None, max_concurrent: int,
                 tls_cert: str, tls_key: str, allow_plaintext: bool) -> None:
    """Serve the engine over an authenticated HTTP API until SIGINT/SIGTERM."""
    import signal

    from vsphere_av.engine import Engine
    from vsphere_av.engine.remote import EngineService, load_token, parse_listen

    settings = settings_from(ctx)
    token = load_token(token_file=token_file)
    engine = Engine.open(settings, **_signature_audit(ctx))
    service = EngineService(engine=engine, token=token, listen=parse_listen(listen),
                            max_concurrent=max_concurrent, tls_cert=tls_cert, tls_key=tls_key,
                            allow_plaintext=allow_plaintext)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    click.echo(service.url, nl=True)
    sys.stdout.flush()
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        service.httpd.server_close()
        engine.close()


@main.group("appliances")
def appliances_group() -> None:
    """One hardened security appliance per ESXi host: reconcile, signatures, health."""


def _appliance_manager(ctx: click.Context) -> Any:
    from vsphere_av.app import App
    from vsphere_av.fleet.manager import open_manager

    app = App(settings_from(ctx))
    ctx.call_on_close(app.close)
    return open_manager(app.settings, connection=app.connection, audit=app.audit,
                        actor=app.actor)


@appliances_group.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help='Machine output: {"actions": [...]}.')
@click.pass_context
def appliances_reconcile(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Make exactly one pinned, hardened, running appliance exist on every host."""
    result = _appliance_manager(ctx).reconcile(dry_run=dry_run)
    document = result.as_dict()
    for warning in () if as_json else result.warnings:   # --json: in "warnings"
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(document)
    elif not document["actions"]:
        click.echo("appliances converged: nothing to do")
    else:
        columns = ["kind", "host", "vm", "reason"] + ([] if dry_run else ["ok", "error"])
        print_table(document["actions"], columns,
                    title="appliance plan (dry run)" if dry_run else "appliance actions")
    if not result.ok:
        sys.exit(EXIT_ERROR)


@appliances_group.command("upgrade")
@click.option("--dry-run", is_flag=True, help="Print which hosts would be replaced; change "
              "nothing.")
@click.option("--json", "as_json", is_flag=True, help='Machine output: {"hosts": [...]}.')
@click.pass_context
def appliances_upgrade(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Replace appliances host by host with the configured image (deploy, check, move, remove)."""
    from vsphere_av.engine.signatures import SignatureStore

    manager = _appliance_manager(ctx)
    store = SignatureStore(state_dir=manager.state_dir)
    version = store.active_version()
    result = manager.upgrade(dry_run=dry_run, expected_version=version or None,
                             version_dir=store.root / f"v{version:04d}" if version else None)
    document = result.as_dict()
    for warning in () if as_json else result.warnings:   # --json: in "warnings"
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(document)
    else:
        columns = ["kind", "host", "old_vm", "new_vm", "reason"] if dry_run else \
            ["host", "old_vm", "new_vm", "status", "move_seconds", "reason"]
        print_table(document["hosts"], columns,
                    title=f"appliance upgrade to {result.image}" + (" (dry run)" if dry_run
                                                                    else ""))
    if not result.ok:
        sys.exit(EXIT_ERROR)


@appliances_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def appliances_list(ctx: click.Context, as_json: bool) -> None:
    """Every appliance, its host, power state, management address and down reason."""
    manager = _appliance_manager(ctx)
    down = manager.down_hosts()
    rows = [{"host": a.host, "host_id": a.host_id, "vm": a.vm, "vm_id": a.vm_id,
             "address": a.address or None, "powered_on": a.powered_on,
             "down": down.get(a.host_id)} for a in manager.appliances()]
    if as_json:
        print_json({"appliances": rows, "down": down})
    else:
        print_table(rows, ["host", "vm", "address", "powered_on", "down"], title="appliances")


def _print_checks(checks: Sequence[Any], as_json: bool, title: str) -> None:
    rows = [c.as_dict() for c in checks]
    if as_json:
        print_json({"appliances": rows})
    else:
        print_table(rows, ["host", "vm", "address", "ok", "signature_version", "reason"],
                    title=title)
    if not all(c.ok for c in checks):
        sys.exit(EXIT_ERROR)


@appliances_group.command("push-signatures")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def appliances_push(ctx: click.Context, as_json: bool) -> None:
    """Copy the active signature version to every appliance over SFTP and verify it there."""
    from vsphere_av.engine.signatures import SignatureStore

    manager = _appliance_manager(ctx)
    store = SignatureStore(state_dir=manager.state_dir)
    version = store.active_version()
    if not version:
        fail("no active signature version to push")
    checks = manager.push_signatures(version_dir=store.root / f"v{version:04d}")
    _print_checks(checks, as_json, f"signature version {version} pushed")


@appliances_group.command("health")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def appliances_health(ctx: click.Context, as_json: bool) -> None:
    """Check every appliance: SSH (pinned host key) and its engine service's health."""
    from vsphere_av.engine.signatures import SignatureStore

    manager = _appliance_manager(ctx)
    expected = SignatureStore(state_dir=manager.state_dir).active_version() or None
    _print_checks(manager.check_health(expected_version=expected), as_json, "appliance health")


@appliances_group.command("restart-engine")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def appliances_restart(ctx: click.Context, as_json: bool) -> None:
    """Restart the engine service on every appliance (appliances.restart_command over SSH)."""
    _print_checks(_appliance_manager(ctx).restart_engines(), as_json, "engine restarted")


# --- controller commands (serve) ---


@main.command("serve")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="Log verbosity (stderr).")
@click.pass_context
def serve_cmd(ctx: click.Context, log_level: str) -> None:
    """Run the controller: watch vCenter, contain stale VMs at power-on, scan under storm limits.

    Runs until SIGTERM or SIGINT; in-flight scans then finish or go back to the queue.
    """
    import logging
    import signal
    import threading

    from vsphere_av.app import run_controller

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    settings = settings_from(ctx)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("vsphere_av.serve").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"vsphere-av serve: watching {settings.vcenter.server}:{settings.vcenter.port}"
               f" (state in {settings.state_dir})", err=True)
    run_controller(settings, stop)
    click.echo("vsphere-av serve: stopped", err=True)


# --- the console (issue 14: api/): tokens and reports ---


@main.group("api")
def api_group() -> None:
    """The console's REST API (served by 'serve' when [api] listen is set)."""


@api_group.group("token")
def api_token_group() -> None:
    """Bearer tokens: create (printed once, stored as a hash), list, revoke."""


def _token_store(ctx: click.Context) -> Any:
    from vsphere_av.api.tokens import TokenStore

    store = TokenStore(state_dir=settings_from(ctx).state_dir)
    ctx.call_on_close(store.close)
    return store


@api_token_group.command("create")
@click.option("--name", required=True, help="Who or what uses it (the audit log's actor).")
@click.option("--role", required=True,
              type=click.Choice(["security_admin", "infrastructure_admin", "auditor"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def api_token_create(ctx: click.Context, name: str, role: str, as_json: bool) -> None:
    """Create a token and print it once: only its hash is kept."""
    from vsphere_av.api.tokens import ROLE_NAMES
    from vsphere_av.app import access
    from vsphere_av.store.audit import current_actor

    settings = settings_from(ctx)
    if not access.may_grant(ROLE_NAMES[role], settings=settings.access,
                            state_dir=settings.state_dir):
        raise errors.AccessDenied(f"api token create: a token of role {role} needs that "
                                  f"role (access.{ROLE_NAMES[role]})")
    token = _token_store(ctx).create(name=name, role=role,
                                     actor=current_actor(state_dir=settings.state_dir))
    if as_json:
        print_json({"name": name, "role": role, "token": token})
    else:
        click.echo(token)
        click.echo(f"token {name!r} ({role}) created; it is shown only now", err=True)


@api_token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def api_token_list(ctx: click.Context, as_json: bool) -> None:
    """Every token's name, role, creator and revocation (never the token)."""
    rows = [t.as_dict() for t in _token_store(ctx).list()]
    if as_json:
        print_json({"tokens": rows})
    else:
        print_table(rows, ["name", "role", "created", "creator", "revoked"], title="API tokens")


@api_token_group.command("revoke")
@click.argument("name")
@click.pass_context
def api_token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke the token called NAME: it stops working at once."""
    from vsphere_av.store.audit import current_actor

    settings = settings_from(ctx)
    info = _token_store(ctx).revoke(name, actor=current_actor(state_dir=settings.state_dir))
    click.echo(f"token {info.name!r} ({info.role}) revoked")


@main.command("report")
@click.option("--since", default="", help="Start of the period: YYYY-MM-DD or an ISO 8601 "
              "time (default: 30 days ago).")
@click.option("--format", "fmt", type=click.Choice(["html", "csv", "pdf", "json"]),
              default="html", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this new file (never over one, never in the state directory); "
                   "default: stdout (not for pdf).")
@click.pass_context
def report_cmd(ctx: click.Context, since: str, fmt: str, output: str | None) -> None:
    """Per VM protection, last clean full scan, detections, exposures; totals; audit head."""
    import os

    from vsphere_av.api import report
    from vsphere_av.files import create_outside

    settings = settings_from(ctx)
    document = report.build(settings=settings, since=report.parse_since(since))
    if fmt == "json":
        body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    else:
        body, _media = report.render(document, fmt=fmt)
    if output:
        with os.fdopen(create_outside(output, state_dir=settings.state_dir), "wb") as fh:
            fh.write(body)
    elif fmt == "pdf" and sys.stdout.isatty():
        fail("a PDF goes to a file: give -o FILE")
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()


# --- access control (every command, after all are defined; see access.py) ---


def _guard(group: click.Group, prefix: str = "") -> None:
    """Check ``[access]`` before each command of ``group`` runs."""
    from vsphere_av.app import access

    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            _guard(command, path + " ")
        elif command.callback is not None and path not in access.UNCHECKED:
            command.callback = _checked(path, command.callback)


def _checked(path: str, callback: Command) -> Command:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        from vsphere_av.app import access

        ctx = click.get_current_context()
        settings = settings_from(ctx)
        try:
            access.check(path, settings=settings.access, state_dir=settings.state_dir,
                         config_file=ctx.find_root().obj.get("config_file"))
        except errors.AccessDenied as exc:
            _audit_denial(settings, path, str(exc))
            raise
        return callback(*args, **kwargs)

    return run


_guard(main)


def _audit_denial(settings: Any, command: str, reason: str) -> None:
    """Record a refused command (best effort: the refusal stands either way)."""
    from vsphere_av.store.audit import AuditLog, current_actor

    try:
        with AuditLog.open(settings.state_dir) as log:
            log.append(actor=current_actor(state_dir=settings.state_dir),
                       action="access.denied", details={"command": command, "reason": reason})
    except (errors.VsphereAvError, OSError):
        pass
