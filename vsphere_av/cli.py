"""Command line: parse, validate, call the application, print. Nothing else lives here.

Exit codes (as clamscan and yara): 0 clean / success, 1 something detected, 2 error.
Every ``errors.VsphereAvError`` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

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


def print_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str = "") -> None:
    """Print rows as a table for people (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    Console().print(table)


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
@click.option("--config", "config_file", envvar="VSPHERE_AV_CONFIG", type=click.Path(dir_okay=False),
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

# --- engine commands (signatures, scan-files, engine serve) ---

# --- guest scan commands (scan, status, detections, quarantine, audit) ---

# --- audit commands ---


@main.group()
def audit() -> None:
    """Verify and export the tamper-evident audit log."""


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_verify(ctx: click.Context, as_json: bool) -> None:
    """Exit 0 when the hash chain is intact, 2 naming the first bad entry otherwise."""
    from vsphere_av.store.audit import AuditLog

    with AuditLog.open(settings_from(ctx).state_dir) as log:
        result = log.verify()
    if as_json:
        print_json({"ok": result.ok, "entries": result.entries,
                    "first_bad_entry": result.first_bad_seq, "message": result.message})
    elif result.ok:
        click.echo(f"audit log intact: {result.entries} entries")
    if not result.ok:
        fail(f"audit log broken at entry {result.first_bad_seq}: {result.message}")


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "cef"]), default="jsonl",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of stdout.")
@click.pass_context
def audit_export(ctx: click.Context, fmt: str, output: str | None) -> None:
    """Write every entry as JSON lines or CEF (one event per line)."""
    from vsphere_av import __version__
    from vsphere_av.store.audit import AuditLog, to_cef, to_jsonl

    with AuditLog.open(settings_from(ctx).state_dir) as log:
        lines = (to_cef(e, version=__version__) if fmt == "cef" else to_jsonl(e)
                 for e in log.entries())
        if output:
            with open(output, "w", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(line + "\n")
        else:
            for line in lines:
                click.echo(line)


# --- appliance commands ---

# --- controller commands (serve) ---
