"""``vsphere-av api token ...``: the console's bearer tokens: create, list, revoke.

Registered by ``cli/__init__.py``; calls ``api.tokens``, ``app.access`` (who may grant
which role) and ``store.audit`` (the actor).
"""

from __future__ import annotations

from typing import Any

import click

from vsphere_av import errors
from vsphere_av.cli.common import print_json, print_table, settings_from


@click.group("api")
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
