"""vsphere-av: agentless antivirus for VMware vSphere."""

__version__ = "0.1.0"
