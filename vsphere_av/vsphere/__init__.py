"""The vSphere adapter: the only package that imports pyVmomi or the Automation SDK.

``connection`` (session, TLS trust, re-login), ``faults`` (fault translation into
``errors``), ``tasks`` (waiting on tasks), ``inventory`` (VMs and hosts as models),
``guest`` (guest file operations and transfers), ``disks`` (virtual disks, scan snapshots,
datastore range reads on a VM's host), ``watching`` (property collector and event tail),
``isolation`` (vNIC cut and restore), ``tagging`` (vSphere tags, Automation SDK),
``appliances`` (deploying and configuring the appliance VMs) and ``lab`` (simulator-only
helpers for the demo and tests). Everything returned is a ``vsphere_av.models`` dataclass or a
moref string, never a live vim object.
"""
