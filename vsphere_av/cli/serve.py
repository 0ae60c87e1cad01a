"""``vsphere-av serve``: run the controller until SIGTERM or SIGINT.

Registered by ``cli/__init__.py``; calls ``app.run_controller``, handing it the console
(``api.ApiServer``) that runs beside the controller with ``[api] listen``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from vsphere_av.cli.common import settings_from


@click.command("serve")
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

    from vsphere_av.api import ApiServer
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
    run_controller(settings, stop, console=ApiServer)     # the console with [api] listen
    click.echo("vsphere-av serve: stopped", err=True)
