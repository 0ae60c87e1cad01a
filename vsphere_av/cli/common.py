"""What every command module of the command line shares: exit codes, one-line errors,
JSON and table output, settings and the application per command, and the access guard.

Exit codes (as clamscan and yara): 0 clean / success, 1 something detected, 2 error.
Every ``errors.VsphereAvError`` becomes one line on stderr and exit 2 (``RootGroup``).
Called by the command modules beside it and by ``cli/__init__.py``, which guards every
command with ``guard`` once all are registered; calls ``config``, ``app`` (``App``,
``access``), ``engine.matcher`` (names) and ``store.audit`` (refusals, the signature
store's audit), each imported when first needed.
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

Command = Callable[..., Any]


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


class RootGroup(click.Group):
    """The root group: turns product errors into one line and exit 2, whatever the command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.VsphereAvError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted")


def settings_from(ctx: click.Context) -> Any:
    """Load settings once per command from --config / environment."""
    from vsphere_av import config

    root = ctx.find_root()
    if "settings" not in root.obj:
        root.obj["settings"] = config.load(
            config_file=root.obj.get("config_file"), insecure=root.obj.get("insecure", False)
        )
    return root.obj["settings"]


def app_from(ctx: click.Context) -> Any:
    """The application for this command, closed when the command ends."""
    from vsphere_av.app import App

    app = App(settings_from(ctx))
    ctx.call_on_close(app.close)
    return app


# --- access control (every command, once all are registered; see app/access.py) ---



def signature_audit(ctx: click.Context) -> dict[str, Any]:
    """Where the engine's signature store records its changes (``Engine.open``'s ``audit``
    and ``actor``): the state directory's audit log, opened per entry, and who acts."""
    from vsphere_av.store.audit import AuditOnUse, current_actor

    state_dir = settings_from(ctx).state_dir
    return {"audit": AuditOnUse(state_dir), "actor": current_actor(state_dir=state_dir)}

def guard(group: click.Group, prefix: str = "") -> None:
    """Check ``[access]`` before each command of ``group`` runs."""
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            guard(command, path + " ")
        elif command.callback is not None:
            command.callback = _checked(path, command.callback)


def _checked(path: str, callback: Command) -> Command:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        # Imported when a command runs, not when it is registered: app.access brings in the
        # application and the engine, which `vsphere-av --help` does without.
        from vsphere_av.app import access

        if path in access.UNCHECKED:        # no settings to load (vcsim)
            return callback(*args, **kwargs)
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


def _audit_denial(settings: Any, command: str, reason: str) -> None:
    """Record a refused command (best effort: the refusal stands either way)."""
    from vsphere_av.store.audit import AuditLog, current_actor

    try:
        with AuditLog.open(settings.state_dir) as log:
            log.append(actor=current_actor(state_dir=settings.state_dir),
                       action="access.denied", details={"command": command, "reason": reason})
    except (errors.VsphereAvError, OSError):
        pass
