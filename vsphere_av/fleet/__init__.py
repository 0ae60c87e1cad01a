"""The appliance fleet: one hardened appliance per ESXi host (plan, manager, image, SSH)."""
