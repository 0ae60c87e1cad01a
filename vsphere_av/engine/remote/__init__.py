"""The scan engine over HTTP: the service each appliance runs and the controller's client.

``server.py`` is the appliance side (``vsphere-av engine serve``: :class:`EngineService`, its
token and listen address); ``client.py`` the controller side (:class:`EngineClient`, and
:class:`RemoteEngine` / :class:`RemoteSession`, which give an appliance the shape of
``engine.Engine`` for the scan path). Imported by ``cli``, ``fleet`` and ``lab``; imports no
vSphere and no store.
"""

from vsphere_av.engine.remote.client import (
    EngineClient,
    RemoteEngine,
    RemoteSession,
    outcome_from_json,
)
from vsphere_av.engine.remote.server import (
    MAX_JSON_BODY,
    EngineService,
    check_transfer_url,
    fetch_transfer_url,
    load_token,
    parse_listen,
)

__all__ = ["MAX_JSON_BODY", "EngineClient", "EngineService", "RemoteEngine", "RemoteSession",
           "check_transfer_url", "fetch_transfer_url", "load_token", "outcome_from_json",
           "parse_listen"]
