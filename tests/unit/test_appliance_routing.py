"""Engine routing: which appliance serves a host, and when the routes are read again."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsphere_av.fleet.routing import EngineRoutes, mark_fleet_changed, serving_addresses
from vsphere_av.models import ApplianceAddress


def appliance(host: str, address: str, *, on: bool = True, standby: bool = False,
              vm: str = "vm-1") -> ApplianceAddress:
    return ApplianceAddress(host_id=host, host=host, vm_id=vm, vm=vm, address=address,
                            powered_on=on, standby=standby)


@pytest.mark.parametrize(("appliances", "expected"), [
    ([], {}),
    ([appliance("h1", "10.0.0.1")], {"h1": "10.0.0.1"}),
    ([appliance("h1", "10.0.0.1", on=False)], {}),                 # powered off
    ([appliance("h1", "")], {}),                                   # no address yet
    ([appliance("h1", "10.0.0.2", standby=True, vm="vm-2"), appliance("h1", "10.0.0.1")],
     {"h1": "10.0.0.1"}),                                          # serving before standby
    ([appliance("h1", "10.0.0.2", standby=True, vm="vm-2"),
      appliance("h1", "10.0.0.1", on=False)], {"h1": "10.0.0.2"}),  # standby alone runs
    ([appliance("h1", "10.0.0.1"), appliance("h2", "10.0.0.2", vm="vm-2")],
     {"h1": "10.0.0.1", "h2": "10.0.0.2"}),
])
def test_serving_addresses(appliances: list[ApplianceAddress], expected: dict[str, str]) -> None:
    assert serving_addresses(appliances) == expected


def test_routes_are_read_again_only_when_the_fleet_changed(tmp_path: Path) -> None:
    fleet = [appliance("h1", "10.0.0.1")]
    routes = EngineRoutes(state_dir=tmp_path, read=lambda: list(fleet), connect=str)
    assert [routes.address("h1") for _ in range(3)] == ["10.0.0.1"] * 3
    assert routes.reads == 1
    fleet[0] = appliance("h1", "10.0.0.9")
    assert routes.address("h1") == "10.0.0.1"        # not re-read: nothing marked it
    mark_fleet_changed(tmp_path)                      # a reconcile or upgrade step
    assert routes.address("h1") == "10.0.0.9"
    assert routes.reads == 2
    # A host without a serving appliance is looked up again before it is refused.
    assert routes.address("h2") is None
    assert routes.reads == 3
    fleet.append(appliance("h2", "10.0.0.2", vm="vm-2"))
    assert routes.address("h2") == "10.0.0.2"
    assert routes.reads == 4
    assert routes.address("h1") == "10.0.0.9"
    assert routes.reads == 4
