"""``vsphere-av scan-files``: scan local files and directories with the active signatures.

Registered by ``cli/__init__.py``; calls ``engine.localscan`` (no vSphere, no store).
"""

from __future__ import annotations

import sys

import click

from vsphere_av.cli.common import (
    EXIT_DETECTED,
    EXIT_ERROR,
    print_json,
    settings_from,
    shown,
    signature_audit,
)


@click.command("scan-files")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the verdict cache.")
@click.pass_context
def scan_files(ctx: click.Context, paths: tuple[str, ...], jobs: int | None, as_json: bool,
               no_cache: bool) -> None:
    """Scan local files and directories with the active signatures (exit 1 on detection)."""
    from vsphere_av.engine import TOO_LARGE
    from vsphere_av.engine.localscan import detection_path, scan_paths

    settings = settings_from(ctx)
    if as_json or not sys.stderr.isatty():
        report = scan_paths(settings=settings, paths=paths, jobs=jobs, use_cache=not no_cache,
                            **signature_audit(ctx))
    else:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("scanning"), BarColumn(bar_width=None),
                      TextColumn("{task.fields[files]} files"), DownloadColumn(),
                      TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("scan", total=None, files=0)

            def advance(files: int, nbytes: int) -> None:
                bar.update(task, completed=nbytes, files=files)

            report = scan_paths(settings=settings, paths=paths, jobs=jobs,
                                use_cache=not no_cache, progress=advance,
                                **signature_audit(ctx))
    if as_json:
        print_json(report.as_dict())
    else:
        for outcome in report.detected:
            for d in outcome.detections:
                click.echo(f"INFECTED {shown(detection_path(outcome.path, d.member))}: "
                           f"{d.threat} [{d.source} {d.rule}]")
        for outcome in report.skipped:
            click.echo(f"skipped  {shown(outcome.path)}: {shown(outcome.reason)}")
        for outcome in report.errors:
            click.echo(f"error    {shown(outcome.path)}: {shown(outcome.reason)}", err=True)
        mb = report.bytes / 1e6
        rate = mb / report.seconds if report.seconds else 0.0
        click.echo(f"{report.files} files, {mb:.1f} MB in {report.seconds:.1f} s ({rate:.1f} MB/s, "
                   f"{report.cached} from cache), signature version {report.signature_version}: "
                   f"{len(report.detected)} infected, {len(report.skipped)} skipped, "
                   f"{len(report.errors)} errors")
    if report.detected:
        sys.exit(EXIT_DETECTED)
    # A file not read to the end is as unchecked here as in a guest scan (exit 2), unless
    # the policy skips large files on purpose (scan.skip_large).
    unchecked = [o for o in report.skipped
                 if not (settings.scan.skip_large and o.reason == TOO_LARGE)]
    if report.errors or unchecked:
        sys.exit(EXIT_ERROR)
