"""The fleet overview's counts (``api.server.fleet_counts``): per cluster, then per host."""

from __future__ import annotations

from typing import Any

import pytest

from vsphere_av.api.server import fleet_counts


def vm(host: str, state: str) -> dict[str, Any]:
    return {"host": host, "state": state}


@pytest.mark.parametrize(("rows", "clusters", "expected"), [
    ([], {}, {}),
    ([vm("esx1", "protected"), vm("esx1", "infected"), vm("esx2", "stale")],
     {"esx1": "prod", "esx2": "prod"},
     {"prod": {"total": {"protected": 1, "infected": 1, "stale": 1},
               "hosts": {"esx1": {"protected": 1, "infected": 1}, "esx2": {"stale": 1}}}}),
    ([vm("esx1", "protected"), vm("esx9", "unreachable"), vm("", "weird")],
     {"esx1": "prod", "esx9": ""},
     {"prod": {"total": {"protected": 1}, "hosts": {"esx1": {"protected": 1}}},
      "(no cluster)": {"total": {"unreachable": 1, "unprotected": 1},
                       "hosts": {"esx9": {"unreachable": 1},
                                 "(no host)": {"unprotected": 1}}}}),
])
def test_counts_per_cluster_and_host(rows: list[dict[str, Any]], clusters: dict[str, str],
                                     expected: dict[str, Any]) -> None:
    got = fleet_counts(rows, clusters=clusters)
    assert sum(got["total"].values()) == len(rows)

    def nonzero(counts: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in counts.items() if v}

    shown = {name: {"total": nonzero(c["total"]),
                    "hosts": {h: nonzero(n) for h, n in c["hosts"].items()}}
             for name, c in got["clusters"].items()}
    assert shown == expected
    assert list(got["clusters"]) == sorted(got["clusters"])
