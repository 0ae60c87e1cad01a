"""What a vSphere administrator does by hand, for the demo and the benchmarks.

Called by ``vsphere_av.lab.demo`` and ``bench/``; never by the product's own protection path.
Calls pyVmomi through ``Connection``. Each function waits for its task.
"""

from __future__ import annotations

from pyVmomi import vim

from vsphere_av.vsphere.connection import Connection
from vsphere_av.vsphere.tasks import wait_task


def power_on(conn: Connection, vm_moref: str) -> None:
    """Power a VM on (as someone in the vSphere Client would)."""
    ref = conn.ref("VirtualMachine", vm_moref)
    wait_task(conn, conn.call("power on", lambda _c: ref.PowerOnVM_Task()), f"power on {vm_moref}")


def power_off(conn: Connection, vm_moref: str) -> None:
    """Power a VM off."""
    ref = conn.ref("VirtualMachine", vm_moref)
    wait_task(conn, conn.call("power off", lambda _c: ref.PowerOffVM_Task()),
              f"power off {vm_moref}")


def set_guest_id(conn: Connection, vm_moref: str, guest_id: str) -> None:
    """Change the guest OS type (for example ``windows9_64Guest``)."""
    ref = conn.ref("VirtualMachine", vm_moref)
    spec = vim.vm.ConfigSpec(guestId=guest_id)
    wait_task(conn, conn.call("reconfigure", lambda _c: ref.ReconfigVM_Task(spec=spec)),
              f"set guest OS of {vm_moref}")
