"""``python -m vsphere_av`` runs the command line."""

from vsphere_av.cli import main

main()
