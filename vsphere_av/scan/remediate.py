"""Remediation: what is done about infected files and infected VMs, and the tag that says so.

Called by ``scan.job`` (a job's :class:`Remediation`: the policy's quarantine / delete /
report on each infected file, and the completion of detections a dead run left
``pending``) and by ``app.App``, whose thin methods pass its collaborators in
(:func:`sync_tag`, :func:`resync_tags`, :func:`isolate_infected`, :func:`remediation_via`;
the CLI, the API and the controller call those through ``App``). Calls only its
collaborators, all keyword-only: the guest access that changes files
(``scan.sources.guest.GuestAccess``), the ``Quarantine``, the ``StateStore``, the audit log,
the tagging adapter (``vsphere.tagging.Tagging``) and a network cut (``App`` builds it on
``controller.cut_network``). No pyVmomi, no threads.

Crash safety (write-ahead): the job makes a detection's audit entry and its store row (action
``pending``) durable before :meth:`Remediation.act` changes the guest; the outcome then
updates the row and adds the ``remediation`` entry. A run killed in between leaves a pending
row that the VM's next scan finishes exactly once (:meth:`Remediation.recover`).

Remediation never decides a scan's verdict: a failed quarantine is a detection whose action
is ``failed``, and tagging or isolation trouble is audited and logged, never raised into a
scan's outcome.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from vsphere_av import errors
from vsphere_av.config import ScanPolicy
from vsphere_av.models import INFECTED, Audit, GuestFile, VmInfo
from vsphere_av.scan.sources.guest import GuestAccess
from vsphere_av.store.state import PENDING

if TYPE_CHECKING:
    from vsphere_av.scan.job import ScanResult

log = logging.getLogger(__name__)

NOT_NOW = "guest operations are not available"


def remediation_plan(action: str, fallback: str) -> tuple[str, ...]:
    """Actions to try in order: the policy's action, then its fallback when different."""
    plan = [action]
    if fallback and fallback != action and action != "report":
        plan.append(fallback)
    return tuple(plan)


@dataclass(frozen=True)
class VmAudit:
    """Audit entries about one VM: each names the VM and its host, so storms can be checked
    afterwards (``scan.*``, ``detection``, ``remediation``, ``isolation.*``)."""

    log: Audit
    actor: str
    vm: VmInfo

    def __call__(self, event: str, /, **details: Any) -> None:
        vm = self.vm
        base = {"vm": vm.name, "moref": vm.moref, "host": vm.host.name if vm.host else "",
                "host_moref": vm.host.moref if vm.host else ""}
        self.log.append(actor=self.actor, action=event, details={**base, **details})


class Remedy(NamedTuple):
    """What was done about one infected file."""

    action: str                 # reported | quarantined | deleted | failed | pending
    quarantine_id: str = ""
    detail: str = ""            # why the policy's first action did not do it, or what waits


# --- infected files (one scan job) -----------------------------------------------------------

class Remediation:
    """One scan job's remediation of one VM's infected files.

    ``source`` is the job's file source: it changes the files itself unless it names
    another guest access in ``remediation`` (a disk reader: the VM's Guest Operations, or
    None when nothing can be changed now, with ``remediation_pending`` saying when it will
    be). Quarantine copies take the job's transfer ``slot`` (one transfer per VM at a time).
    """

    def __init__(self, *, vm: VmInfo, source: GuestAccess, policy: ScanPolicy, store: Any,
                 quarantine: Any, audit: VmAudit, slot: threading.Lock,
                 max_file_size: int) -> None:
        self.vm, self.source, self.policy, self.store = vm, source, policy, store
        self.quarantine, self.audit, self.slot = quarantine, audit, slot
        self.max_file_size = max_file_size
        self.guest: GuestAccess | None = getattr(source, "remediation", source)

    def act(self, entry: GuestFile, *, sha256: str, size: int, threat: str) -> Remedy:
        """Try the policy's action then its fallback; each attempt is audited.

        With no guest access to change files now (a disk scan of a VM that is off or has no
        guest credentials), the detection stays ``pending`` (``reported`` when the policy
        only reports) with the source's ``remediation_pending`` as its detail: the VM is
        infected, so its next guest scan finds the file and completes that row.
        """
        if self.guest is None:
            later = str(getattr(self.source, "remediation_pending", "") or NOT_NOW)
            action = "reported" if self.policy.action == "report" else PENDING
            self.audit("remediation", path=entry.path, action=self.policy.action,
                       result=action, detail=later, threat=threat, sha256=sha256)
            return Remedy(action, "", later)
        guest = self.guest
        failures: list[str] = []
        for act in remediation_plan(self.policy.action, self.policy.fallback_action):
            try:
                if act == "report":
                    self.audit("remediation", path=entry.path, action="report",
                               result="reported", threat=threat, sha256=sha256)
                    return Remedy("reported", "", "; ".join(failures))
                if act == "quarantine":
                    qid = self._quarantine(entry, guest, sha256=sha256, size=size, threat=threat)
                    self.audit("remediation", path=entry.path, action="quarantine",
                               result="quarantined", quarantine_id=qid, threat=threat,
                               sha256=sha256)
                    return Remedy("quarantined", qid, "; ".join(failures))
                if act == "delete":
                    guest.delete_file(entry.path)
                    self.audit("remediation", path=entry.path, action="delete",
                               result="deleted", threat=threat, sha256=sha256)
                    return Remedy("deleted", "", "; ".join(failures))
            except errors.VsphereAvError as exc:
                failures.append(f"{act} failed: {exc}")
                self.audit("remediation", path=entry.path, action=act, result="failed",
                           error=str(exc), threat=threat, sha256=sha256)
        return Remedy("failed", "", "; ".join(failures))

    def _quarantine(self, entry: GuestFile, guest: GuestAccess, *, sha256: str, size: int,
                    threat: str) -> str:
        """Copy the file's bytes into the quarantine, check they are the scanned ones, delete it."""
        with self.slot:
            download = guest.open_download(entry.path)
            try:
                item = self.quarantine.put(
                    download.chunks(), vm_moref=self.vm.moref, vm_name=self.vm.name,
                    guest_path=entry.path, threat=threat, is_windows=self.vm.is_windows,
                    permissions=entry.permissions, max_size=max(self.max_file_size, size))
            finally:
                download.close()
        if item.sha256 != sha256:
            self.quarantine.discard(item.id)
            raise errors.GuestError(f"{entry.path} changed between scan and quarantine")
        try:
            guest.delete_file(entry.path)
        except errors.VsphereAvError:
            self.quarantine.discard(item.id)
            raise
        return str(item.id)

    def recover(self, *, scan_id: Any, walked: bool) -> Iterator[Any]:
        """Finish detections a run that died mid-remediation left ``pending``; yields each
        one as it is finished (its row updated, its ``remediation`` entry written).

        Only a file known to be gone from the guest is settled here (asked with the guest's
        ``stat`` when it has one; otherwise, after a complete walk that did not meet it):
        ``quarantined`` when the quarantine holds its bytes, else ``deleted`` (the policy
        deletes) or ``failed``. A file still in the guest is found again by the walk and
        completed there (the quarantine hands back the item it already holds, so there is
        never a second one). Detections of scan ``scan_id`` (this run's) are left alone.
        """
        if self.guest is None:
            return          # nothing can be settled without the guest: its next scan will
        stat = getattr(self.guest, "stat", None)
        for det in self.store.pending_detections(self.vm.moref):
            if det.scan_id == scan_id:
                continue
            item = next((q for q in self.quarantine.items()
                         if q.vm_moref == self.vm.moref and q.guest_path == det.path
                         and q.sha256 == det.sha256 and not q.restored_at), None)
            if _still_there(det.path, stat, walked=walked):
                continue
            if item is not None:
                action, qid = "quarantined", str(item.id)
                result = "quarantined (recovered after restart)"
                detail = "recovered after restart: the bytes are in the quarantine"
            elif "delete" in remediation_plan(self.policy.action, self.policy.fallback_action):
                action, qid = "deleted", ""
                result = "deleted (recovered after restart)"
                detail = "recovered after restart: the file is no longer in the guest"
            else:
                action, qid = "failed", ""
                result = "gone (recovered after restart)"
                detail = ("remediation interrupted by a restart; the file is no longer in the "
                          "guest and its bytes were not kept")
            if not self._audited(det, qid):
                self.audit("remediation", path=det.path, action=self.policy.action,
                           result=result, quarantine_id=qid, threat=det.threat,
                           sha256=det.sha256, detection_id=det.id, scan_id=det.scan_id)
            self.store.finish_detection(det.id, action=action, detail=detail, quarantine_id=qid)
            self.store.forget_file(self.vm.moref, det.path)
            yield det

    def _audited(self, det: Any, qid: str) -> bool:
        """True when the dead run got as far as its remediation entry (only the row is missing)."""
        entries = getattr(self.audit.log, "entries", None)
        if entries is None or not qid:
            return False
        return any(e.action == "remediation" and e.details.get("moref") == self.vm.moref
                   and e.details.get("path") == det.path
                   and e.details.get("quarantine_id") == qid for e in entries())


def _still_there(path: str, stat: Callable[[str], Any] | None, *, walked: bool) -> bool:
    """False only when the file is known to be gone from the guest."""
    if stat is None:
        return not walked                 # a complete walk that did not meet it: gone
    try:
        return stat(path) is not None
    except (errors.GuestLoginError, errors.GuestUnavailable):
        raise
    except errors.GuestError:
        return True                       # cannot tell: leave it for a later scan


# --- infected VMs: the route, the network, the tag -------------------------------------------

def remediation_via(vm: VmInfo, *, via: str, credentials: bool, store: Any) -> str | None:
    """``"guest"`` for a running VM with guest credentials whose detections wait for Guest
    Operations; None otherwise (``via``, the configured ``scan.via``, decides).

    A disk scan found them while the VM was off: its scan after power-on is the one that
    quarantines, so when its tools are not running yet it waits for them (the job is retried)
    instead of reading the disks again under a snapshot and leaving the files in place.
    """
    if via != "auto" or not vm.powered_on:
        return None
    return "guest" if credentials and store.pending_detections(vm.moref) else None


class NetworkCut(Protocol):
    """Cuts every vNIC of a VM under the controller's one isolation record and holds it
    (``App`` builds it on ``controller.cut_network`` and ``JobStore.hold_isolation``).

    Returns (cut now, the previous NIC states, NICs edited); (False, [], 0) when the VM is
    isolated already. Raises ``errors.VsphereAvError`` when it could not.
    """

    def __call__(self, vm: VmInfo, *, reason: str,
                 held: str) -> tuple[bool, list[dict[str, Any]], int]: ...


def isolate_infected(vm: VmInfo, result: ScanResult, *, enabled: bool, cut: NetworkCut,
                     audit: Audit, actor: str) -> None:
    """Cut the vNICs of a powered-off VM a disk scan found infected, before it boots.

    Nothing happens unless the scan found something (``result.found``) and the VM is off,
    nor when ``enabled`` (``scan.isolate_stale``) is false. The isolation is
    held for the detection, so ``isolation.release_infected`` decides its release exactly as
    for a VM isolated at power-on. A cut that fails is audited (``isolation.failed``) and
    named in ``result.reason``; the verdict stays.
    """
    if not enabled or not result.found or vm.powered_on:
        return
    trail = VmAudit(log=audit, actor=actor, vm=vm)
    reason = "infected (disk scan): cut off before it boots"
    try:
        done, before, changed = cut(vm, reason=reason,
                                    held=f"detection (disk scan {result.scan_id})")
    except errors.VsphereAvError as exc:
        log.warning("%s: network not cut: %s", vm.name, exc)
        trail("isolation.failed", reason=reason, error=str(exc), scan_id=result.scan_id)
        result.reason += f"; network not cut: {exc}"
        return
    trail("isolation.isolate" if done else "isolation.keep", reason=reason,
          trigger="disk scan", scan_id=result.scan_id, changed=changed,
          nics=[n.get("label", n.get("key")) for n in before])


class TaggingPort(Protocol):
    """The infected tag on VMs (``vsphere.tagging.Tagging``)."""

    def mark(self, vm_moref: str, *, infected: bool) -> bool: ...
    def put(self, vm_moref: str, *, infected: bool) -> None: ...
    def tagged_vms(self) -> set[str]: ...


@dataclass
class TagFailures:
    """The tagging failure last audited as ``tag.failed`` ("" while tagging works): one
    entry per run of the same failure, not one per VM. One per ``App``."""

    reason: str = ""


def sync_tag(vm: VmInfo, *, tagging: TaggingPort | None, store: Any, audit: Audit, actor: str,
             label: str, failures: TagFailures) -> None:
    """Make the VM carry the infected tag exactly while its recorded state is infected.

    Tagging trouble never changes a scan's outcome: it is logged, audited once per run
    of failures (not once per VM), and the next scan or ``serve``'s resync tries again.
    ``tagging`` None: tagging is off.
    """
    if tagging is None:
        return
    state = store.vm_state(vm.moref)
    infected = state is not None and state.state == INFECTED
    try:
        changed = tagging.mark(vm.moref, infected=infected)
    except Exception as exc:
        _tagging_failed(exc, vm=vm.name, audit=audit, actor=actor, label=label,
                        failures=failures)
        return
    failures.reason = ""
    if changed:
        _tag_changed(vm.name, vm.moref, infected, audit=audit, actor=actor, label=label)


def resync_tags(*, tagging: TaggingPort | None, store: Any, audit: Audit, actor: str, label: str,
                failures: TagFailures) -> dict[str, int]:
    """Compare the tag with every known VM's state in one pass; fix what differs.

    ``serve`` runs it every ``tagging.resync_interval``: it repairs what a failed
    tagging call left behind and tags someone removed or added by hand. Raises
    ``errors.VsphereError`` when tagging fails (audited as for :func:`sync_tag`).
    """
    if tagging is None:
        return {"attached": 0, "detached": 0}
    try:
        tagged = tagging.tagged_vms()
        counts = {"attached": 0, "detached": 0}
        for state in store.vm_states():
            infected = state.state == INFECTED
            if infected != (state.moref in tagged):
                tagging.put(state.moref, infected=infected)
                _tag_changed(state.name, state.moref, infected, audit=audit, actor=actor,
                             label=label)
                counts["attached" if infected else "detached"] += 1
    except Exception as exc:
        _tagging_failed(exc, vm="", audit=audit, actor=actor, label=label, failures=failures)
        raise errors.VsphereError(f"tag resync: {exc}") from exc
    failures.reason = ""
    return counts


def _tag_changed(name: str, moref: str, infected: bool, *, audit: Audit, actor: str,
                 label: str) -> None:
    audit.append(actor=actor, action="tag.attached" if infected else "tag.detached",
                 details={"vm": name, "moref": moref, "tag": label})


def _tagging_failed(exc: Exception, *, vm: str, audit: Audit, actor: str, label: str,
                    failures: TagFailures) -> None:
    reason = (str(exc) if isinstance(exc, errors.VsphereAvError)
              else f"internal error: {exc!r}")
    log.warning("tagging %s failed: %s", vm or "(resync)", reason)
    if reason != failures.reason:       # once per run of the same failure
        failures.reason = reason
        audit.append(actor=actor, action="tag.failed", details={
            "vm": vm, "tag": label, "reason": reason})
