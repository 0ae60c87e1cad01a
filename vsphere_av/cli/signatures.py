"""``vsphere-av signatures ...``: import, list, activate and roll back signature versions.

Registered by ``cli/__init__.py``; calls the engine's signature store
(``engine.Engine``).
"""

from __future__ import annotations

from typing import Any

import click

from vsphere_av.cli.common import print_json, print_table, settings_from, signature_audit


@click.group("signatures")
def signatures_group() -> None:
    """Signature versions: import, list, activate, roll back."""


def _signature_store(ctx: click.Context) -> Any:
    from vsphere_av.engine import Engine

    return Engine.open(settings_from(ctx), use_cache=False, **signature_audit(ctx)).store


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
