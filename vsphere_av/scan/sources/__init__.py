"""Where a scan's files come from, each source in the shape of ``guest.GuestAccess``:
``guest`` (the Guest Operations source's interface and the per-VM transfer pipeline the scan
job uses for every source) and ``disk`` (the VM's virtual disks, read with ``diskimage``;
``rangefile.RangeFile`` carries datastore range reads).

The disk reader's names below are imported on first use (PEP 562): the Dissect libraries
behind them take about a second to load, and guest scans (every ``scan.job``) never need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_LAZY = {
    "DiskFile": "diskimage", "DiskFiles": "diskimage", "DiskLimits": "diskimage",
    "FileStream": "diskimage", "VirtualDisk": "diskimage", "Volume": "diskimage",
    "open_virtual_disk": "diskimage", "RangeFile": "rangefile", "RangeFileStats": "rangefile",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
