"""Settings: TOML + environment, secrets never shown, bad input is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsphere_av import config
from vsphere_av.errors import ConfigError

THUMB = ":".join(["ab"] * 32)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_environment_overrides_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    cfg = _write(
        tmp_path, f'[vcenter]\nserver = "vc.lab:8443"\nuser = "u1"\npassword_file = "{pw}"\n'
    )
    s = config.load(config_file=cfg, env={"VSPHERE_AV_USER": "u2", "VSPHERE_AV_STATE_DIR": "/x"})
    assert (s.vcenter.server, s.vcenter.port, s.vcenter.user) == ("vc.lab", 8443, "u2")
    assert s.vcenter.password.reveal() == "from-file"
    assert s.state_dir == Path("/x")


def test_sdk_url_carries_credentials(tmp_path: Path) -> None:
    s = config.load(env={"VSPHERE_AV_SERVER": "https://user:p%40ss@127.0.0.1:4455/sdk"})
    assert (s.vcenter.server, s.vcenter.port, s.vcenter.user) == ("127.0.0.1", 4455, "user")
    assert s.vcenter.password.reveal() == "p@ss"


def test_secrets_never_show() -> None:
    s = config.load(env={"VSPHERE_AV_PASSWORD": "hunter2", "VSPHERE_AV_GUEST_PASSWORD": "g0"})
    assert "hunter2" not in repr(s)
    assert "g0" not in repr(s)
    assert "hunter2" not in str(s.vcenter.password)


def test_thumbprint_normalised_and_checked() -> None:
    s = config.load(env={"VSPHERE_AV_THUMBPRINT": THUMB})
    assert s.vcenter.thumbprint == THUMB.upper()
    with pytest.raises(ConfigError, match="32 colon-separated"):
        config.load(env={"VSPHERE_AV_THUMBPRINT": "AB:CD"})


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_insecure_only_when_asked(value: str, expected: bool) -> None:
    assert config.load(env={"VSPHERE_AV_INSECURE": value}).vcenter.insecure is expected


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[vcenter]\npassword = "x"\n', "inline passwords are not allowed"),
        ('[scan]\naction = "burn"\n', "scan.action must be one of"),
        ("[scan]\nper_host_limit = 0\n", "at least 1"),
        ('[scan]\nmax_file_size = "big"\n', "scan.max_file_size must be a whole number"),
        ('[tagging]\nenabled = "yes"\n', "tagging.enabled must be true or false"),
        ('[tagging]\ncategory = ""\n', "tagging.category must be 1 to 80 characters"),
        ("[tagging]\nresync_interval = 0\n", "tagging.resync_interval must be more than 0"),
        ('[tagging]\nenable = true\n', r"tagging: unknown setting\(s\): enable"),
        ("[scan]\nfoo = 1\n", "unknown setting"),
        ('[[guest.credentials]]\nuser = "a"\n', "needs vm"),
        ('[guest]\npassword_env = "NOPE_NOT_SET"\n', "NOPE_NOT_SET is not set"),
        ("[vcenter\n", "not valid TOML"),
        # Unknown sections and keys, with a "did you mean".
        ('[vcenter]\nthumbprnt = "x"\n',
         r"vcenter: unknown setting\(s\): thumbprnt \(did you mean thumbprint\?\)$"),
        ("[scan]\nmax_file_sise = 5\n", r"did you mean max_file_size\?\)$"),
        ("[scna]\naction = 'report'\n",
         r"unknown section\(s\): \[scna\] \(did you mean \[scan\]\?\)"),
        ('statedir = "/x"\n', r"unknown setting\(s\): statedir \(did you mean state_dir\?\)"),
        ("[appliances]\nssh_prot = 22\n", "did you mean ssh_port"),
        ("[controller]\nevent_pol = 1\n", "did you mean event_poll"),
        ('[[schedule]]\ncron = "0 2 * * *"\njiter = 5\n', r"schedule\[0\]: unknown.*jitter"),
        ('[guest]\npasword_file = "x"\n', "did you mean password_file"),
        # A section as a scalar, a key of the wrong type.
        ('vcenter = "x"\n', r"^config: vcenter must be a table \(\[vcenter\]\)"),
        ("state_dir = 5\n", "^config: state_dir must be a string$"),
        ("schedule = 5\n", r"schedule must be a list of tables \(\[\[schedule\]\]\)"),
        ("[scan]\ninclude = [1]\n", "scan.include must be a list of strings"),
        ("[engine]\nspool_threshold = 1.5\n", "engine.spool_threshold must be a whole number"),
        ("[controller]\nmax_attempts = 2.5\n", "controller.max_attempts must be a whole number"),
        ("[engine]\nalert_exceeds_max = 1\n", "engine.alert_exceeds_max must be true or false"),
        # Server URLs: bad port, bad brackets, no password in the file.
        ('[vcenter]\nserver = "https://h:99999/sdk"\n', "vcenter.server has a bad port"),
        ('[vcenter]\nserver = "https://[::1/sdk"\n', "vcenter.server has bad brackets"),
        ('[vcenter]\nserver = "h:99999"\n', "vcenter.server has a bad port"),
        ('[vcenter]\nserver = "h:0"\n', "vcenter.server has a bad port"),
        ('[vcenter]\nserver = "[::1"\n', "vcenter.server has bad brackets"),
        ('[vcenter]\nserver = "http://h/sdk"\n', "vcenter.server must be https://"),
        ('[vcenter]\nserver = "https://u:pw@h/sdk"\n', "vcenter.server must not carry a password"),
        ('[vcenter]\nthumbprint = "AB"\n', "vcenter.thumbprint must be a SHA-256"),
        # Sizes, ratios, depths, counts.
        ("[scan]\nmax_file_size = 0\n",
         "^config: scan.max_file_size must be a positive whole number$"),
        ("[engine]\nmax_file_size = -1\n", "engine.max_file_size must be a positive whole number"),
        ("[engine]\narchive_max_total_size = 0\n", "archive_max_total_size must be a positive"),
        ("[engine]\nspool_threshold = 0\n", "spool_threshold must be a positive"),
        ("[engine]\nmax_file_size = 2199023255553\n", "max_file_size must be at most"),
        ("[engine]\narchive_max_ratio = 0\n", "engine.archive_max_ratio must be at least 1"),
        ("[engine]\narchive_max_ratio = 100000\n", "archive_max_ratio must be at most 10000"),
        ("[engine]\narchive_max_depth = 0\n", "archive_max_depth must be at least 1"),
        ("[engine]\narchive_max_depth = 1000\n", "archive_max_depth must be at most 16"),
        ("[engine]\narchive_max_members = 0\n", "archive_max_members must be at least 1"),
        ("[engine]\ncache_max_entries = 0\n", "cache_max_entries must be at least 1"),
        ("[siem]\ninterval = 0\n", "siem.interval must be more than 0 seconds"),
        ("[controller]\nevent_poll = 0\n", "controller.event_poll must be more than 0"),
        ("[controller]\ncontainment_threads = 0\n", "containment_threads must be at least 1"),
        ("[scan]\ndisk_workers = -1\n", "^config: scan.disk_workers must be at least 0$"),
        ('[scan]\ndisk_workers = "2"\n', "scan.disk_workers must be a whole number"),
        ("[scan]\ndisk_workers = 1000\n", "scan.disk_workers must be at most 256"),
        ('[siem]\ntarget = "tcp://h:99999"\n', "siem.target"),
        # Roles name people: never everyone.
        ('[access]\nauditors = ["ALL"]\n', "access.auditors: 'ALL' is refused"),
        ('[access]\nsecurity_admins = "%ALL"\n', "access.security_admins: '%ALL' is refused"),
        ('[access]\nauditors = [" bob"]\n', "is not a user or %group name"),
        # The other sections, typed in config.py now.
        ("[appliances]\nssh_port = 70000\n", "appliances.ssh_port must be a TCP port"),
        ("[appliances]\ninterval = 0\n", "appliances.interval must be at least 1 second"),
        ('[[schedule]]\nname = "n"\n', r"schedule\[0\] needs cron"),
        ('[[schedule]]\ncron = "0 2 * * *"\nwindow = "10:00-10:00"\n',
         r"schedule\[0\].window must look like 22:00-06:00"),
        ('[[schedule]]\ncron = "0 2 * * *"\njitter = "soon"\n', "jitter must be a duration"),
        ("[controller]\ninstant_on_full = 1\n", "controller.instant_on_full must be true or false"),
        ('[[guest.credentials]]\nvm = "a"\n', r"guest.credentials\[0\] needs a user"),
        ('[[guest.credentials]]\nvm = "a"\nuser = "u"\npassword = "p"\n',
         "inline passwords are not allowed"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(config_file=_write(tmp_path, toml), env={})
    assert "\n" not in str(caught.value)


def test_file_not_in_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[scan]\naction = "report"\n', encoding="utf-16")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(it looks like UTF-16"):
        config.load(config_file=path, env={})
    path.write_bytes(b'[scan]\naction = "r\xe9port"\n')   # Latin-1
    with pytest.raises(ConfigError, match=r"is not UTF-8 text$"):
        config.load(config_file=path, env={})
    path.write_text('\ufeff[scan]\naction = "report"\n', encoding="utf-8")   # a BOM is fine
    assert config.load(config_file=path, env={}).scan.action == "report"


@pytest.mark.parametrize(("server", "message"), [
    ("https://h:99999/sdk", "VSPHERE_AV_SERVER has a bad port"),
    ("https://[::1/sdk", "VSPHERE_AV_SERVER has bad brackets"),
    ("ftp://h", "VSPHERE_AV_SERVER must be https://"),
])
def test_bad_server_from_the_environment(server: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(env={"VSPHERE_AV_SERVER": server})


@pytest.mark.parametrize(("server", "expected"), [
    ("vc.lab", ("vc.lab", 443, "")),
    ("vc.lab:8443", ("vc.lab", 8443, "")),
    ("[fd00::1]:8443", ("fd00::1", 8443, "")),
    ("fd00::1", ("fd00::1", 443, "")),
    ("https://admin@[fd00::1]:4455/sdk", ("fd00::1", 4455, "admin")),
])
def test_server_forms(tmp_path: Path, server: str, expected: tuple[str, int, str]) -> None:
    vc = config.load(config_file=_write(tmp_path, f'[vcenter]\nserver = "{server}"\n'),
                     env={}).vcenter
    assert (vc.server, vc.port, vc.user) == expected


def test_every_section_is_typed(tmp_path: Path) -> None:
    cfg = _write(tmp_path, """
[engine]
archive_max_depth = 16
[tagging]
resync_interval = 60
[appliances]
enabled = true
clusters = "C1"
addresses = ["127.0.0.11-127.0.0.12"]
[controller]
event_poll = 1
max_attempts = 3
[[schedule]]
cron = "0 2 * * *"
jitter = "15m"
window = "22:00-06:00"
[[schedule]]
name = "weekly"
cron = "0 3 * * 0"
full = false
""")
    s = config.load(config_file=cfg, env={})
    assert not hasattr(s, "extra")
    assert s.engine.archive_max_depth == 16
    assert s.tagging.resync_interval == 60.0
    assert (s.appliances.enabled, s.appliances.clusters) == (True, ("C1",))
    assert (s.controller.event_poll, s.controller.max_attempts) == (1.0, 3)
    assert [(x.name, x.jitter, x.window, x.full) for x in s.schedules] == [
        ("schedule-1", 900.0, "22:00-06:00", True), ("weekly", 0.0, "", False)]


def test_typed_sections_reach_their_readers() -> None:
    from vsphere_av.controller import ControllerOptions

    s = config.parse({"controller": {"event_poll": 2, "instant_on_full": True},
                      "appliances": {"name_prefix": "av-"},
                      "schedule": {"cron": "0 2 * * *", "window": "01:00-05:00"}}, env={})
    options = ControllerOptions.from_settings(s)
    assert (options.event_poll, options.instant_on_full, options.appliance_prefix) == (
        2.0, True, "av-")
    assert [(x.name, str(x.window)) for x in options.schedules] == [
        ("schedule-1", "01:00-05:00")]


@pytest.mark.parametrize("text", [
    b'\xff\xfe[\x00s\x00c\x00a\x00n\x00]\x00\n\x00',   # UTF-16 (little-endian, BOM)
    b"[scan\n",                                          # TOML syntax error
    b"[scan]\nmax_file_size = 0\n",                      # a value refused by the model
])
def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(text)
    env = {"VSPHERE_AV_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin",
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    cmd = [sys.executable, "-m", "vsphere_av", "--config", str(path), "audit", "verify"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("vsphere-av: error: config")
    assert done.stderr.count("\n") == 1, done.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(config_file=tmp_path / "nope.toml", env={})


def test_guest_credentials_by_pattern_and_folder(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        """
[guest]
user = "root"
password_env = "G_DEFAULT"
[[guest.credentials]]
vm = "win-*"
user = "Administrator"
password_env = "G_WIN"
[[guest.credentials]]
folder = "dc/vm/finance"
user = "fin"
password_env = "G_FIN"
""",
    )
    env = {"G_DEFAULT": "d", "G_WIN": "w", "G_FIN": "f"}
    g = config.load(config_file=cfg, env=env).guest
    assert [
        (u, p.reveal())
        for u, p in [
            g.for_vm(vm_name="win-01"),
            g.for_vm(vm_name="db", folder_path="/dc/vm/finance/sub"),
            g.for_vm(vm_name="db", folder_path="/dc/vm/financial"),
        ]
    ] == [("Administrator", "w"), ("fin", "f"), ("root", "d")]
