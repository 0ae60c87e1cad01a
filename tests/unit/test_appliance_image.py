"""The appliance image's pieces that run without booting it (issue 13).

The setup service's parsing of the OVF environment and the network file it writes, the
descriptor template the build fills, and the OVF properties the controller's deploy sets.
The boot itself is checked by ``make appliance-test`` (tests/appliance/boot_check.py).
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vsphere_av.config import ApplianceSettings
from vsphere_av.errors import ApplianceError
from vsphere_av.fleet import image as fleet_image
from vsphere_av.fleet import plan as ap

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "appliance" / "rootfs" / "usr" / "local" / "sbin" / "vsphere-av-setup"
TEMPLATE = ROOT / "appliance" / "appliance.ovf.in"
PLACEHOLDER = ROOT / "vsphere_av" / "data" / "appliance-placeholder.ovf"
OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"


@pytest.fixture(scope="module")
def setup() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("vsphere_av_setup", str(SETUP))
    spec = importlib.util.spec_from_loader("vsphere_av_setup", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def environment(props: dict[str, str]) -> str:
    items = "".join(f'<Property oe:key="{k}" oe:value="{v}"/>' for k, v in props.items())
    return ('<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" '
            'xmlns:oe="http://schemas.dmtf.org/ovf/environment/1">'
            f"<PropertySection>{items}</PropertySection></Environment>")


def test_the_environment_properties_are_read_by_key(setup: ModuleType) -> None:
    props = setup.parse_properties(environment({"guestinfo.ipaddress": " 10.1.2.3 ",
                                                "vsphere_av.engine_token": "t" * 20}))
    assert props == {"guestinfo.ipaddress": "10.1.2.3", "vsphere_av.engine_token": "t" * 20}
    assert setup.parse_properties("") == {}
    with pytest.raises(ET.ParseError):
        setup.parse_properties("<Environment")


def test_a_pem_survives_attribute_normalisation_and_base64(setup: ModuleType) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flattened = pem.decode().replace("\n", " ")        # what XML does to line breaks
    assert setup.pem(flattened, "key") == pem
    assert setup.pem(base64.b64encode(pem).decode(), "key") == pem
    for bad in ("not a certificate", "-----BEGIN X----- !!! -----END X-----"):
        with pytest.raises(ValueError, match="key"):
            setup.pem(bad, "key")


def test_the_network_file_is_static_or_dhcp(setup: ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "NETWORK_FILE", tmp_path / "net" / "10.network")
    monkeypatch.setattr(setup, "RESOLV", tmp_path / "run" / "resolv.conf")
    address = setup.network({"guestinfo.ipaddress": "192.0.2.10", "guestinfo.prefix": "26",
                             "guestinfo.gateway": "192.0.2.1",
                             "guestinfo.dns": "192.0.2.53, 192.0.2.54"})
    text = (tmp_path / "net" / "10.network").read_text()
    assert address == "192.0.2.10"
    assert "Address=192.0.2.10/26\n" in text
    assert "Gateway=192.0.2.1\n" in text
    assert "DHCP" not in text
    assert [line for line in text.splitlines() if line.startswith("DNS=")] == \
        ["DNS=192.0.2.53", "DNS=192.0.2.54"]
    assert (tmp_path / "run" / "resolv.conf").read_text() == \
        "nameserver 192.0.2.53\nnameserver 192.0.2.54\n"
    assert setup.network({"guestinfo.ipaddress": "192.0.2.11/24"}) == "192.0.2.11"
    assert setup.network({}) == ""
    assert "DHCP=ipv4\n" in (tmp_path / "net" / "10.network").read_text()
    with pytest.raises(ValueError, match=r"192\.0\.2\.300"):
        setup.network({"guestinfo.ipaddress": "192.0.2.300"})


def test_the_template_declares_every_property_the_setup_reads(setup: ModuleType) -> None:
    read = set(re_keys(SETUP.read_text()))
    declared = fleet_image.declared_properties(TEMPLATE.read_text())
    assert read
    assert read <= declared
    assert {ap.ADDRESS_KEY, fleet_image.SSH_KEY_PROPERTY, fleet_image.TOKEN_PROPERTY} <= declared
    assert fleet_image.declared_properties(PLACEHOLDER.read_text()) == {ap.ADDRESS_KEY}


def re_keys(source: str) -> list[str]:
    import re

    return re.findall(r'props(?:\.get\(|\[)"((?:guestinfo|vsphere_av)\.[a-z_]+)"', source)


def test_the_build_fills_the_template(tmp_path: Path) -> None:
    disk = tmp_path / "vsphere-av-appliance-9.9.9-disk1.vmdk"
    disk.write_bytes(b"x" * 1234)
    out = tmp_path / "a.ovf"
    subprocess.run([sys.executable, str(ROOT / "appliance" / "ovf.py"), "--template",
                    str(TEMPLATE), "--version", "9.9.9", "--disk", str(disk),
                    "--capacity", str(3 << 30), "--out", str(out)], check=True)
    root = ET.parse(out).getroot()
    file = root.find(f"{{{OVF_NS}}}References/{{{OVF_NS}}}File")
    assert file is not None
    assert file.get(f"{{{OVF_NS}}}href") == disk.name
    assert file.get(f"{{{OVF_NS}}}size") == "1234"
    hardware = root.find(f".//{{{OVF_NS}}}VirtualHardwareSection")
    assert hardware is not None
    assert hardware.get(f"{{{OVF_NS}}}transport") == "com.vmware.guestInfo"
    assert "@" not in out.read_text().split("-->", 1)[1]


def test_a_deploy_fills_the_controllers_key_and_token(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    settings = ApplianceSettings(ssh_key_file=str(key_file), engine_token_file=str(token_file))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    image = fleet_image.declared_properties(TEMPLATE.read_text())
    props = fleet_image.ovf_properties(settings, {ap.ADDRESS_KEY: "127.0.0.11"}, image)
    assert props == {ap.ADDRESS_KEY: "127.0.0.11",
                     fleet_image.SSH_KEY_PROPERTY: f"{public} vsphere-av-controller",
                     fleet_image.TOKEN_PROPERTY: "s3cret-token-0123456789"}
    placeholder = fleet_image.declared_properties(PLACEHOLDER.read_text())
    assert fleet_image.ovf_properties(settings, {ap.ADDRESS_KEY: "127.0.0.11"}, placeholder) == \
        {ap.ADDRESS_KEY: "127.0.0.11"}
    assert fleet_image.ovf_properties(ApplianceSettings(), {}, image) == {}
    key_file.write_text("garbage")
    with pytest.raises(ApplianceError):
        fleet_image.ovf_properties(settings, {}, image)


def test_without_a_certificate_the_appliance_makes_its_own(setup: ModuleType, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    written: dict[str, tuple[int, str]] = {}

    def write(path: Path, data: bytes, *, mode: int, group: str = "root") -> None:
        path.write_bytes(data)
        written[path.name] = (mode, group)

    monkeypatch.setattr(setup, "write", write)
    monkeypatch.setattr(setup, "ENGINE_DIR", tmp_path)
    fingerprint = setup.engine_tls({}, "192.0.2.10")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "tls.key").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert written == {"tls.key": (0o640, "vsphere-av"), "tls.crt": (0o644, "root")}
    # Kept across boots: a second run makes nothing new.
    assert setup.engine_tls({}, "192.0.2.10") == fingerprint
