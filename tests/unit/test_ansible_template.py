"""The controller role's config template, rendered as Ansible renders it and read back by the
product's own config parser: the vCenter address in every form an admin may give."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from vsphere_av import config

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "vsphere_av_controller"


def render(**overrides: Any) -> dict[str, Any]:
    values = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values.update(overrides)
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.Undefined,
                             loader=jinja2.FileSystemLoader(str(ROLE / "templates")))
    env.filters["to_json"] = json.dumps          # Ansible's filter of that name
    env.filters["bool"] = bool
    text = env.get_template("vsphere-av.toml.j2").render(**values)
    return tomllib.loads(text)


@pytest.mark.parametrize(("server", "port", "host", "parsed_port"), [
    ("vcenter.example.test", 443, "vcenter.example.test", 443),
    ("192.0.2.10", 8443, "192.0.2.10", 8443),
    ("fd00::10", 443, "fd00::10", 443),
    ("[fd00::10]", 9443, "fd00::10", 9443),
])
def test_vcenter_server_reads_back(server: str, port: int, host: str, parsed_port: int) -> None:
    document = render(vsphere_av_controller_vcenter_server=server,
                      vsphere_av_controller_vcenter_port=port)
    vc = document["vcenter"]
    settings = config.parse({"vcenter": {"server": vc["server"]}}, env={})
    assert (settings.vcenter.server, settings.vcenter.port) == (host, parsed_port)
