"""``vsphere-av audit ...``: verify, keep the head of, forward and export the audit log.

Registered by ``cli/__init__.py``; calls ``store.audit``, ``store.siem`` and
``files.create_outside``.
"""

from __future__ import annotations

import click

from vsphere_av.cli.common import fail, print_json, settings_from


@click.group("audit")
def audit_group() -> None:
    """Verify and export the tamper-evident audit log."""


@audit_group.command("verify")
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


@audit_group.command("head")
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


@audit_group.command("forward")
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


@audit_group.command("export")
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
