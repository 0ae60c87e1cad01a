"""``vsphere-av quarantine ...``: list, restore and purge files taken out of guests.

Registered by ``cli/__init__.py``; calls the application (``app``).
"""

from __future__ import annotations

import click

from vsphere_av.cli.common import app_from, print_json, print_table


@click.group("quarantine")
def quarantine_group() -> None:
    """Files taken out of guests: list, restore, purge."""


@quarantine_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def quarantine_list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Quarantined files (id, VM, guest path, threat, sha256, size, when)."""
    rows = app_from(ctx).quarantine_list()
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
    row = app_from(ctx).quarantine_restore(item_id, force=force)
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
    row = app_from(ctx).quarantine_purge(item_id)
    if as_json:
        print_json(row)
    else:
        click.echo(f"purged {row['id']} ({row['path']} from {row['vm']})")
