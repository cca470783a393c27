"""What an operator installs (cri/deploy): the example configuration loads, its handlers are the
ones the RuntimeClasses name, kubelet's endpoint is the server's socket, the unit runs the server
with that configuration."""

from __future__ import annotations

from pathlib import Path

import yaml
from stockade.cri import config as configmod

DEPLOY = Path(__file__).resolve().parent.parent / "cri" / "deploy"
POLICIES = Path(__file__).resolve().parent.parent / "profiles" / "policy"


def test_the_example_configuration_loads_with_its_handlers() -> None:
    config = configmod.load(str(DEPLOY / "stockade.toml"), explicit=True)
    assert set(config.handlers) == {"stockade", "stockade-audit"}
    assert config.default_handler == "stockade" and config.log_format == "json"
    strict = config.handlers["stockade"]
    assert (strict.user_namespace, strict.host_namespaces, strict.privileged, strict.allow_degraded) == (
        True, False, False, False)
    assert config.network == "bridge" and config.net.pod_cidr == "10.88.0.0/16"
    audit = config.handlers["stockade-audit"]
    assert (POLICIES / f"{audit.bpf_policy}.yaml").is_file()
    assert "mode: audit" in (POLICIES / f"{audit.bpf_policy}.yaml").read_text()


def test_runtimeclasses_name_configured_handlers_with_overhead_and_node_selector() -> None:
    config = configmod.load(str(DEPLOY / "stockade.toml"), explicit=True)
    classes = list(yaml.safe_load_all((DEPLOY / "runtimeclass.yaml").read_text()))
    assert {c["handler"] for c in classes} == set(config.handlers)
    for c in classes:
        assert c["apiVersion"] == "node.k8s.io/v1" and c["kind"] == "RuntimeClass"
        assert c["overhead"]["podFixed"]["memory"] and c["scheduling"]["nodeSelector"]


def test_kubelet_and_systemd_point_at_the_server() -> None:
    config = configmod.load(str(DEPLOY / "stockade.toml"), explicit=True)
    kubelet = yaml.safe_load((DEPLOY / "kubelet-config.yaml").read_text())
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{config.socket}"
    assert kubelet["imageServiceEndpoint"] == f"unix://{config.socket}"
    assert kubelet["cgroupDriver"] == "cgroupfs"
    unit = (DEPLOY / "stockade-cri.service").read_text()
    assert "ExecStart=/opt/stockade/.venv/bin/stockade cri serve --config /etc/stockade/stockade.toml" in unit
    assert "KillMode=process" in unit  # stopping the server leaves conmon and the containers


def test_the_example_tenant_policy_parses() -> None:
    from stockade.cri.netrules import parse_policy

    path = DEPLOY / "tenants" / "team-a.yaml"
    policy = parse_policy(path.read_text(), str(path))
    assert [(e.cidr, e.exceptions, e.ports, e.protocols) for e in policy.egress] == [
        ("10.20.0.0/16", ["10.20.99.0/24"], [(5432, 5432)], ["tcp"]),
        ("0.0.0.0/0", [], [(443, 443)], ["tcp"])]
    assert policy.ingress_from == ["team-b"]
