"""Command line: parse, validate, call the application, print. Nothing else lives here.

This face holds the root group ``main`` (``--config``, ``--insecure``; the console script
``vsphere-av`` and ``python -m vsphere_av``) and registers one module per command group:

    signatures.py   signatures import | list | activate | rollback
    scan_files.py   scan-files (local files, no vSphere)
    scan.py         scan, status, detections (VMs)
    quarantine.py   quarantine list | restore | purge
    audit.py        audit verify | head | forward | export
    engine.py       engine serve (inside each appliance)
    appliances.py   appliances reconcile | upgrade | list | push-signatures | health | ...
    serve.py        serve (the controller)
    api.py          api token create | list | revoke
    report.py       report
    vcsim.py        vcsim (the bundled simulator)

What they share (exit codes, output, settings, the access guard) is in ``common.py``.
Exit codes (as clamscan and yara): 0 clean / success, 1 something detected, 2 error.
Every ``errors.VsphereAvError`` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import click

from vsphere_av.cli.api import api_group
from vsphere_av.cli.appliances import appliances_group
from vsphere_av.cli.audit import audit_group
from vsphere_av.cli.common import EXIT_CLEAN, EXIT_DETECTED, EXIT_ERROR, RootGroup, guard
from vsphere_av.cli.engine import engine_group
from vsphere_av.cli.quarantine import quarantine_group
from vsphere_av.cli.report import report_cmd
from vsphere_av.cli.scan import detections_cmd, scan_cmd, status_cmd
from vsphere_av.cli.scan_files import scan_files
from vsphere_av.cli.serve import serve_cmd
from vsphere_av.cli.signatures import signatures_group
from vsphere_av.cli.vcsim import vcsim_command

__all__ = ["EXIT_CLEAN", "EXIT_DETECTED", "EXIT_ERROR", "main"]


@click.group(cls=RootGroup)
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


for _command in (vcsim_command, signatures_group, scan_files, scan_cmd, status_cmd,
                 detections_cmd, quarantine_group, audit_group, engine_group, appliances_group,
                 serve_cmd, api_group, report_cmd):
    main.add_command(_command)

# Every command checks [access] before it runs (app/access.py maps command names to roles).
guard(main)
