"""Settings: TOML + environment, secrets never shown, bad input is one clear error."""

from __future__ import annotations

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
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(config_file=_write(tmp_path, toml), env={})


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
