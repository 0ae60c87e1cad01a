"""``vsphere-av report``: the protection report as HTML, CSV, PDF or JSON.

Registered by ``cli/__init__.py``; calls ``api.report`` and ``files.create_outside``.
"""

from __future__ import annotations

import json
import sys

import click

from vsphere_av.cli.common import fail, settings_from


@click.command("report")
@click.option("--since", default="", help="Start of the period: YYYY-MM-DD or an ISO 8601 "
              "time (default: 30 days ago).")
@click.option("--format", "fmt", type=click.Choice(["html", "csv", "pdf", "json"]),
              default="html", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this new file (never over one, never in the state directory); "
                   "default: stdout (not for pdf).")
@click.pass_context
def report_cmd(ctx: click.Context, since: str, fmt: str, output: str | None) -> None:
    """Per VM protection, last clean full scan, detections, exposures; totals; audit head."""
    import os

    from vsphere_av.api import report
    from vsphere_av.files import create_outside

    settings = settings_from(ctx)
    document = report.build(settings=settings, since=report.parse_since(since))
    if fmt == "json":
        body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    else:
        body, _media = report.render(document, fmt=fmt)
    if output:
        with os.fdopen(create_outside(output, state_dir=settings.state_dir), "wb") as fh:
            fh.write(body)
    elif fmt == "pdf" and sys.stdout.isatty():
        fail("a PDF goes to a file: give -o FILE")
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
