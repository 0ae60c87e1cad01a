"""Reports for auditors: per VM protection, scans, detections and exposures over a period.

Called by ``cli`` (``vsphere-av report``) and ``api.server`` (``GET /api/v1/report``).
Calls the application face (``app.App.status`` / ``detections``), ``store.jobs``
(exposures), ``store.audit`` (the chain head and its verification), Jinja2 (HTML, the same
template for the PDF) and WeasyPrint (PDF; imported only for a PDF, it loads Pango).

:func:`build` returns one JSON-ready document; :func:`render` turns it into HTML, CSV or
PDF. The chart of detections and exposures per day is an inline SVG drawn here, so nothing
is fetched from anywhere when the report is rendered.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from vsphere_av import errors
from vsphere_av.config import Settings

DEFAULT_DAYS = 30
MEDIA = {"html": "text/html; charset=utf-8", "csv": "text/csv; charset=utf-8",
         "pdf": "application/pdf"}


def parse_since(text: str, *, now: float | None = None) -> float:
    """``YYYY-MM-DD`` or an ISO 8601 time (UTC when no offset) -> UNIX time; "" = 30 days
    ago. ConfigError on anything else or a time in the future."""
    now = time.time() if now is None else now
    if not text:
        return now - DEFAULT_DAYS * 86400
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise errors.ConfigError(f"--since {text!r}: give a date (YYYY-MM-DD) or an ISO 8601 "
                                 "time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() > now:
        raise errors.ConfigError(f"--since {text!r} is in the future")
    return when.timestamp()


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def build(*, settings: Settings, since: float, now: float | None = None) -> dict[str, Any]:
    """The report document of the period from ``since`` to ``now``."""
    from vsphere_av.app import App
    from vsphere_av.store.audit import AuditLog
    from vsphere_av.store.jobs import JobStore

    now = time.time() if now is None else now
    with App(settings) as app:
        states = app.status(refresh=False)
        detections = [d for d in app.detections()
                      if since <= (_ts(d["time"]) or 0.0) <= now]
    with JobStore.open(settings.state_dir) as jobs:
        exposures = [e for e in jobs.exposures() if since <= e.started <= now]
    with AuditLog.open(settings.state_dir) as log:
        verified = log.verify()
        seq, digest = log.head()
    vms = []
    for s in states:
        mine = [d for d in detections if d["moref"] == s["moref"]]
        windows = [e for e in exposures if e.vm == s["moref"]]
        actions: dict[str, int] = {}
        for d in mine:
            actions[d["action"]] = actions.get(d["action"], 0) + 1
        vms.append({
            "name": s["name"], "moref": s["moref"], "host": s["host"], "state": s["state"],
            "reason": s["reason"], "last_clean_full_scan": s["last_full_scan"],
            "signature_version": s["signature_version"],
            "detections": [{"time": d["time"], "path": d["path"], "threat": d["threat"],
                            "action": d["action"]} for d in mine],
            "actions": actions,
            "exposures": [{"started": _iso(e.started), "trigger": e.trigger,
                           "window": e.window, "outcome": e.outcome} for e in windows]})
    totals: dict[str, Any] = {"vms": len(vms), "detections": len(detections),
                              "exposures": len(exposures)}
    for state in ("protected", "stale", "infected", "unprotected", "unreachable"):
        totals[state] = sum(1 for v in vms if v["state"] == state)
    measured = [e.window for e in exposures if e.window is not None]
    totals["longest_exposure"] = max(measured) if measured else None
    return {"since": _iso(since), "until": _iso(now), "generated": _iso(time.time()),
            "vms": vms, "totals": totals,
            "per_day": _per_day(since, now, detections, exposures),
            "audit": {"head": f"{seq}:{digest}", "seq": seq, "hash": digest,
                      "intact": verified.ok, "entries": verified.entries}}


def _per_day(since: float, now: float, detections: list[dict[str, Any]],
             exposures: list[Any]) -> list[dict[str, Any]]:
    """Detections and exposures counted per UTC day of the period (the chart's data)."""
    first = datetime.fromtimestamp(since, UTC).date()
    last = datetime.fromtimestamp(now, UTC).date()
    days: dict[date, dict[str, Any]] = {}
    day = first
    while day <= last and len(days) < 400:
        days[day] = {"day": day.isoformat(), "detections": 0, "exposures": 0}
        day += timedelta(days=1)
    for d in detections:
        key = datetime.fromtimestamp(_ts(d["time"]) or 0.0, UTC).date()
        if key in days:
            days[key]["detections"] += 1
    for e in exposures:
        key = datetime.fromtimestamp(e.started, UTC).date()
        if key in days:
            days[key]["exposures"] += 1
    return list(days.values())


def chart_svg(per_day: list[dict[str, Any]], *, width: int = 640, height: int = 160) -> str:
    """Bars of detections (red) and exposures (amber) per day, as inline SVG."""
    from html import escape

    top = max([1] + [max(d["detections"], d["exposures"]) for d in per_day])
    n = max(1, len(per_day))
    slot = (width - 40) / n
    bar = max(1.0, slot / 2 - 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" '
             f'viewBox="0 0 {width} {height + 30}" role="img" '
             f'aria-label="detections and exposures per day">',
             f'<line x1="30" y1="{height}" x2="{width}" y2="{height}" stroke="#555"/>',
             f'<text x="0" y="12" font-size="10">{top}</text>',
             f'<text x="0" y="{height}" font-size="10">0</text>']
    for i, d in enumerate(per_day):
        x = 32 + i * slot
        for j, (key, colour) in enumerate((("detections", "#c0392b"),
                                           ("exposures", "#e69a17"))):
            h = d[key] / top * (height - 10)
            if h:
                parts.append(f'<rect x="{x + j * bar:.1f}" y="{height - h:.1f}" '
                             f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                             f'<title>{escape(d["day"])}: {d[key]} {key}</title></rect>')
        if n <= 14 or i % max(1, n // 8) == 0:      # labels that do not overlap
            parts.append(f'<text x="{x:.1f}" y="{height + 12}" font-size="8">'
                         f'{escape(d["day"][5:])}</text>')
    parts.append(f'<text x="32" y="{height + 26}" font-size="10" fill="#c0392b">'
                 f'detections</text><text x="110" y="{height + 26}" font-size="10" '
                 f'fill="#e69a17">exposures</text></svg>')
    return "".join(parts)


def render(document: dict[str, Any], *, fmt: str) -> tuple[bytes, str]:
    """(body, media type) of the report as ``html``, ``csv`` or ``pdf``."""
    if fmt == "csv":
        return _csv(document).encode("utf-8"), MEDIA["csv"]
    html = _html(document)
    if fmt == "html":
        return html.encode("utf-8"), MEDIA["html"]
    if fmt == "pdf":
        from weasyprint import HTML

        pdf = HTML(string=html, base_url=None).write_pdf()
        assert pdf is not None      # only None when given a target to write to
        return pdf, MEDIA["pdf"]
    raise errors.ConfigError(f"report format must be html, csv or pdf, not {fmt!r}")


def _html(document: dict[str, Any]) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=select_autoescape(["html"]))
    return env.get_template("report.html").render(
        r=document, chart=Markup(chart_svg(document["per_day"])))


def _csv(document: dict[str, Any]) -> str:
    """One row per VM (detections and exposures summed), then the totals and the chain head."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["vm", "moref", "host", "state", "last_clean_full_scan",
                     "signature_version", "detections", "actions", "exposures",
                     "longest_exposure_seconds"])
    for v in document["vms"]:
        windows = [e["window"] for e in v["exposures"] if e["window"] is not None]
        writer.writerow([_cell(v["name"]), v["moref"], _cell(v["host"]), v["state"],
                         v["last_clean_full_scan"] or "", v["signature_version"] or "",
                         len(v["detections"]),
                         " ".join(f"{k}={n}" for k, n in sorted(v["actions"].items())),
                         len(v["exposures"]), f"{max(windows):.3f}" if windows else ""])
    t = document["totals"]
    writer.writerow([])
    writer.writerow(["totals", f"{t['vms']} VMs", "", f"{t['protected']} protected",
                     "", "", t["detections"], "", t["exposures"],
                     "" if t["longest_exposure"] is None else f"{t['longest_exposure']:.3f}"])
    writer.writerow(["period", document["since"], document["until"]])
    writer.writerow(["audit chain head", document["audit"]["head"],
                     "intact" if document["audit"]["intact"] else "BROKEN"])
    return out.getvalue()


def _cell(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (=, +, -, @ start one)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
