"""Translate pyVmomi faults and transport errors into ``vsphere_av.errors`` at the edge.

Called by every module of the adapter (``connection``, ``inventory``, ``guest`` and the ones
that come later) through :func:`translating` / :func:`translate`; calls nothing.
Messages are one line and never contain credentials: the guest password is inside the
request, never inside a fault's text.

Connection-level trouble becomes ``errors.ConnectionLost`` (a ``TransientError``): vCenter or
a host's transfer endpoint not answering (refused, reset, timed out, no route, TLS handshake
cut), a session that is gone, a host vCenter cannot reach (``HostCommunication``). Callers
treat it as the end of whatever they were doing on that connection, never as one file's
error. A fault about one file or one guest (``FileNotFound``, permission denied, tools not
running) stays a ``GuestError``.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from pyVmomi import vim, vmodl
from pyVmomi.Security import ThumbprintMismatchException

from vsphere_av import errors


def _fault_text(exc: BaseException) -> str:
    msg = getattr(exc, "msg", "") or ""
    if not msg:
        faults = getattr(exc, "faultMessage", None) or []
        msg = "; ".join(str(getattr(m, "message", "")) for m in faults if getattr(m, "message", ""))
    text = msg or type(exc).__name__
    return " ".join(str(text).split())


def is_not_authenticated(exc: BaseException) -> bool:
    """True for the fault vCenter answers when the session is gone."""
    return isinstance(exc, vim.fault.NotAuthenticated)


def translate(exc: BaseException, *, what: str) -> errors.VsphereAvError:
    """Return the product error for ``exc``; ``what`` names the operation (no secrets)."""
    if isinstance(exc, errors.VsphereAvError):
        return exc
    if isinstance(exc, ThumbprintMismatchException):
        return errors.TlsVerificationError(
            f"{what}: certificate does not match the pinned thumbprint: "
            f"expected {exc.expected}, got {exc.actual}")
    text = _fault_text(exc)
    if isinstance(exc, vim.fault.InvalidGuestLogin):
        return errors.GuestLoginError(f"{what}: invalid guest login")
    if isinstance(exc, vim.fault.GuestOperationsUnavailable | vim.fault.TooManyGuestLogons):
        return errors.GuestUnavailable(f"{what}: guest operations unavailable ({text})")
    if isinstance(exc, vim.fault.GuestComponentsOutOfDate | vim.fault.OperationDisabledByGuest
                  | vim.fault.OperationNotSupportedByGuest):
        return errors.GuestUnavailable(f"{what}: guest operations unavailable ({text})")
    if isinstance(exc, vim.fault.GuestPermissionDenied):
        return errors.GuestError(f"{what}: guest permission denied ({text})")
    if isinstance(exc, vim.fault.FileNotFound):
        return errors.GuestFileNotFound(f"{what}: file not found in guest ({text})")
    if isinstance(exc, vim.fault.FileAlreadyExists):
        return errors.GuestFileExists(f"{what}: file exists in guest ({text})")
    if isinstance(exc, vim.fault.InvalidPowerState):
        return errors.InvalidPowerState(f"{what}: VM is not powered on ({text})")
    if isinstance(exc, vim.fault.InvalidState):
        return errors.InvalidPowerState(f"{what}: invalid VM state ({text})")
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        return errors.NotFound(f"{what}: object no longer exists")
    if isinstance(exc, vim.fault.NotAuthenticated):
        return errors.ConnectionLost(f"{what}: vCenter session lost")
    if isinstance(exc, vmodl.fault.HostCommunication):
        return errors.ConnectionLost(f"{what}: host unreachable ({text})")
    if isinstance(exc, vim.fault.InvalidLogin):
        return errors.VsphereError(f"{what}: vCenter rejected the login (check user and password)")
    if isinstance(exc, vim.fault.NoPermission):
        privilege = getattr(exc, "privilegeId", "") or ""
        needs = f" (needs {privilege})" if privilege else ""
        return errors.PermissionDenied(f"{what}: permission denied{needs}")
    if isinstance(exc, vim.fault.FileFault):
        return errors.GuestError(f"{what}: {type(exc).__name__} ({text})")
    if isinstance(exc, vim.fault.GuestOperationsFault):
        return errors.GuestError(f"{what}: {type(exc).__name__} ({text})")
    if isinstance(exc, ssl.SSLCertVerificationError | requests.exceptions.SSLError):
        if _handshake_cut(exc):
            # The peer went away during the handshake (a host or vCenter stopping): an
            # outage, not a certificate that failed to verify.
            return errors.ConnectionLost(f"{what}: unreachable: {_one_line(exc)}")
        return errors.TlsVerificationError(f"{what}: TLS verification failed: {_one_line(exc)}")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        # A body cut short: this transfer's trouble; the next call tells whether the peer is gone.
        return errors.TransientError(f"{what}: transfer broke off: {_one_line(exc)}")
    if isinstance(exc, OSError | http.client.HTTPException | requests.exceptions.ConnectionError
                  | requests.exceptions.Timeout):
        # Only network calls reach here: refused, reset, timed out, no route, TLS cut.
        return errors.ConnectionLost(f"{what}: unreachable: {_one_line(exc)}")
    if isinstance(exc, vmodl.MethodFault):
        return errors.VsphereError(f"{what}: {type(exc).__name__} ({text})")
    return errors.VsphereError(f"{what}: {type(exc).__name__}: {_one_line(exc)}")


_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ConnectionError)


def _handshake_cut(exc: BaseException) -> bool:
    """True when an SSL error was the connection closing, not a failed verification.

    requests wraps urllib3's MaxRetryError, whose ``reason`` wraps the ``ssl`` error: follow
    causes, contexts, ``reason`` and exception arguments (bounded) to the bottom.
    """
    seen: list[BaseException] = [exc]
    for current in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return False
        if isinstance(current, _CUT):
            return True
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *current.args]
        seen.extend(e for e in linked if isinstance(e, BaseException) and e not in seen)
        if len(seen) > 20:
            break
    return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


@contextmanager
def translating(what: str) -> Iterator[None]:
    """Re-raise anything from pyVmomi / requests inside the block as a product error."""
    try:
        yield
    except errors.VsphereAvError:
        raise
    except (vmodl.MethodFault, OSError, http.client.HTTPException,
            requests.exceptions.RequestException, ThumbprintMismatchException) as exc:
        raise translate(exc, what=what) from exc
