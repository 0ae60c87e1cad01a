"""``vsphere-av engine serve``: the scan engine as an authenticated HTTP service (inside
each appliance).

Registered by ``cli/__init__.py``; calls ``engine`` and ``engine.remote``, and adds the
disk-scan routes (``scan.sources.disk_service`` reading through ``vsphere.disks.GrantedFiles``).
"""

from __future__ import annotations

import sys

import click

from vsphere_av.cli.common import settings_from, signature_audit


@click.group("engine")
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
    from vsphere_av.scan.sources.disk_service import DiskService
    from vsphere_av.vsphere.disks import GrantedFiles

    settings = settings_from(ctx)
    token = load_token(token_file=token_file)
    engine = Engine.open(settings, **signature_audit(ctx))
    service = EngineService(engine=engine, token=token, listen=parse_listen(listen),
                            max_concurrent=max_concurrent, tls_cert=tls_cert, tls_key=tls_key,
                            allow_plaintext=allow_plaintext)
    # Disk scans of this host's VMs: read here, with tickets the controller grants.
    service.routes.update(DiskService(scanning=service.scanning, reader=GrantedFiles).routes())

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
