"""vSphere tags on VMs, through the vSphere Automation API (JSON-RPC ``/api``, ``vmware-vcenter``).

Called by ``app`` after each VM scan when ``[tagging] enabled``: :meth:`Tagging.mark`
makes the VM carry the configured tag exactly while its state is ``infected`` (level-based:
it reads the VM's tags and changes only what differs, so calling it again changes nothing);
and by ``serve``'s resync (``App.resync_tags``), which compares :meth:`Tagging.tagged_vms`
with every VM's state in one pass.
Calls the Automation SDK's session, category, tag and tag-association services. Nothing of
the SDK leaves this module: callers get booleans and strings, SDK errors become
``vsphere_av.errors``.

TLS: the same trust as the pyVmomi connection (``connection.TlsTrust``): a CA file, the
pinned SHA-256 thumbprint (checked by the transport on every connection), or nothing when
``--insecure`` was asked for. The SDK's connector would mount its own transport adapters
(dropping the pin) when given a pool size, so it is given none.

Sessions: logged in lazily with the vCenter user and password; a session vCenter no longer
knows (``Unauthenticated``) is replaced once per call. :meth:`Tagging.close` logs out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from com.vmware.cis.tagging_client import Category, CategoryModel, Tag, TagAssociation
from com.vmware.cis_client import Session
from com.vmware.vapi.std import errors_client as vapi_errors
from com.vmware.vapi.std_client import DynamicID
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.session import create_session_security_context
from vmware.vapi.security.user_password import create_user_password_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory

from vsphere_av import errors
from vsphere_av.config import TaggingSettings, VcenterSettings
from vsphere_av.vsphere.connection import TlsTrust
from vsphere_av.vsphere.guest import _http_session

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = 60
VM_TYPE = "VirtualMachine"


class Tagging:
    """One Automation API session: keeps a VM's infected tag in line with its state."""

    def __init__(self, *, vcenter: VcenterSettings, trust: TlsTrust,
                 settings: TaggingSettings) -> None:
        self._vcenter = vcenter
        self._trust = trust
        self.settings = settings
        self._lock = threading.Lock()
        self._ensure_lock = threading.Lock()    # one find-or-create at a time
        self._call_lock = threading.Lock()      # one request at a time: requests sessions and
                                                # the context urllib3 changes are not shared
        self._stub: Any = None
        self._http: requests.Session | None = None
        self._tag_id: str | None = None
        self.logins = 0

    def __repr__(self) -> str:
        return (f"Tagging(server={self._vcenter.server!r}, port={self._vcenter.port}, "
                f"category={self.settings.category!r}, tag={self.settings.infected_tag!r})")

    @property
    def _url(self) -> str:
        host = self._vcenter.server
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self._vcenter.port}/api"

    # -- session ---------------------------------------------------------------------------
    def _login(self) -> Any:
        http, verify = _http_session(None, self._trust)
        http.verify = verify
        connector = get_requests_connector(session=http, url=self._url, timeout=TIMEOUT,
                                           pool_size=0)
        connector.set_security_context(create_user_password_security_context(
            self._vcenter.user, self._vcenter.password.reveal()))
        stub = StubConfigurationFactory.new_std_configuration(connector)
        session_id = Session(stub).create()
        connector.set_security_context(create_session_security_context(session_id))
        self._http = http
        self.logins += 1
        return stub

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(stub)``; log in first or again (once) as needed; translate errors."""
        for attempt in (1, 2):
            with self._lock:
                stub = self._stub
            try:
                with self._call_lock:
                    if stub is None:
                        with self._lock:
                            if self._stub is None:
                                self._stub = self._login()
                            stub = self._stub
                    return fn(stub)
            except vapi_errors.Unauthenticated as exc:
                with self._lock:
                    if self._stub is stub:
                        self._stub = None
                if attempt == 2 or stub is None:
                    raise errors.VsphereError(
                        f"{what}: vCenter {self._vcenter.server} rejected the login for the "
                        f"Automation API (user {self._vcenter.user!r})") from exc
            except vapi_errors.Error as exc:
                raise errors.VsphereError(f"{what}: {_describe(exc)}") from exc
            except requests.exceptions.SSLError as exc:
                raise errors.TlsVerificationError(
                    f"{what}: TLS verification of {self._url} failed "
                    f"({self._trust.describe()}): {exc}") from exc
            except requests.RequestException as exc:
                raise errors.TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Log out (best effort) and drop the connection."""
        with self._lock:
            stub, self._stub = self._stub, None
            http, self._http = self._http, None
        if stub is not None:
            try:
                Session(stub).delete()
            except (vapi_errors.Error, requests.RequestException) as exc:
                log.info("Automation API logout failed: %s", type(exc).__name__)
        if http is not None:
            http.close()

    # -- tags ----------------------------------------------------------------------------
    def tag_id(self) -> str:
        """The configured tag's id; creates the category and the tag when missing."""
        with self._ensure_lock:
            if self._tag_id is None:
                self._tag_id = self._call("find or create the infected tag", self._ensure_tag)
            return self._tag_id

    def _ensure_tag(self, stub: Any) -> str:
        # Another process (serve and a CLI scan) may create the same names at the same time:
        # whoever loses gets AlreadyExists and finds the winner's object on a second look.
        for attempt in (1, 2):
            try:
                return self._find_or_create(stub)
            except vapi_errors.AlreadyExists:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _find_or_create(self, stub: Any) -> str:
        s = self.settings
        categories = Category(stub)
        category_id = next((cid for cid in categories.list()
                            if categories.get(cid).name == s.category), None)
        if category_id is None:
            category_id = categories.create(Category.CreateSpec(
                name=s.category, description="vsphere-av: protection state of the VM",
                cardinality=CategoryModel.Cardinality.SINGLE, associable_types={VM_TYPE}))
            log.info("created tag category %s (%s)", s.category, category_id)
        tags = Tag(stub)
        for tid in tags.list_tags_for_category(category_id):
            if tags.get(tid).name == s.infected_tag:
                return str(tid)
        created = tags.create(Tag.CreateSpec(
            name=s.infected_tag, description="vsphere-av found malware on this VM",
            category_id=category_id))
        log.info("created tag %s/%s (%s)", s.category, s.infected_tag, created)
        return str(created)

    def is_marked(self, vm_moref: str) -> bool:
        """True when the VM carries the infected tag."""
        tag = self.tag_id()
        attached = self._call(f"read the tags of {vm_moref}", lambda stub: TagAssociation(
            stub).list_attached_tags(DynamicID(type=VM_TYPE, id=vm_moref)))
        return tag in attached

    def tagged_vms(self) -> set[str]:
        """Morefs of every VM that carries the infected tag (one call)."""
        tag = self.tag_id()
        objects = self._call("list the VMs with the infected tag", lambda stub: TagAssociation(
            stub).list_attached_objects(tag))
        return {str(o.id) for o in objects if o.type == VM_TYPE}

    def mark(self, vm_moref: str, *, infected: bool) -> bool:
        """Attach (infected) or detach (not) the tag; True when something changed."""
        if self.is_marked(vm_moref) == infected:
            return False
        self.put(vm_moref, infected=infected)
        return True

    def put(self, vm_moref: str, *, infected: bool) -> None:
        """Attach (infected) or detach (not) the tag, without reading the VM's tags first."""
        tag = self.tag_id()
        target = DynamicID(type=VM_TYPE, id=vm_moref)
        if infected:
            self._call(f"tag {vm_moref}", lambda stub: TagAssociation(stub).attach(
                tag_id=tag, object_id=target))
        else:
            self._call(f"untag {vm_moref}", lambda stub: TagAssociation(stub).detach(
                tag_id=tag, object_id=target))


def _describe(exc: Any) -> str:
    """The SDK error's class and first message, without request details."""
    messages = getattr(exc, "messages", None) or []
    first = getattr(messages[0], "default_message", "") if messages else ""
    return f"{type(exc).__name__}" + (f": {first}" if first else "")
