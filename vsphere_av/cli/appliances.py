"""``vsphere-av appliances ...``: one security appliance per ESXi host: reconcile, upgrade,
list, push signatures, health, restart the engine.

Registered by ``cli/__init__.py``; calls ``fleet.manager`` (opened on the
application's connection and audit log) and the engine's signature store.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from vsphere_av.cli.common import EXIT_ERROR, app_from, fail, print_json, print_table


@click.group("appliances")
def appliances_group() -> None:
    """One hardened security appliance per ESXi host: reconcile, signatures, health."""


def _appliance_manager(ctx: click.Context) -> Any:
    from vsphere_av.fleet.manager import open_manager

    app = app_from(ctx)
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
