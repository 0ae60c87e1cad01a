"""One VM's scan, whatever the file source: the face of the ``scan`` package.

Called by ``app`` (``App.scan_one`` runs :func:`scan_vm`; its remediation and tag methods
call ``scan.remediate``) and the tests; other packages import from here. Inside:

- ``job``: :func:`scan_vm`, one VM's scan job, its :class:`ScanResult` and :class:`Progress`
  ticks, the scan statuses and :func:`protection_after`;
- ``filters``: the policy's path filters (:class:`Filters`, :func:`matches`; pure);
- ``remediate``: what is done about infected files (the job's ``Remediation``) and infected
  VMs (:func:`isolate_infected`, :func:`remediation_via`, the infected tag: :func:`sync_tag`,
  :func:`resync_tags`);
- ``sources``: where the files come from, in the shape of :class:`GuestAccess`:
  ``sources.guest`` (Guest Operations and the per-VM transfer pipeline) and ``sources.disk``
  (the VM's virtual disks; imported on use, it loads the Dissect libraries).

Layers: ``scan`` imports ``models``, ``config``, ``files``, ``engine`` and ``store``, never
``vsphere`` (pyVmomi), ``controller``, ``fleet`` or ``app``: the adapter objects it works
on come in as collaborators.
"""

from vsphere_av.scan.filters import Filters, matches, normalise
from vsphere_av.scan.job import (
    CLEAN,
    ERROR,
    FILES_KEPT,
    FOUND,
    INCOMPLETE,
    SKIPPED,
    UNREACHABLE_STATUS,
    Found,
    Progress,
    ScanResult,
    protection_after,
    scan_vm,
)
from vsphere_av.scan.remediate import (
    NetworkCut,
    TagFailures,
    TaggingPort,
    isolate_infected,
    remediation_plan,
    remediation_via,
    resync_tags,
    sync_tag,
)
from vsphere_av.scan.sources.guest import DownloadLike, GuestAccess

__all__ = [
    "CLEAN",
    "ERROR",
    "FILES_KEPT",
    "FOUND",
    "INCOMPLETE",
    "SKIPPED",
    "UNREACHABLE_STATUS",
    "DownloadLike",
    "Filters",
    "Found",
    "GuestAccess",
    "NetworkCut",
    "Progress",
    "ScanResult",
    "TagFailures",
    "TaggingPort",
    "isolate_infected",
    "matches",
    "normalise",
    "protection_after",
    "remediation_plan",
    "remediation_via",
    "resync_tags",
    "scan_vm",
    "sync_tag",
]
