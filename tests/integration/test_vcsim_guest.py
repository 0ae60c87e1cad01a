"""Integration tests for the simulator's guest operations (vcsim/guest*.go).

Drives build/vcsim with pyVmomi and requests: guest path mapping (Linux and Windows),
GuestFileManager with its faults, /guestFile transfers and the simulated
GuestProcessManager. One simulator process per module; every test uses its own paths.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from conftest import connect
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.lab import simulator

GUEST_USER = "root"
GUEST_PASSWORD = "vmware"
LINUX_VM, WINDOWS_VM, POWER_VM, TOOLS_VM = 0, 1, 2, 3


@dataclass
class Sim:
    """A running simulator (shared launcher) and a pyVmomi connection to it."""

    sim: simulator.Simulator
    si: vim.ServiceInstance

    @property
    def port(self) -> int:
        return self.sim.port

    @property
    def cert(self) -> Path:
        return self.sim.cert_file

    @property
    def guest_root(self) -> Path:
        return self.sim.guest_root

    @property
    def content(self) -> vim.ServiceInstanceContent:
        return self.si.RetrieveContent()

    def vms(self) -> list[vim.VirtualMachine]:
        view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return sorted(view.view, key=lambda v: v.name)
        finally:
            view.Destroy()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """One private simulator for this module (it changes power state and guest trees)."""
    try:
        running = simulator.start(
            guest_root=tmp_path_factory.mktemp("vcsim-guest"),
            hosts=1,
            vms=4,
            guest_user=GUEST_USER,
            guest_password=GUEST_PASSWORD,
        )
    except errors.SimulatorMissing as exc:
        pytest.fail(str(exc))
    try:
        si = SmartConnect(
            host=running.host,
            port=running.port,
            user=running.username,
            pwd=running.password,
            sslContext=running.ssl_context(),
        )
        s = Sim(running, si)
        win = s.vms()[WINDOWS_VM]
        WaitForTask(win.ReconfigVM_Task(spec=vim.vm.ConfigSpec(guestId="windows9_64Guest")))
        yield s
        Disconnect(si)
    finally:
        running.stop()


def auth(
    user: str = GUEST_USER, pwd: str = GUEST_PASSWORD
) -> vim.vm.guest.NamePasswordAuthentication:
    return vim.vm.guest.NamePasswordAuthentication(username=user, password=pwd)


def fm(sim: Sim) -> vim.vm.guest.FileManager:
    return sim.content.guestOperationsManager.fileManager


def pm(sim: Sim) -> vim.vm.guest.ProcessManager:
    return sim.content.guestOperationsManager.processManager


def vm_root(sim: Sim, vm: vim.VirtualMachine) -> Path:
    root = sim.guest_root / vm.name
    root.mkdir(parents=True, exist_ok=True)
    return root


def linux(sim: Sim) -> vim.VirtualMachine:
    return sim.vms()[LINUX_VM]


def windows(sim: Sim) -> vim.VirtualMachine:
    return sim.vms()[WINDOWS_VM]


def local_url(sim: Sim, url: str) -> str:
    """Replace the '*' host of a transfer URL with the simulator's address."""
    assert url.startswith("https://*:"), url
    return url.replace("*", "127.0.0.1", 1)


def download(sim: Sim, url: str) -> requests.Response:
    return requests.get(local_url(sim, url), verify=str(sim.cert), timeout=10)


def upload(sim: Sim, url: str, data: bytes) -> requests.Response:
    return requests.put(local_url(sim, url), data=data, verify=str(sim.cert), timeout=10)


def put_file(
    sim: Sim, vm: vim.VirtualMachine, path: str, data: bytes, overwrite: bool = False
) -> None:
    url = fm(sim).InitiateFileTransferToGuest(
        vm, auth(), path, vim.vm.guest.FileManager.FileAttributes(), len(data), overwrite
    )
    r = upload(sim, url, data)
    assert r.status_code == 200, r.text


def get_file(sim: Sim, vm: vim.VirtualMachine, path: str) -> bytes:
    info = fm(sim).InitiateFileTransferFromGuest(vm, auth(), path)
    r = download(sim, info.url)
    assert r.status_code == 200, r.text
    return r.content


def names(listing: vim.vm.guest.FileManager.ListFileInfo) -> list[str]:
    return [f.path for f in listing.files]


# --- preconditions -------------------------------------------------------------------


def test_fault_order_power_then_tools_then_login(sim: Sim) -> None:
    vm = sim.vms()[POWER_VM]
    m = fm(sim)
    with pytest.raises(vim.fault.InvalidGuestLogin) as e:
        m.ListFilesInGuest(vm, auth(pwd="wrong"), "/")
    assert e.value.msg
    with pytest.raises(vim.fault.InvalidGuestLogin):
        m.ListFilesInGuest(vm, auth(user="nobody"), "/")
    with pytest.raises(vim.fault.InvalidGuestLogin):
        m.ListFilesInGuest(vm, auth(user="", pwd=""), "/")
    with pytest.raises(vim.fault.InvalidGuestLogin):
        m.ListFilesInGuest(vm, vim.vm.guest.TicketedSessionAuthentication(ticket="x"), "/")
    WaitForTask(vm.PowerOffVM_Task())
    try:
        with pytest.raises(vim.fault.InvalidPowerState) as e:
            m.ListFilesInGuest(vm, auth(pwd="wrong"), "/")  # power state wins over login
        assert e.value.msg
        with pytest.raises(vim.fault.InvalidPowerState):
            pm(sim).StartProgramInGuest(
                vm, auth(), vim.vm.guest.ProcessManager.ProgramSpec(programPath="/bin/false")
            )
    finally:
        WaitForTask(vm.PowerOnVM_Task())
    assert m.ListFilesInGuest(vm, auth(), "/").remaining == 0


def test_tools_not_running_is_guest_operations_unavailable(sim: Sim) -> None:
    vm = sim.vms()[TOOLS_VM]
    off = vim.option.OptionValue(key="vcsim.tools.disabled", value="TRUE")
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[off])))
    assert vm.guest.toolsRunningStatus != "guestToolsRunning"
    with pytest.raises(vim.fault.GuestOperationsUnavailable) as e:
        fm(sim).ListFilesInGuest(vm, auth(pwd="wrong"), "/")  # tools win over login
    assert e.value.msg
    with pytest.raises(vim.fault.GuestOperationsUnavailable):
        pm(sim).ListProcessesInGuest(vm, auth())
    on = vim.option.OptionValue(key="vcsim.tools.disabled", value="FALSE")
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[on])))
    assert fm(sim).ListFilesInGuest(vm, auth(), "/").remaining == 0


# --- listing --------------------------------------------------------------------------


def test_list_paging_default_and_remaining(sim: Sim) -> None:
    vm = linux(sim)
    d = vm_root(sim, vm) / "paging"
    d.mkdir()
    for i in range(57):
        (d / f"f{i:03d}.txt").write_bytes(b"x" * i)
    m = fm(sim)
    page = m.ListFilesInGuest(vm, auth(), "/paging")
    assert len(page.files) == 50
    assert page.remaining == 7
    assert names(page) == [f"f{i:03d}.txt" for i in range(50)]
    page = m.ListFilesInGuest(vm, auth(), "/paging", index=50, maxResults=5)
    assert names(page) == [f"f{i:03d}.txt" for i in range(50, 55)]
    assert page.remaining == 2
    page = m.ListFilesInGuest(vm, auth(), "/paging", index=55, maxResults=5)
    assert len(page.files) == 2
    assert page.remaining == 0
    page = m.ListFilesInGuest(vm, auth(), "/paging", index=100)
    assert not page.files
    assert page.remaining == 0
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.ListFilesInGuest(vm, auth(), "/paging", index=-1)


def test_list_regex_types_and_posix_attributes(sim: Sim) -> None:
    vm = linux(sim)
    d = vm_root(sim, vm) / "attrs"
    (d / "sub").mkdir(parents=True)
    f = d / "a.exe"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    os.utime(f, (1_600_000_000, 1_600_000_100))
    (d / "b.txt").write_bytes(b"")
    (d / "link").symlink_to("a.exe")
    m = fm(sim)
    page = m.ListFilesInGuest(vm, auth(), "/attrs", matchPattern=r"\.exe$")
    assert names(page) == ["a.exe"]
    assert page.remaining == 0
    info = page.files[0]
    assert info.type == "file"
    assert info.size == 5
    a = info.attributes
    assert isinstance(a, vim.vm.guest.FileManager.PosixFileAttributes)
    assert a.permissions & 0o7777 == 0o640
    assert a.ownerId == os.getuid()
    assert a.groupId == os.getgid()
    assert int(a.modificationTime.timestamp()) == 1_600_000_100
    assert int(a.accessTime.timestamp()) == 1_600_000_000
    types = {x.path: x.type for x in m.ListFilesInGuest(vm, auth(), "/attrs").files}
    assert types == {"a.exe": "file", "b.txt": "file", "sub": "directory", "link": "symlink"}
    # A file path returns itself.
    one = m.ListFilesInGuest(vm, auth(), "/attrs/a.exe")
    assert names(one) == ["a.exe"]
    assert one.remaining == 0
    with pytest.raises(vim.fault.FileNotFound):
        m.ListFilesInGuest(vm, auth(), "/attrs/missing")
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.ListFilesInGuest(vm, auth(), "/attrs", matchPattern="(")
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.ListFilesInGuest(vm, auth(), "relative/path")


# --- transfers ------------------------------------------------------------------------


def test_download_streams_with_content_length_and_is_single_use(sim: Sim) -> None:
    vm = linux(sim)
    d = vm_root(sim, vm) / "dl"
    d.mkdir()
    data = os.urandom(300_000)
    (d / "blob.bin").write_bytes(data)
    info = fm(sim).InitiateFileTransferFromGuest(vm, auth(), "/dl/blob.bin")
    assert info.size == len(data)
    assert isinstance(info.attributes, vim.vm.guest.FileManager.PosixFileAttributes)
    m = re.fullmatch(r"https://\*:(\d+)/guestFile\?id=([A-Za-z]+)&token=([A-Za-z]+)", info.url)
    assert m, info.url
    assert int(m.group(1)) == sim.port
    r = download(sim, info.url)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(data))
    assert r.content == data
    assert download(sim, info.url).status_code == 404  # single use
    # The library's docker-backed "/guestFile/<path>" endpoint is closed.
    lib = f"https://*:{sim.port}/guestFile/dl/blob.bin?id=x&token=y"
    assert download(sim, lib).status_code == 404
    with pytest.raises(vim.fault.NotAFile):
        fm(sim).InitiateFileTransferFromGuest(vm, auth(), "/dl")
    with pytest.raises(vim.fault.FileNotFound):
        fm(sim).InitiateFileTransferFromGuest(vm, auth(), "/dl/nope")


def test_upload_exact_size_overwrite_and_attributes(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    (root / "ul").mkdir()
    m = fm(sim)
    attrs = vim.vm.guest.FileManager.PosixFileAttributes(permissions=0o600)
    url = m.InitiateFileTransferToGuest(vm, auth(), "/ul/new.txt", attrs, 5, False)
    assert re.fullmatch(r"https://\*:\d+/guestFile\?id=[A-Za-z]+&token=[A-Za-z]+", url)
    assert upload(sim, url, b"hello").status_code == 200
    target = root / "ul" / "new.txt"
    assert target.read_bytes() == b"hello"
    assert target.stat().st_mode & 0o777 == 0o600
    assert upload(sim, url, b"hello").status_code == 404  # single use
    # Wrong length: 400, nothing written.
    url = m.InitiateFileTransferToGuest(
        vm, auth(), "/ul/short.txt", vim.vm.guest.FileManager.FileAttributes(), 10, False
    )
    assert upload(sim, url, b"only7by").status_code == 400
    assert not (root / "ul" / "short.txt").exists()
    url = m.InitiateFileTransferToGuest(
        vm, auth(), "/ul/long.txt", vim.vm.guest.FileManager.FileAttributes(), 2, False
    )
    assert upload(sim, url, b"too long").status_code == 400
    assert sorted(p.name for p in (root / "ul").iterdir()) == ["new.txt"]  # no temp left
    # Overwrite respected.
    with pytest.raises(vim.fault.FileAlreadyExists):
        m.InitiateFileTransferToGuest(
            vm, auth(), "/ul/new.txt", vim.vm.guest.FileManager.FileAttributes(), 3, False
        )
    put_file(sim, vm, "/ul/new.txt", b"bye", overwrite=True)
    assert get_file(sim, vm, "/ul/new.txt") == b"bye"
    # The target changed between initiate and PUT: 409 when it appeared, 404 when its
    # directory went away; nothing is written either way.
    url = m.InitiateFileTransferToGuest(
        vm, auth(), "/ul/race.txt", vim.vm.guest.FileManager.FileAttributes(), 3, False
    )
    (root / "ul" / "race.txt").write_bytes(b"first")
    assert upload(sim, url, b"new").status_code == 409
    assert (root / "ul" / "race.txt").read_bytes() == b"first"
    (root / "ul" / "gone").mkdir()
    url = m.InitiateFileTransferToGuest(
        vm, auth(), "/ul/gone/x.txt", vim.vm.guest.FileManager.FileAttributes(), 3, False
    )
    (root / "ul" / "gone").rmdir()
    assert upload(sim, url, b"new").status_code == 404
    assert not (root / "ul" / "gone").exists()
    with pytest.raises(vim.fault.FileNotFound):  # parent missing
        m.InitiateFileTransferToGuest(
            vm, auth(), "/ul/no/such/x", vim.vm.guest.FileManager.FileAttributes(), 1, True
        )
    with pytest.raises(vim.fault.NotAFile):
        m.InitiateFileTransferToGuest(
            vm, auth(), "/ul", vim.vm.guest.FileManager.FileAttributes(), 1, True
        )


def test_tickets_die_when_the_vm_powers_off(sim: Sim) -> None:
    vm = sim.vms()[POWER_VM]
    (vm_root(sim, vm) / "t.txt").write_bytes(b"data")
    m = fm(sim)
    down = m.InitiateFileTransferFromGuest(vm, auth(), "/t.txt").url
    up = m.InitiateFileTransferToGuest(
        vm, auth(), "/u.txt", vim.vm.guest.FileManager.FileAttributes(), 1, True
    )
    WaitForTask(vm.PowerOffVM_Task())
    WaitForTask(vm.PowerOnVM_Task())
    assert download(sim, down).status_code == 404
    assert upload(sim, up, b"x").status_code == 404
    assert not (vm_root(sim, vm) / "u.txt").exists()
    assert get_file(sim, vm, "/t.txt") == b"data"  # fresh tickets work


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_transfers_stream_large_files_without_buffering(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    size = 128 * 1024 * 1024
    with (root / "big.bin").open("wb") as f:  # sparse: cheap to make, slow to buffer
        f.truncate(size)
    pid = sim.sim.process.pid
    before = peak_rss_mib(pid)
    info = fm(sim).InitiateFileTransferFromGuest(vm, auth(), "/big.bin")
    got = 0
    with requests.get(local_url(sim, info.url), verify=str(sim.cert), stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(size)
        for chunk in r.iter_content(1 << 20):
            got += len(chunk)
    assert got == size
    # Upload without Content-Length (chunked): the simulator counts the bytes itself.
    url = fm(sim).InitiateFileTransferToGuest(
        vm, auth(), "/big-up.bin", vim.vm.guest.FileManager.FileAttributes(), size, False
    )
    block = b"\xab" * (1 << 20)
    r = requests.put(
        local_url(sim, url),
        data=(block for _ in range(size // len(block))),
        verify=str(sim.cert),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert (root / "big-up.bin").stat().st_size == size
    assert peak_rss_mib(pid) - before < 64  # neither direction held the file in memory
    (root / "big.bin").unlink()
    (root / "big-up.bin").unlink()


def test_tickets_expire(
    vcsim_factory: Callable[..., simulator.Simulator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VCSIM_GUEST_TICKET_TTL", "1s")  # instead of 10 minutes
    running = vcsim_factory(hosts=1, vms=1, guest_user=GUEST_USER, guest_password=GUEST_PASSWORD)
    s = Sim(running, connect(running))
    vm = s.vms()[0]
    (vm_root(s, vm) / "f.txt").write_bytes(b"ttl")
    stale = fm(s).InitiateFileTransferFromGuest(vm, auth(), "/f.txt").url
    time.sleep(1.3)
    fresh = fm(s).InitiateFileTransferFromGuest(vm, auth(), "/f.txt").url
    assert download(s, stale).status_code == 404
    r = download(s, fresh)
    assert r.status_code == 200
    assert r.content == b"ttl"


# --- containment ----------------------------------------------------------------------


def test_dotdot_is_contained_in_the_vm_root(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    put_file(sim, vm, "/../../../escape.txt", b"in")
    assert (root / "escape.txt").read_bytes() == b"in"
    assert not (sim.guest_root / "escape.txt").exists()
    assert not (sim.guest_root.parent / "escape.txt").exists()
    top = names(fm(sim).ListFilesInGuest(vm, auth(), "/../..", maxResults=1000))
    assert "escape.txt" in top
    assert vm.name not in top
    fm(sim).MakeDirectoryInGuest(vm, auth(), "/a/../../b", False)
    assert (root / "b").is_dir()


def test_symlinks_pointing_outside_are_never_followed(sim: Sim, tmp_path: Path) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"host secret")
    outside_dir = tmp_path / "outdir"
    outside_dir.mkdir()
    (outside_dir / "inner.txt").write_bytes(b"inner")
    d = root / "esc"
    d.mkdir()
    (d / "to_secret").symlink_to(secret)
    (d / "to_dir").symlink_to(outside_dir)
    (d / "up").symlink_to("../../../..")
    (d / "ok").symlink_to("real.txt")
    (d / "real.txt").write_bytes(b"inside")
    m = fm(sim)
    listing = {f.path: f for f in m.ListFilesInGuest(vm, auth(), "/esc").files}
    assert listing["to_secret"].type == "symlink"
    assert listing["to_dir"].type == "symlink"
    assert listing["to_secret"].attributes.symlinkTarget == str(secret)
    # The link itself is listed, never what it points to.
    assert names(m.ListFilesInGuest(vm, auth(), "/esc/to_dir")) == ["to_dir"]
    for bad in ("/esc/to_secret", "/esc/to_dir/inner.txt", "/esc/up/etc/passwd"):
        with pytest.raises(vim.fault.GuestPermissionDenied):
            m.InitiateFileTransferFromGuest(vm, auth(), bad)
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.InitiateFileTransferToGuest(
            vm, auth(), "/esc/to_secret", vim.vm.guest.FileManager.FileAttributes(), 1, True
        )
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.InitiateFileTransferToGuest(
            vm, auth(), "/esc/to_dir/new.txt", vim.vm.guest.FileManager.FileAttributes(), 1, True
        )
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.ListFilesInGuest(vm, auth(), "/esc/to_dir/inner.txt")  # through a link: refused
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.ChangeFileAttributesInGuest(
            vm,
            auth(),
            "/esc/to_secret",
            vim.vm.guest.FileManager.PosixFileAttributes(permissions=0o777),
        )
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.MakeDirectoryInGuest(vm, auth(), "/esc/to_dir/x", True)
    with pytest.raises(vim.fault.GuestPermissionDenied):
        pm(sim).StartProgramInGuest(
            vm,
            auth(),
            vim.vm.guest.ProcessManager.ProgramSpec(programPath="/esc/to_secret", arguments=""),
        )
    # A link inside the tree works, for files and for directories.
    assert get_file(sim, vm, "/esc/ok") == b"inside"
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_bytes(b"deep")
    (d / "subdir").symlink_to("sub")
    assert names(m.ListFilesInGuest(vm, auth(), "/esc/subdir")) == ["deep.txt"]
    assert get_file(sim, vm, "/esc/subdir/deep.txt") == b"deep"
    (d / "loop").symlink_to("loop")
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.InitiateFileTransferFromGuest(vm, auth(), "/esc/loop")
    # Deleting or moving a link touches the link only.
    m.DeleteFileInGuest(vm, auth(), "/esc/to_secret")
    m.MoveFileInGuest(vm, auth(), "/esc/to_dir", "/esc/moved", False)
    assert secret.read_bytes() == b"host secret"
    assert (outside_dir / "inner.txt").read_bytes() == b"inner"
    assert secret.stat().st_mode & 0o777 != 0o777
    assert not (outside_dir / "x").exists()
    assert (d / "moved").is_symlink()
    assert not (d / "to_secret").exists()


# --- file operations ------------------------------------------------------------------


def test_directories_moves_deletes_and_faults(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    m = fm(sim)
    m.MakeDirectoryInGuest(vm, auth(), "/ops", False)
    with pytest.raises(vim.fault.FileAlreadyExists):
        m.MakeDirectoryInGuest(vm, auth(), "/ops", False)
    with pytest.raises(vim.fault.FileNotFound):
        m.MakeDirectoryInGuest(vm, auth(), "/ops/x/y/z", False)
    m.MakeDirectoryInGuest(vm, auth(), "/ops/x/y/z", True)
    assert (root / "ops/x/y/z").is_dir()
    put_file(sim, vm, "/ops/x/f.txt", b"one")
    put_file(sim, vm, "/ops/g.txt", b"two")
    with pytest.raises(vim.fault.NotAFile):
        m.DeleteFileInGuest(vm, auth(), "/ops/x")
    with pytest.raises(vim.fault.NotADirectory):
        m.DeleteDirectoryInGuest(vm, auth(), "/ops/g.txt", True)
    with pytest.raises(vim.fault.DirectoryNotEmpty):
        m.DeleteDirectoryInGuest(vm, auth(), "/ops/x", False)
    with pytest.raises(vim.fault.FileNotFound):
        m.DeleteFileInGuest(vm, auth(), "/ops/nope")
    with pytest.raises(vim.fault.FileNotFound):
        m.DeleteDirectoryInGuest(vm, auth(), "/ops/nope", False)
    # Files.
    with pytest.raises(vim.fault.FileAlreadyExists):
        m.MoveFileInGuest(vm, auth(), "/ops/g.txt", "/ops/x/f.txt", False)
    m.MoveFileInGuest(vm, auth(), "/ops/g.txt", "/ops/x/f.txt", True)
    assert (root / "ops/x/f.txt").read_bytes() == b"two"
    assert not (root / "ops/g.txt").exists()
    with pytest.raises(vim.fault.FileNotFound):
        m.MoveFileInGuest(vm, auth(), "/ops/g.txt", "/ops/h.txt", False)
    with pytest.raises(vim.fault.NotAFile):
        m.MoveFileInGuest(vm, auth(), "/ops/x", "/ops/h", False)
    m.MoveFileInGuest(vm, auth(), "/ops/x/f.txt", "/ops/h.txt", False)
    # Directories.
    m.MakeDirectoryInGuest(vm, auth(), "/ops/other", False)
    with pytest.raises(vim.fault.FileAlreadyExists):
        m.MoveDirectoryInGuest(vm, auth(), "/ops/x", "/ops/other")
    with pytest.raises(vim.fault.NotADirectory):
        m.MoveDirectoryInGuest(vm, auth(), "/ops/h.txt", "/ops/h2")
    with pytest.raises(vim.fault.FileNotFound):
        m.MoveDirectoryInGuest(vm, auth(), "/ops/none", "/ops/none2")
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.MoveDirectoryInGuest(vm, auth(), "/ops/x", "/ops/x/y/inside")
    m.MoveDirectoryInGuest(vm, auth(), "/ops/x", "/ops/renamed")
    assert (root / "ops/renamed/y/z").is_dir()
    assert not (root / "ops/x").exists()
    m.DeleteDirectoryInGuest(vm, auth(), "/ops/other", False)
    m.DeleteDirectoryInGuest(vm, auth(), "/ops/renamed", True)
    m.DeleteFileInGuest(vm, auth(), "/ops/h.txt")
    assert list((root / "ops").iterdir()) == []
    with pytest.raises(vim.fault.GuestPermissionDenied):
        m.DeleteDirectoryInGuest(vm, auth(), "/", True)
    assert root.is_dir()


# Names XML 1.0 cannot carry (vcsim/README.md, "Guest file names on the wire"): each such
# byte b is sent as U+F700+b, and so is each byte of a name's own U+F700..U+F7FF characters.
WIRE_NAMES = {
    b"esc\x1b[0m.com": "esc\uf71b[0m.com",
    b"bel\x07": "bel\uf707",
    b"bad\xff\xfe.com": "bad\uf7ff\uf7fe.com",
    b"cut\xc3(": "cut\uf7c3(",
    "private\uf701".encode(): "private\uf7ef\uf79c\uf781",
    "tab\tcr\r\u00e9\U0001f600".encode(): "tab\tcr\uf70d\u00e9\U0001f600",
}


def test_names_xml_cannot_carry_list_and_transfer_like_any_other(sim: Sim) -> None:
    vm = linux(sim)
    root = os.fsencode(vm_root(sim, vm) / "wire")
    os.makedirs(root, exist_ok=True)
    for i, raw in enumerate(WIRE_NAMES):
        with open(os.path.join(root, raw), "wb") as fh:
            fh.write(b"content %d" % i)
    m = fm(sim)
    listing = m.ListFilesInGuest(vm, auth(), "/wire", maxResults=100)
    assert sorted(names(listing)) == sorted(WIRE_NAMES.values())
    for i, wire in enumerate(WIRE_NAMES.values()):
        assert get_file(sim, vm, f"/wire/{wire}") == b"content %d" % i
        (entry,) = m.ListFilesInGuest(vm, auth(), f"/wire/{wire}").files
        assert entry.path == wire
    # a pattern matches the names as sent
    (hit,) = m.ListFilesInGuest(vm, auth(), "/wire", matchPattern="^esc\uf71b").files
    assert hit.path == WIRE_NAMES[b"esc\x1b[0m.com"]
    put_file(sim, vm, "/wire/new\uf71b.bin", b"up")
    with open(os.path.join(root, b"new\x1b.bin"), "rb") as fh:
        assert fh.read() == b"up"
    m.DeleteFileInGuest(vm, auth(), "/wire/bel\uf707")
    assert not os.path.exists(os.path.join(root, b"bel\x07"))
    tmp = m.CreateTemporaryFileInGuest(vm, auth(), "t\uf71b", "", "/wire")
    assert tmp.startswith("/wire/t\uf71b")
    assert os.path.exists(os.path.join(root, b"t\x1b" + os.fsencode(tmp)[len("/wire/t") + 3:]))


def test_temporary_files_and_directories(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    m = fm(sim)
    p = m.CreateTemporaryFileInGuest(vm, auth(), "scan-", ".tmp")
    assert re.fullmatch(r"/tmp/scan-\w+\.tmp", p), p
    assert (root / p.lstrip("/")).is_file()
    d = m.CreateTemporaryDirectoryInGuest(vm, auth(), "job", "")
    assert d.startswith("/tmp/job")
    assert (root / d.lstrip("/")).is_dir()
    inner = m.CreateTemporaryFileInGuest(vm, auth(), "x", "y", d)
    assert inner.startswith(d + "/x")
    assert inner.endswith("y")
    with pytest.raises(vim.fault.FileNotFound):
        m.CreateTemporaryFileInGuest(vm, auth(), "a", "b", "/no/such/dir")
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.CreateTemporaryFileInGuest(vm, auth(), "../evil", "")


def test_change_file_attributes(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    put_file(sim, vm, "/chattr.txt", b"abc")
    when = vim.vm.guest.FileManager.PosixFileAttributes(
        permissions=0o751,
        modificationTime=datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC),
        ownerId=os.getuid(),
        groupId=os.getgid(),
    )
    fm(sim).ChangeFileAttributesInGuest(vm, auth(), "/chattr.txt", when)
    st = (root / "chattr.txt").stat()
    assert st.st_mode & 0o7777 == 0o751
    assert int(st.st_mtime) == 1614834367
    info = fm(sim).ListFilesInGuest(vm, auth(), "/chattr.txt").files[0]
    assert info.attributes.permissions & 0o7777 == 0o751
    with pytest.raises(vim.fault.FileNotFound):
        fm(sim).ChangeFileAttributesInGuest(vm, auth(), "/nope", when)
    if os.getuid() != 0:
        with pytest.raises(vim.fault.GuestPermissionDenied):
            fm(sim).ChangeFileAttributesInGuest(
                vm, auth(), "/chattr.txt", vim.vm.guest.FileManager.PosixFileAttributes(ownerId=0)
            )


def test_clone_copies_the_guest_tree_with_modes_times_and_links(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    src = root / "clonesrc"
    (src / "sub").mkdir(parents=True)
    f = src / "sub" / "tool.sh"
    f.write_bytes(b"#!/bin/sh\n")
    f.chmod(0o751)
    os.utime(f, (1_500_000_000, 1_500_000_000))
    (src / "rel").symlink_to("sub/tool.sh")
    (src / "abs").symlink_to(f)  # absolute, inside the source tree
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=True)
    WaitForTask(vm.CloneVM_Task(folder=vm.parent, name="zz-guest-clone", spec=spec))
    clone = next(v for v in sim.vms() if v.name == "zz-guest-clone")
    croot = sim.guest_root / clone.name
    copied = croot / "clonesrc" / "sub" / "tool.sh"
    assert copied.read_bytes() == b"#!/bin/sh\n"
    assert copied.stat().st_mode & 0o7777 == 0o751
    assert int(copied.stat().st_mtime) == 1_500_000_000
    assert os.readlink(croot / "clonesrc" / "rel") == "sub/tool.sh"
    assert Path(os.readlink(croot / "clonesrc" / "abs")) == copied  # rewritten into the clone
    assert get_file(sim, clone, "/clonesrc/abs") == b"#!/bin/sh\n"
    # The clone's tree is its own.
    fm(sim).DeleteFileInGuest(clone, auth(), "/clonesrc/sub/tool.sh")
    assert f.exists()
    WaitForTask(clone.PowerOffVM_Task())
    WaitForTask(clone.Destroy_Task())


# --- Windows guests ------------------------------------------------------------------


def test_windows_paths_case_insensitive_and_attributes(sim: Sim) -> None:
    vm = windows(sim)
    root = vm_root(sim, vm)
    m = fm(sim)
    m.MakeDirectoryInGuest(vm, auth(), r"C:\Users\Scan Data", True)
    assert (root / "C" / "Users" / "Scan Data").is_dir()  # case preserved
    put_file(sim, vm, r"c:\USERS\scan data\Report.TXT", b"win")
    assert (root / "C" / "Users" / "Scan Data" / "Report.TXT").read_bytes() == b"win"
    assert get_file(sim, vm, "C:/users/SCAN DATA/report.txt") == b"win"
    listing = m.ListFilesInGuest(vm, auth(), r"C:\USERS\SCAN DATA")
    assert names(listing) == ["Report.TXT"]
    a = listing.files[0].attributes
    assert isinstance(a, vim.vm.guest.FileManager.WindowsFileAttributes)
    assert a.hidden is False
    assert a.readOnly is False
    assert a.createTime is not None
    assert a.modificationTime is not None
    info = m.InitiateFileTransferFromGuest(vm, auth(), r"C:\Users\Scan Data\Report.txt")
    assert isinstance(info.attributes, vim.vm.guest.FileManager.WindowsFileAttributes)
    m.ChangeFileAttributesInGuest(
        vm,
        auth(),
        r"C:\Users\Scan Data\REPORT.txt",
        vim.vm.guest.FileManager.WindowsFileAttributes(readOnly=True),
    )
    ro = m.ListFilesInGuest(vm, auth(), r"C:\Users\Scan Data\report.txt").files[0].attributes
    assert ro.readOnly is True
    # Case-only rename keeps one file with the new case.
    m.MoveFileInGuest(
        vm, auth(), r"C:\Users\Scan Data\Report.TXT", r"C:\Users\Scan Data\report.txt", False
    )
    assert [p.name for p in (root / "C/Users/Scan Data").iterdir()] == ["report.txt"]
    with pytest.raises(vim.fault.FileAlreadyExists):
        m.MakeDirectoryInGuest(vm, auth(), r"c:\users", False)
    with pytest.raises(vmodl.fault.InvalidArgument):
        m.ListFilesInGuest(vm, auth(), "/Users")  # Linux-style path in a Windows guest
    with pytest.raises(vim.fault.FileNotFound):
        m.ListFilesInGuest(vm, auth(), r"D:\nothing")
    tmp = m.CreateTemporaryFileInGuest(vm, auth(), "av", ".log")
    assert re.fullmatch(r"C:\\Windows\\Temp\\av\w+\.log", tmp), tmp
    assert (root / "C/Windows/Temp" / tmp.rsplit("\\", 1)[1]).is_file()
    put_file(sim, vm, r"C:\..\..\escape.txt", b"x")
    assert (root / "C" / "escape.txt").is_file()


# --- processes ------------------------------------------------------------------------


def spec(program: str, args: str = "") -> vim.vm.guest.ProcessManager.ProgramSpec:
    return vim.vm.guest.ProcessManager.ProgramSpec(programPath=program, arguments=args)


def proc_info(
    sim: Sim, vm: vim.VirtualMachine, pid: int
) -> vim.vm.guest.ProcessManager.ProcessInfo:
    (info,) = pm(sim).ListProcessesInGuest(vm, auth(), [pid])
    return info


def test_processes_exit_codes_terminate_and_listing(sim: Sim) -> None:
    vm = linux(sim)
    root = vm_root(sim, vm)
    p = pm(sim)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/scanner").write_bytes(b"#!/bin/sh\n")
    ok = p.StartProgramInGuest(vm, auth(), spec("/usr/bin/scanner", "--all /"))
    bad = p.StartProgramInGuest(vm, auth(), spec("/bin/false"))
    long = p.StartProgramInGuest(vm, auth(), spec("/bin/sleep", "60"))
    short = p.StartProgramInGuest(vm, auth(), spec("sleep", "0.5"))
    assert len({ok, bad, long, short}) == 4
    info = proc_info(sim, vm, ok)
    assert info.name == "scanner"
    assert info.owner == GUEST_USER
    assert info.cmdLine == "/usr/bin/scanner --all /"
    assert info.endTime is not None
    assert info.exitCode == 0
    assert info.startTime is not None
    assert proc_info(sim, vm, bad).exitCode == 1
    running = proc_info(sim, vm, long)
    assert running.endTime is None
    assert running.exitCode is None
    p.TerminateProcessInGuest(vm, auth(), long)
    done = proc_info(sim, vm, long)
    assert done.endTime is not None
    assert done.exitCode not in (None, 0)
    with pytest.raises(vim.fault.GuestProcessNotFound):
        p.TerminateProcessInGuest(vm, auth(), long)
    with pytest.raises(vim.fault.GuestProcessNotFound):
        p.TerminateProcessInGuest(vm, auth(), 999_999)
    assert (
        proc_info(sim, vm, p.StartProgramInGuest(vm, auth(), spec("sleep", "soon"))).exitCode == 1
    )
    time.sleep(0.7)
    assert proc_info(sim, vm, short).exitCode == 0
    every = {i.pid for i in p.ListProcessesInGuest(vm, auth())}
    assert {ok, bad, long, short} <= every
    assert [i.pid for i in p.ListProcessesInGuest(vm, auth(), [bad, 424242])] == [bad]
    with pytest.raises(vim.fault.FileNotFound):
        p.StartProgramInGuest(vm, auth(), spec("/bin/definitely-not-there"))
    with pytest.raises(vim.fault.FileNotFound):
        p.StartProgramInGuest(
            vm,
            auth(),
            vim.vm.guest.ProcessManager.ProgramSpec(
                programPath="/bin/false", arguments="", workingDirectory="/no/such/dir"
            ),
        )
    with pytest.raises(vim.fault.InvalidGuestLogin):
        p.StartProgramInGuest(vm, auth(pwd="nope"), spec("/bin/false"))


def test_processes_end_with_power_off_and_windows_programs(sim: Sim) -> None:
    vm = sim.vms()[POWER_VM]
    p = pm(sim)
    pid = p.StartProgramInGuest(vm, auth(), spec("/bin/sleep", "600"))
    WaitForTask(vm.PowerOffVM_Task())
    WaitForTask(vm.PowerOnVM_Task())
    assert p.ListProcessesInGuest(vm, auth(), [pid]) == []
    win = windows(sim)
    root = vm_root(sim, win)
    (root / "C/Windows/System32").mkdir(parents=True, exist_ok=True)
    (root / "C/Windows/System32/cmd.exe").write_bytes(b"MZ")
    wpid = p.StartProgramInGuest(win, auth(), spec(r"c:\windows\system32\CMD.EXE", "/c dir"))
    info = proc_info(sim, win, wpid)
    assert info.name == "CMD.EXE"
    assert info.exitCode == 0
    with pytest.raises(vim.fault.FileNotFound):
        p.StartProgramInGuest(win, auth(), spec(r"C:\Program Files\none.exe"))
