"""The appliance fleet: one hardened appliance per ESXi host.

``plan`` (pure: what to deploy, fix, remove, upgrade), ``manager`` (applying it, signature
pushes, upgrades), ``health`` (engine checks, ``health.json``), ``routing`` (which appliance
scans which host's VMs, read once per reconcile), ``image`` (the OVF/OVA a deploy imports),
``ssh`` (the appliances' management channel).
"""
