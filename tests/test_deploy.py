"""The deployment files are checked offline: the systemd unit by systemd-analyze, the
Kubernetes manifests against the API's schemas, the Dockerfile by its linter, the
compose file's services and the nginx configuration by nginx itself where installed.
(No container engine runs here: the image is built where one does.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "ferrousforge.service").read_text()
    # verify checks that ExecStart's program exists: point it at this environment's.
    ferrous = Path(sys.executable).parent / "ferrous"
    assert "ExecStart=/opt/ferrous/bin/ferrous serve" in unit
    (tmp_path / "ferrousforge.service").write_text(
        unit.replace("/opt/ferrous/bin/ferrous", str(ferrous))
    )
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / "ferrousforge.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr  # warnings count too
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes"):
        assert hardening in unit


def test_the_kubernetes_manifests_validate() -> None:
    import kubernetes_validate

    kinds = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)
            kinds.append(doc["kind"])
            if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "ferrousforge":
                pod = doc["spec"]["template"]["spec"]
                [server] = pod["containers"]
                assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
                # The drain (preStop, then grace_period 30 s) fits the termination grace.
                env = {e["name"]: e.get("value") for e in server["env"]}
                assert pod["terminationGracePeriodSeconds"] > 5 + int(env["FERROUS_GRACE_PERIOD"])
                assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= set(kinds)


def test_the_dockerfile_lints_clean_and_runs_as_a_user() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "GGML_NATIVE=OFF" in text


def test_the_compose_file_and_the_balancer(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "node1", "node2", "balancer"} <= set(services)
    for node in ("node1", "node2"):
        env = services[node]["environment"]
        assert env["FERROUS_STATE__URL"].startswith("redis://")
    nginx = shutil.which("nginx")
    if nginx is None:
        return  # checked where nginx is installed
    conf = (DEPLOY / "nginx.conf").read_text().replace("node1:11480", "127.0.0.1:1")
    conf = conf.replace("node2:11480", "127.0.0.1:2")
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    out = subprocess.run([nginx, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
