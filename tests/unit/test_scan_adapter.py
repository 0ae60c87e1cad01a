"""Pure parts of the vSphere adapter: guest paths, transfer URLs, thumbprints, fault mapping."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ssl
from typing import Any

import pytest
import requests
import urllib3
from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.config import Secret, VcenterSettings
from vsphere_av.models import HostId, HostInfo
from vsphere_av.vsphere.connection import TlsTrust, format_thumbprint, trust_from
from vsphere_av.vsphere.faults import translate
from vsphere_av.vsphere.guest import join, parent_of, transfer_url
from vsphere_av.vsphere.inventory import _cert_sha256, _folder_path


@pytest.mark.parametrize(("directory", "name", "windows", "expected"), [
    ("/", "etc", False, "/etc"), ("/etc", "passwd", False, "/etc/passwd"),
    ("C:\\", "Users", True, "C:\\Users"), ("C:\\Users", "bob", True, "C:\\Users\\bob"),
    ("C:/", "x", True, "C:/x"),
])
def test_join(directory: str, name: str, windows: bool, expected: str) -> None:
    assert join(directory, name, windows=windows) == expected


@pytest.mark.parametrize(("path", "windows", "expected"), [
    ("/a/b/c.txt", False, "/a/b"), ("/c.txt", False, "/"),
    ("C:\\a\\b.txt", True, "C:\\a"), ("C:\\b.txt", True, "C:\\"), ("C:/a/b.txt", True, "C:\\a"),
])
def test_parent_of(path: str, windows: bool, expected: str) -> None:
    assert parent_of(path, windows=windows) == expected


@pytest.mark.parametrize(("url", "address", "expected"), [
    ("https://*:443/guestFile?id=1&token=abc", "10.0.0.5",
     "https://10.0.0.5:443/guestFile?id=1&token=abc"),
    ("https://*/guestFile?id=2", "esx1.lab", "https://esx1.lab/guestFile?id=2"),
    ("https://*:8443/guestFile?id=3", "fd00::5", "https://[fd00::5]:8443/guestFile?id=3"),
    ("https://esx2.lab:443/guestFile?id=4", "10.0.0.5", "https://esx2.lab:443/guestFile?id=4"),
])
def test_transfer_url_replaces_star_with_host_address(url: str, address: str,
                                                      expected: str) -> None:
    assert transfer_url(url, address) == expected


def test_transfer_url_without_host_address_is_an_error() -> None:
    with pytest.raises(errors.GuestError, match="host address"):
        transfer_url("https://*:443/guestFile?id=1", "")


def test_format_thumbprint() -> None:
    der = b"certificate bytes"
    digest = hashlib.sha256(der).hexdigest().upper()
    assert format_thumbprint(der).replace(":", "") == digest
    assert len(format_thumbprint(der).split(":")) == 32


def test_host_certificate_thumbprint_from_pem() -> None:
    der = b"\x30\x82" + bytes(range(200))
    pem = ("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode()
           + "-----END CERTIFICATE-----\n").encode()
    assert _cert_sha256(pem) == format_thumbprint(der)
    assert _cert_sha256(b"") == ""
    assert _cert_sha256(b"garbage") == ""


def test_folder_path_walks_parents_without_looping() -> None:
    folders = {"group-v1": ("vm", "datacenter-2"), "datacenter-2": ("DC0", "group-d1"),
               "group-d1": ("Datacenters", ""), "group-v9": ("web", "group-v1"),
               "loop-a": ("a", "loop-b"), "loop-b": ("b", "loop-a")}
    assert _folder_path("group-v9", folders) == "/Datacenters/DC0/vm/web"
    assert _folder_path("", folders) == ""
    assert _folder_path("loop-a", folders) in ("/b/a", "/a/b")


THUMB = ":".join(["AB"] * 32)


@pytest.mark.parametrize(("settings", "kind"), [
    (VcenterSettings(server="vc", ca_file="/etc/ca.pem", thumbprint=THUMB), "ca"),
    (VcenterSettings(server="vc", thumbprint=THUMB, insecure=True), "thumbprint"),
    (VcenterSettings(server="vc", insecure=True), "insecure"),
])
def test_trust_prefers_ca_then_thumbprint_then_insecure(settings: VcenterSettings,
                                                        kind: str) -> None:
    assert trust_from(settings).describe() == kind


def test_no_trust_is_refused() -> None:
    with pytest.raises(errors.ConfigError, match="--insecure"):
        trust_from(VcenterSettings(server="vc", password=Secret("pw")))


def test_insecure_context_does_not_verify_and_ca_context_does() -> None:
    import ssl
    assert TlsTrust(insecure=True).ssl_context().verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(("fault", "expected"), [
    (vim.fault.InvalidGuestLogin(), errors.GuestLoginError),
    (vim.fault.GuestOperationsUnavailable(), errors.GuestUnavailable),
    (vim.fault.TooManyGuestLogons(), errors.GuestUnavailable),
    (vim.fault.OperationDisabledByGuest(), errors.GuestUnavailable),
    (vim.fault.GuestPermissionDenied(), errors.GuestError),
    (vim.fault.FileNotFound(file="/x"), errors.GuestFileNotFound),
    (vim.fault.FileAlreadyExists(file="/x"), errors.GuestFileExists),
    (vim.fault.InvalidPowerState(), errors.InvalidPowerState),
    (vmodl.fault.ManagedObjectNotFound(), errors.NotFound),
    (vim.fault.NotAuthenticated(), errors.ConnectionLost),
    (vim.fault.InvalidLogin(), errors.VsphereError),
    (vim.fault.NoPermission(), errors.PermissionDenied),
    (ConnectionResetError("reset"), errors.ConnectionLost),
    (vmodl.fault.SystemError(reason="boom"), errors.VsphereError),
    # The whole connection (vCenter or a host's transfer endpoint) is gone: an outage.
    (ConnectionRefusedError(111, "Connection refused"), errors.ConnectionLost),
    (TimeoutError("timed out"), errors.ConnectionLost),
    (OSError(113, "No route to host"), errors.ConnectionLost),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), errors.ConnectionLost),
    (http.client.RemoteDisconnected("Remote end closed connection"), errors.ConnectionLost),
    (http.client.IncompleteRead(b"", 10), errors.ConnectionLost),
    (requests.exceptions.ConnectionError("refused"), errors.ConnectionLost),
    (requests.exceptions.ReadTimeout("read timed out"), errors.ConnectionLost),
    (vmodl.fault.HostNotConnected(), errors.ConnectionLost),
    (vmodl.fault.HostNotReachable(), errors.ConnectionLost),
    # One transfer's body cut short: that file's trouble (its retry tells an outage apart).
    (requests.exceptions.ChunkedEncodingError("cut"), errors.TransientError),
])
def test_fault_translation(fault: BaseException, expected: type[errors.VsphereAvError]) -> None:
    err = translate(fault, what="list /etc on vm1")
    assert type(err) is expected
    assert str(err).startswith("list /etc on vm1")
    assert "\n" not in str(err)


def test_per_file_faults_are_never_an_outage() -> None:
    for fault in (vim.fault.FileNotFound(file="/x"), vim.fault.GuestPermissionDenied(),
                  vim.fault.GuestOperationsUnavailable(), vim.fault.InvalidPowerState(),
                  requests.exceptions.ChunkedEncodingError("cut")):
        assert not isinstance(translate(fault, what="download /x"), errors.ConnectionLost)


def test_invalid_guest_login_message_is_fixed() -> None:
    err = translate(vim.fault.InvalidGuestLogin(msg="bad password hunter2"), what="list /")
    assert str(err) == "list /: invalid guest login"


@pytest.mark.parametrize(("host_pin", "trust", "adapter_pin", "verify"), [
    (THUMB, TlsTrust(ca_file="/ca.pem"), THUMB, False),      # the host's own certificate first
    ("", TlsTrust(ca_file="/ca.pem"), "", "/ca.pem"),
    ("", TlsTrust(thumbprint="11:" * 31 + "11"), "11:" * 31 + "11", False),
    ("", TlsTrust(insecure=True), "", False),
])
def test_transfer_trust_order(host_pin: str, trust: TlsTrust, adapter_pin: str,
                              verify: bool | str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from vsphere_av.vsphere import guest

    # no CA file on disk here: the context itself is not what this test checks
    monkeypatch.setattr(guest, "_new_context",
                        lambda ca_file="": ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1",
                    certificate_sha256=host_pin)
    session, got_verify = guest._http_session(host, trust)
    adapter = session.get_adapter("https://10.0.0.1/guestFile")
    assert got_verify == verify
    assert adapter._fingerprint == adapter_pin.replace(":", "").lower()
    assert session.headers["Connection"] == "close"


def test_pyvmomi_thumbprint_mismatch_names_both() -> None:
    from pyVmomi.Security import ThumbprintMismatchException

    err = translate(ThumbprintMismatchException("aa" * 32, "bb" * 32), what="connect to vc:443")
    assert isinstance(err, errors.TlsVerificationError)
    assert "aa" * 32 in str(err)
    assert "bb" * 32 in str(err)


def _as_requests_does(reason: BaseException) -> BaseException:
    from urllib3.exceptions import MaxRetryError

    return requests.exceptions.SSLError(MaxRetryError(None, "/folder/x", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(("make", "kind"), [
    # the host or vCenter stopping during the handshake: an outage the controller retries
    (lambda: _as_requests_does(urllib3.exceptions.SSLError(
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))), errors.ConnectionLost),
    (lambda: _as_requests_does(urllib3.exceptions.SSLError(ConnectionResetError(104, "reset"))),
     errors.ConnectionLost),
    # a certificate that does not verify or a pin that does not match stays a TLS refusal
    (lambda: _as_requests_does(urllib3.exceptions.SSLError(
        'Fingerprints did not match. Expected "aa", got "bb"')), errors.TlsVerificationError),
    (lambda: _as_requests_does(urllib3.exceptions.SSLError(
        ssl.SSLCertVerificationError(1, "certificate verify failed"))),
     errors.TlsVerificationError),
    (lambda: ssl.SSLCertVerificationError(1, "certificate verify failed"),
     errors.TlsVerificationError),
])
def test_ssl_errors_a_cut_handshake_is_an_outage_a_failed_verification_is_not(
        make: Any, kind: type[Exception]) -> None:
    err = translate(make(), what="read x")
    assert type(err) is kind
