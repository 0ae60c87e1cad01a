"""The vSphere adapter: the only package that imports pyVmomi.

``connection`` (session, TLS trust, re-login), ``inventory`` (VMs and hosts as models),
``guest`` (guest file operations and transfers), ``disks`` (virtual disks, scan snapshots,
datastore range reads on a VM's host), ``faults`` (fault translation); later
modules (``watching``, ``appliances``) reuse ``connection.Connection.call``. Everything
returned is a ``vsphere_av.models`` dataclass or a moref string, never a live vim object.
"""
