"""One exception tree for the whole product.

Lower-level errors (pyVmomi faults, sqlite3, yara, paramiko, OS errors) are translated at
the edge that meets them (``raise X from exc``); everything above sees only these:

    VsphereAvError                 every error the product raises on purpose
    ├── ConfigError                bad settings, bad command-line input
    ├── AccessDenied               the caller holds no role for the command ([access])
    ├── SimulatorMissing           the vcsim binary is not built
    ├── SignatureError             a signature bundle was rejected (names file, line, reason)
    ├── StoreError                 state database problems
    │   └── AuditIntegrityError    the audit hash chain is broken
    ├── EngineError                the scan engine could not scan
    ├── VsphereError               anything from vCenter / ESXi
    │   ├── TlsVerificationError   certificate or pinned thumbprint mismatch
    │   ├── NotFound               the object is gone
    │   ├── InvalidPowerState      VM not in the needed power state
    │   ├── PermissionDenied       vCenter or a host refused for lack of a privilege
    │   ├── SnapshotError          a scan snapshot could not be taken (the reason says why)
    │   ├── GuestError             guest operations on one VM failed
    │   │   ├── GuestLoginError        invalid guest login: permanent for that VM
    │   │   ├── GuestUnavailable       tools / guest ops not running: transient
    │   │   ├── GuestFileNotFound      the guest path does not exist
    │   │   └── GuestFileExists        the guest path exists already
    │   └── TransientError        retry with backoff (session lost, busy, network)
    │       └── ConnectionLost    vCenter or a host unreachable, session gone: the whole job
    │                             is cut (never one file's error), retried after a reconnect
    ├── ApplianceError             appliance deploy / SSH management
    │   └── HostKeyMismatch        an appliance's SSH host key changed
    └── DiskError                  reading a virtual disk's bytes (scan.sources.disk)
        ├── DiskImageError         the VMDK chain is corrupt, truncated or incomplete: the
        │                          whole disk is unreadable
        └── DiskFileError          one guest file or directory could not be read: the walk
                                   goes on (an unknown, damaged or encrypted volume is not an
                                   exception but the volume's ``problem``)
"""

from __future__ import annotations


class VsphereAvError(Exception):
    """Base of every error the product raises on purpose; str() is a one-line message."""


class ConfigError(VsphereAvError):
    """Bad settings or command-line input."""


class AccessDenied(VsphereAvError):
    """The caller holds no role that may run this command (``[access]``)."""


class SimulatorMissing(VsphereAvError):
    """The bundled simulator binary has not been built."""


class SignatureError(VsphereAvError):
    """A signature bundle was rejected; the message names file, line and reason."""


class StoreError(VsphereAvError):
    """The state database could not be read or written."""


class AuditIntegrityError(StoreError):
    """The audit log's hash chain does not verify."""


class EngineError(VsphereAvError):
    """The scan engine could not scan."""


class VsphereError(VsphereAvError):
    """Anything that went wrong talking to vCenter or an ESXi host."""


class TlsVerificationError(VsphereError):
    """The server certificate did not verify (CA file or pinned thumbprint)."""


class NotFound(VsphereError):
    """The managed object no longer exists."""


class InvalidPowerState(VsphereError):
    """The VM is not in the power state the operation needs."""


class PermissionDenied(VsphereError):
    """vCenter or an ESXi host refused the operation: the account lacks a privilege."""


class SnapshotError(VsphereError):
    """A snapshot for scanning could not be taken (independent disk, RDM, ...): the message
    says why; retrying does not help until the VM changes."""


class GuestError(VsphereError):
    """A guest operation on one VM failed."""


class GuestLoginError(GuestError):
    """The guest rejected the credentials: permanent for that VM until the config changes."""


class GuestUnavailable(GuestError):
    """Guest operations are not available now (tools not running): retry later."""


class GuestFileNotFound(GuestError):
    """The guest path does not exist."""


class GuestFileExists(GuestError):
    """The guest path exists already."""


class TransientError(VsphereError):
    """Retry with backoff: session lost, server busy, connection reset."""


class ConnectionLost(TransientError):
    """vCenter or a host's transfer endpoint cannot be reached, or the session is gone.

    Not one file's trouble: every call on that connection fails alike, so whatever was
    running (a scan) is cut as a whole and retried once vCenter answers again.
    """


class ApplianceError(VsphereAvError):
    """Deploying or managing a security appliance failed."""


class HostKeyMismatch(ApplianceError):
    """An appliance's SSH host key differs from the pinned one."""


class DiskError(VsphereAvError):
    """A virtual disk's contents could not be read."""


class DiskImageError(DiskError):
    """The VMDK chain is corrupt, truncated or incomplete: nothing on the disk can be trusted."""


class DiskFileError(DiskError):
    """One guest file or directory on a disk could not be read; the message names the path."""
