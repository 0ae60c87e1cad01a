"""``vsphere-av vcsim``: run the bundled vSphere simulator in the foreground.

Registered by ``cli/__init__.py``; calls ``lab.simulator``.
"""

from __future__ import annotations

import sys

import click


@click.command("vcsim")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT (port 0: a free port).")
@click.option("--datacenters", type=int, default=1, show_default=True,
              help="Number of datacenters.")
@click.option("--clusters", type=int, default=1, show_default=True, help="Clusters per datacenter.")
@click.option("--hosts", type=int, default=3, show_default=True, help="Hosts per cluster.")
@click.option("--vms", type=int, default=2, show_default=True, help="VMs per cluster.")
@click.option("--username", default="user", show_default=True, help="vCenter login user.")
@click.option("--password", default="pass", show_default=True, help="vCenter login password.")
@click.option("--guest-root", type=click.Path(file_okay=False), default=None,
              help="One guest file tree per VM (<root>/<VM name>/); default: a temporary one.")
@click.option("--guest-user", default="root", show_default=True,
              help="The guest account every VM accepts.")
@click.option("--guest-password", default="vmware", show_default=True, help="Its password.")
@click.option("--disks", is_flag=True, default=False,
              help="Give every VM a real disk image built from its guest tree.")
def vcsim_command(listen: str, datacenters: int, clusters: int, hosts: int, vms: int,
                  username: str, password: str, guest_root: str | None, guest_user: str,
                  guest_password: str, disks: bool) -> None:
    """Run the bundled vSphere simulator in the foreground (first line: the SDK URL)."""
    from pathlib import Path

    from vsphere_av.lab import simulator

    argv = simulator.command_line(
        listen=listen, datacenters=datacenters, clusters=clusters, hosts=hosts, vms=vms,
        username=username, password=password,
        guest_root=Path(guest_root) if guest_root else None,
        guest_user=guest_user, guest_password=guest_password, disks=disks,
    )
    sys.stdout.flush()
    simulator.exec_foreground(argv)
