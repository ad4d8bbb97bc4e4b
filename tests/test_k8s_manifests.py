"""The Kubernetes manifests (deploy/k8s): each overlay renders with `kubectl kustomize`,
validates offline against the Kubernetes schemas, probes the ports the services open,
sets only real settings, and the overlays differ only where they should."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from encoder_service.config import ENV_PREFIX as ENCODER_PREFIX
from encoder_service.config import EncoderConfig
from search_service.config import ENV_PREFIX as SEARCH_PREFIX
from search_service.config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the schemas the manifests are held to (pinned)
OVERLAYS = ("gpu", "cpu")
Doc = dict[str, Any]


def render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (.ci/run installs Debian's kubernetes-client)"
    result = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_names(prefix: str, config: type) -> set[str]:
    return {prefix + f.name.upper() for f in fields(config)}


REAL_SETTINGS = {"encoder": env_names(ENCODER_PREFIX, EncoderConfig),
                 "search": env_names(SEARCH_PREFIX, SearchConfig)}


def test_every_manifest_validates_against_the_kubernetes_schemas(rendered: list[Doc]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Service",
                            "Service", "PodDisruptionBudget", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "PersistentVolumeClaim"])
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_can_fail() -> None:
    broken = render("gpu")
    deployment = by_kind(broken, "Deployment")["clipsearch-encoder"]
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = (
        "fifty")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("tier", ["encoder", "search"])
def test_probes_and_ports_are_the_ones_the_service_opens(rendered: list[Doc],
                                                         tier: str) -> None:
    prefix = ENCODER_PREFIX if tier == "encoder" else SEARCH_PREFIX
    settings = by_kind(rendered, "ConfigMap")[f"clipsearch-{tier}"]["data"]
    grpc_port, metrics_port = int(settings[prefix + "PORT"]), int(settings[prefix + "METRICS_PORT"])
    assert settings[prefix + "HOST"] == "0.0.0.0"  # reachable by the kubelet's probes
    pod = by_kind(rendered, "Deployment")[f"clipsearch-{tier}"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    service_name = {"encoder": "clipsearch.encoder.v1.Encoder",
                    "search": "clipsearch.search.v1.Search"}[tier]
    assert container["readinessProbe"]["grpc"]["service"] == service_name
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service = by_kind(rendered, "Service")[f"clipsearch-{tier}"]
    assert service["spec"]["ports"][0]["port"] == grpc_port
    grace = float(settings[prefix + "GRACE_S"])
    assert grace < pod["spec"]["terminationGracePeriodSeconds"]


def test_encoder_service_is_headless_for_client_side_balancing(rendered: list[Doc]) -> None:
    assert by_kind(rendered, "Service")["clipsearch-encoder"]["spec"]["clusterIP"] == "None"
    search = by_kind(rendered, "ConfigMap")["clipsearch-search"]["data"]
    assert search["CLIPSEARCH_SEARCH_ENCODER"] == "dns:///clipsearch-encoder:50051"


@pytest.mark.parametrize("tier", ["encoder", "search"])
def test_every_setting_is_a_real_flag(rendered: list[Doc], tier: str) -> None:
    settings = set(by_kind(rendered, "ConfigMap")[f"clipsearch-{tier}"]["data"])
    container = by_kind(rendered, "Deployment")[f"clipsearch-{tier}"]["spec"]["template"][
        "spec"]["containers"][0]
    settings |= {e["name"] for e in container.get("env", [])}
    unknown = settings - REAL_SETTINGS[tier]
    assert not unknown, f"not settings of the {tier}: {sorted(unknown)}"


def test_secrets_hold_the_tokens(rendered: list[Doc]) -> None:
    container = by_kind(rendered, "Deployment")["clipsearch-search"]["spec"]["template"][
        "spec"]["containers"][0]
    from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in
                    e.get("valueFrom", {})}
    assert from_secrets == {"CLIPSEARCH_SEARCH_TOKEN", "CLIPSEARCH_SEARCH_ENCODER_TOKEN",
                            "CLIPSEARCH_SEARCH_MILVUS_TOKEN"}
    data = by_kind(rendered, "ConfigMap")["clipsearch-search"]["data"]
    assert not any("TOKEN" in key for key in data)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in _differences(a.get(key), b.get(key), f"{path}.{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_overlays_differ_only_in_the_encoders_device() -> None:
    gpu = {(d["kind"], d["metadata"]["name"]): d for d in render("gpu")}
    cpu = {(d["kind"], d["metadata"]["name"]): d for d in render("cpu")}
    assert set(gpu) == set(cpu)
    differing = {key for key in gpu if gpu[key] != cpu[key]}
    assert differing == {("Deployment", "clipsearch-encoder")}
    paths = _differences(gpu[("Deployment", "clipsearch-encoder")],
                         cpu[("Deployment", "clipsearch-encoder")])
    allowed = (".spec.template.spec.tolerations", ".spec.template.spec.containers[0].image",
               ".spec.template.spec.containers[0].resources",
               ".spec.template.spec.containers[0].env")
    assert paths and all(p.startswith(allowed) for p in paths), paths
    gpu_pod = gpu[("Deployment", "clipsearch-encoder")]["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    devices = {e["name"]: e.get("value") for e in gpu_pod["containers"][0]["env"]}
    assert devices["CLIPSEARCH_ENCODER_DEVICE"] == "cuda"


def test_milvus_comes_from_its_helm_chart_pinned() -> None:
    for variant in ("standalone", "cluster"):
        values = yaml.safe_load((K8S / "milvus" / f"values-{variant}.yaml").read_text())
        assert values["image"]["all"]["tag"] == "v2.5.16"  # as the compose file
        assert values["cluster"]["enabled"] is (variant == "cluster")
    readme = (K8S / "milvus" / "README.md").read_text()
    assert "--version 4.2.56" in readme
