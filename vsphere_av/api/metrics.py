"""``GET /metrics``: the product's state in the Prometheus text format (prometheus_client).

Called by ``api.server`` on every scrape. Calls the stores read-only (``store.state``:
scans and detections; ``store.jobs``: exposures and the controller's per-host queues;
``store.audit``: the chain head; the SIEM cursor file; the appliance health file; the
signature store). Every value is read from durable state at scrape time, so the numbers
are the same whichever process did the work (``serve``, a CLI scan, a restart) and survive
restarts: counters are totals over the state store's history, as Prometheus expects.

Bytes and files read are labelled by ``path``: ``guest`` (Guest Operations) or ``disk`` (the
VM's virtual disks), from each scan record's ``via``; both series are always there, 0 until
a scan of that kind finished, so a rate over either starts from a known value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from vsphere_av.config import Settings

# Exposure windows: from 10 ms (isolation at power-on) to the 10-minute sweeps and beyond.
EXPOSURE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


class StateCollector(Collector):
    """Reads every metric from the state directory when Prometheus scrapes."""

    def __init__(self, *, settings: Settings, clock: Any = time.time) -> None:
        self.settings = settings
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        """One family per metric, read now."""
        yield from self._scans()
        yield from self._controller()
        yield from self._appliances()
        yield from self._signatures()
        yield from self._audit()

    def _scans(self) -> Iterator[Metric]:
        from vsphere_av.store.state import VIA_DISK, VIA_GUEST, StateStore

        with StateStore.open(self.settings.state_dir) as store:     # adds ``via`` to old files
            started = store.query("SELECT count(*) AS n FROM scans")[0]["n"]
            finished = store.query("SELECT status, count(*) AS n FROM scans WHERE finished != ''"
                                   " GROUP BY status")
            read = {r["via"]: r for r in store.query(
                "SELECT via, sum(bytes) AS bytes, sum(scanned) AS files FROM scans GROUP BY via")}
            found = store.query("SELECT action, count(*) AS n FROM detections GROUP BY action")
        yield CounterMetricFamily("vsphere_av_scans_started", "VM scans started.",
                                  value=started)
        done = CounterMetricFamily("vsphere_av_scans_finished", "VM scans finished, by result.",
                                   labels=["result"])
        for r in finished:
            done.add_metric([r["status"]], r["n"])
        yield done
        nbytes = CounterMetricFamily("vsphere_av_read_bytes", "Bytes read from VMs, by path.",
                                     labels=["path"])
        files = CounterMetricFamily("vsphere_av_read_files", "Files read from VMs, by path.",
                                    labels=["path"])
        for via in (VIA_GUEST, VIA_DISK):
            row = read.get(via)
            nbytes.add_metric([via], row["bytes"] if row else 0)
            files.add_metric([via], row["files"] if row else 0)
        yield nbytes
        yield files
        detections = CounterMetricFamily("vsphere_av_detections",
                                         "Detections, by action taken.", labels=["action"])
        for r in found:
            detections.add_metric([r["action"]], r["n"])
        yield detections

    def _controller(self) -> Iterator[Metric]:
        from vsphere_av.store.jobs import JobStore

        with JobStore.open(self.settings.state_dir) as jobs:
            exposures = jobs.exposures()
            alive = jobs.controller_alive()
            hosts = jobs.hosts()
        windows = sorted(e.window for e in exposures if e.window is not None)
        buckets = [(str(b), sum(1 for w in windows if w <= b)) for b in EXPOSURE_BUCKETS]
        buckets.append(("+Inf", len(windows)))
        yield HistogramMetricFamily(
            "vsphere_av_exposure_window_seconds",
            "Seconds a stale VM ran before isolation or a clean verdict.",
            buckets=buckets, sum_value=sum(windows))
        yield GaugeMetricFamily("vsphere_av_controller_up", "1 while a controller runs.",
                                value=int(alive))
        queued = GaugeMetricFamily("vsphere_av_queue_depth", "Scans queued, per host.",
                                   labels=["host"])
        active = GaugeMetricFamily("vsphere_av_active_scans", "Scans running, per host.",
                                   labels=["host"])
        for h in hosts:
            queued.add_metric([h.name or h.moref], h.queued if alive else 0)
            active.add_metric([h.name or h.moref], h.active_scans if alive else 0)
        yield queued
        yield active

    def _appliances(self) -> Iterator[Metric]:
        from vsphere_av.fleet.health import read_health

        down = read_health(self.settings.state_dir)
        yield GaugeMetricFamily("vsphere_av_appliances_enabled", "1 when [appliances] is on.",
                                value=int(self.settings.appliances.enabled))
        gauge = GaugeMetricFamily("vsphere_av_appliance_down",
                                  "1 for each host whose appliance was last seen down.",
                                  labels=["host"])
        for host in sorted(down):
            gauge.add_metric([host], 1)
        yield gauge

    def _signatures(self) -> Iterator[Metric]:
        from vsphere_av.engine.signatures import SignatureStore

        store = SignatureStore(state_dir=self.settings.state_dir)
        version = store.active_version()
        yield GaugeMetricFamily("vsphere_av_signature_version", "The active signature version.",
                                value=version or 0)
        if version:
            imported = datetime.fromisoformat(store.info(version).imported_at).timestamp()
            yield GaugeMetricFamily("vsphere_av_signature_age_seconds",
                                    "Seconds since the active version was imported.",
                                    value=max(0.0, self.clock() - imported))

    def _audit(self) -> Iterator[Metric]:
        from vsphere_av.store.audit import SIEM_CURSOR_FILE, AuditLog

        with AuditLog.open(self.settings.state_dir) as log:
            head = log.head()[0]
        try:
            sent = int(json.loads((self.settings.state_dir / SIEM_CURSOR_FILE).read_text(
                encoding="utf-8"))["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            sent = 0
        yield GaugeMetricFamily("vsphere_av_audit_head", "Sequence number of the last audit "
                                "entry.", value=head)
        if self.settings.siem.target:
            yield GaugeMetricFamily("vsphere_av_audit_forward_lag_entries",
                                    "Audit entries not yet forwarded to the SIEM.",
                                    value=max(0, head - sent))


def render(*, settings: Settings) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(settings=settings))
    return generate_latest(registry), CONTENT_TYPE_LATEST
