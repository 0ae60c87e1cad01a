"""Where a scan's files come from: ``disk`` reads them from the VM's virtual disks
(``rangefile.RangeFile`` carries datastore range reads); ``remote_disk`` has the VM's host
appliance read them (``disk_service`` is the appliance's side); the guest operations source
stays in ``vsphere_av.scan.job`` / ``vsphere.guest`` for now.
"""

from vsphere_av.scan.sources.diskimage import (
    DiskFile,
    DiskFiles,
    DiskLimits,
    FileStream,
    VirtualDisk,
    Volume,
    open_virtual_disk,
)
from vsphere_av.scan.sources.rangefile import RangeFile, RangeFileStats

__all__ = [
    "DiskFile",
    "DiskFiles",
    "DiskLimits",
    "FileStream",
    "RangeFile",
    "RangeFileStats",
    "VirtualDisk",
    "Volume",
    "open_virtual_disk",
]
