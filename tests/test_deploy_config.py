"""The compose files and Dockerfiles hold together (no Docker engine runs here, so this
checks their structure): valid against the compose-spec schema, images pinned, a
healthcheck everywhere (with tools each image has), start order by health, a failed encoder
start that ends, ports on loopback unless asked, the search service wired to Milvus
standalone and to every encoder replica, a GPU for the encoder except in the CPU variant,
the torch build chosen by a build argument, and every CLIPSEARCH_* variable a real flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clipsearch.options import add_options, from_namespace
from encoder_service import config as encoder_config
from search_service import config as search_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
# compose-spec/compose-spec schema/compose-spec.json (Apache-2.0), vendored for offline use:
# tests/data/README.md says which commit.
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
DOCKERFILES = {"encoder": ROOT / "docker" / "encoder.Dockerfile",
               "search": ROOT / "docker" / "search.Dockerfile"}
CONFIGS: dict[str, tuple[type, str]] = {
    "encoder": (encoder_config.EncoderConfig, encoder_config.ENV_PREFIX),
    "search": (search_config.SearchConfig, search_config.ENV_PREFIX),
}
METRICS_PORTS = {"encoder": 9100, "search": 9101}


# --- reading compose files as Docker Compose does (the parts these files use) -------------

@dataclasses.dataclass
class Reset:
    """`!reset`: the override file removes the value."""


@dataclasses.dataclass
class Override:
    """`!override`: the override file replaces the value instead of merging."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
                       r"|\$(?P<bare>\w+)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """${VAR}, ${VAR:-default}, ${VAR-default} and $$, with `env` (empty by default: what
    a user who sets nothing gets)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, default = match.group("op"), match.group("default") or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?") and not env.get(name):
            raise KeyError(f"${{{name}}} is required: {default}")
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def normalise_environment(environment: Any) -> dict[str, str]:
    """Compose's list form (KEY=VALUE) or mapping form, as a mapping of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in environment)
        return {k: v for k, v in pairs}
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in environment.items()}


REPLACED_LISTS = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge, !reset removes, !override
    replaces, command/entrypoint/test replace, other sequences append what is new."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        if key == "environment":
            return {**normalise_environment(base), **normalise_environment(override)}
        merged = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                merged.pop(k, None)
            elif k in merged:
                merged[k] = merge(merged[k], v, k)
            else:
                merged[k] = v.value if isinstance(v, Override) else v
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_LISTS:
        return base + [item for item in override if item not in base]
    return override


def strip_tags(value: Any) -> Any:
    """A base file has no tags to apply; a stray one fails the checks below."""
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value.value if isinstance(value, Override) else value


def read_compose(*paths: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The project Compose would run from these files, with `env` as the shell's variables
    (none by default)."""
    project: dict[str, Any] = {}
    for path in paths:
        document = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader
        assert isinstance(document, dict), f"{path.name} is not a mapping"
        project = merge(project, document) if project else strip_tags(document)
    for service in project.get("services", {}).values():
        service["environment"] = normalise_environment(service.get("environment"))
    return interpolate(project, env)


VARIANTS = {"gpu": (COMPOSE,), "cpu": (COMPOSE, COMPOSE_CPU)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def project(request: pytest.FixtureRequest) -> dict[str, Any]:
    return read_compose(*VARIANTS[request.param])


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return read_compose(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return read_compose(COMPOSE, COMPOSE_CPU)


# --- checks, each a function that lists problems (so their failing is testable too) -------

def image_problems(image: str) -> list[str]:
    """An image reference must name a version: a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{image}: no tag (means latest)"]
    tag = last.split(":", 1)[1]
    if tag in ("", "latest") or "$" in tag:
        return [f"{image}: tag {tag!r} is not a pinned version"]
    return []


def env_problems(service: str, environment: dict[str, str]) -> list[str]:
    """Every CLIPSEARCH_* variable must be the variable of a flag of this service."""
    config_cls, prefix = CONFIGS[service]
    valid = {prefix + f.name.upper() for f in dataclasses.fields(config_cls)}
    return [f"{service}: {name} is not a flag of `clipsearch serve {service}`"
            for name in environment if name.startswith("CLIPSEARCH_") and name not in valid]


def parse_service_config(service: str, environment: dict[str, str],
                         monkeypatch: pytest.MonkeyPatch) -> Any:
    """The config the service would run with, parsed by its own flag parser from the
    container's environment (bad values fail as they would at start)."""
    config_cls, prefix = CONFIGS[service]
    for name in list(os.environ):
        if name.startswith(prefix):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_options(parser, config_cls, prefix)
    return from_namespace(config_cls, parser.parse_args([]))


def host_ports(service: dict[str, Any]) -> list[str]:
    """Host ports a service publishes ("" for an ephemeral one)."""
    published = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published.append(str(entry.get("published", "")))
            continue
        parts = str(entry).split("/")[0].split(":")
        published.append(parts[-2] if len(parts) >= 2 else "")
    return published


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in [*service.get("ports", []), *service.get("expose", [])]:
        target = entry.get("target") if isinstance(entry, dict) else str(entry).split("/")[0]
        ports.add(int(str(target).split(":")[-1]))
    return ports


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices") or []
            if d.get("driver") == "nvidia" or "gpu" in (d.get("capabilities") or [])]


def health_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(part) for part in test]


def clipsearch_service_of(service: dict[str, Any]) -> str | None:
    """Which of our Dockerfiles builds this service, if one does."""
    build = service.get("build")
    if not build:
        return None
    dockerfile = (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    for name, path in DOCKERFILES.items():
        if dockerfile.resolve() == path.resolve():
            return name
    return None


# --- the compose files -----------------------------------------------------------------

def test_the_services_are_there(project: dict[str, Any]) -> None:
    assert set(project["services"]) >= {"etcd", "minio", "standalone", "encoder", "search"}
    assert clipsearch_service_of(project["services"]["encoder"]) == "encoder"
    assert clipsearch_service_of(project["services"]["search"]) == "search"


def test_every_image_is_pinned_or_built_here(project: dict[str, Any]) -> None:
    problems = []
    for name, service in project["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: builds from {dockerfile}, which does not exist")
            if "image" in service:  # the name the build is tagged with
                problems += [f"{name}: {p}" for p in image_problems(service["image"])]
        elif "image" not in service:
            problems.append(f"{name}: neither image nor build")
        else:
            problems += [f"{name}: {p}" for p in image_problems(service["image"])]
    assert not problems, problems


def test_image_check_can_fail() -> None:
    assert image_problems("milvusdb/milvus")
    assert image_problems("milvusdb/milvus:latest")
    assert image_problems("localhost:5000/milvus")
    assert image_problems("milvusdb/milvus:${TAG}")
    assert not image_problems("localhost:5000/milvus:v2.5.16")
    assert not image_problems("quay.io/coreos/etcd@sha256:" + "0" * 64)


def test_milvus_is_the_published_standalone(gpu: dict[str, Any]) -> None:
    services = gpu["services"]
    assert services["standalone"]["image"].startswith("milvusdb/milvus:v2.5.")
    assert services["etcd"]["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert services["standalone"]["command"] == ["milvus", "run", "standalone"]
    env = services["standalone"]["environment"]
    assert env["ETCD_ENDPOINTS"] == "etcd:2379" and env["MINIO_ADDRESS"] == "minio:9000"
    assert {"19530", "9091"} <= set(host_ports(services["standalone"]))
    assert health_command(services["standalone"]) == [
        "CMD", "curl", "-f", "http://localhost:9091/healthz"]


def test_every_service_has_a_healthcheck(project: dict[str, Any]) -> None:
    for name, service in project["services"].items():
        check = service.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert not check.get("disable"), f"{name}: healthcheck disabled"
        assert health_command(service)[0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"


def test_our_services_are_probed_through_grpc_health(project: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONFIGS:
        service = project["services"][name]
        config = parse_service_config(name, service["environment"], monkeypatch)
        command = health_command(service)
        if command[0] == "CMD-SHELL":
            command = ["CMD", *shlex.split(command[1])]
        assert command[1:4] == ["clipsearch", "health", "--address"], f"{name}: {command}"
        host, _, port = command[4].rpartition(":")
        assert host in ("127.0.0.1", "localhost") and int(port) == config.port, \
            f"{name}: probes {command[4]} but listens on {config.port}"
    # A first start loads (and may download) the model before SERVING.
    start = project["services"]["encoder"]["healthcheck"].get("start_period", "0s")
    assert _seconds(start) >= 300, f"encoder start_period {start} is too short for a model load"


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_start_order_follows_health(project: dict[str, Any]) -> None:
    services = project["services"]
    depends = services["search"].get("depends_on")
    assert isinstance(depends, dict), "search: depends_on needs conditions (long form)"
    for needed in ("encoder", "standalone"):
        assert depends.get(needed, {}).get("condition") == "service_healthy", \
            f"search must wait for {needed} to be healthy"
    standalone = services["standalone"].get("depends_on")
    assert isinstance(standalone, dict)
    for needed in ("etcd", "minio"):
        assert standalone[needed]["condition"] == "service_healthy"
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_search_points_at_standalone_and_every_encoder(project: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    services = project["services"]
    search = parse_service_config("search", services["search"]["environment"], monkeypatch)
    encoder = parse_service_config("encoder", services["encoder"]["environment"], monkeypatch)
    assert search.milvus == "http://standalone:19530"
    assert search.encoder == f"dns:///encoder:{encoder.port}" == "dns:///encoder:50051"
    assert 19530 in container_ports(services["standalone"])
    assert search.host == "0.0.0.0" and encoder.host == "0.0.0.0", "bind all interfaces"
    assert "50052" in host_ports(services["search"]) and search.port == 50052


def test_encoder_can_scale(project: dict[str, Any]) -> None:
    encoder = project["services"]["encoder"]
    fixed = [port for port in host_ports(encoder) if port]
    assert not fixed, f"encoder publishes fixed host ports {fixed}: --scale would clash"
    assert "container_name" not in encoder, "container_name prevents --scale"


def test_host_port_check_can_fail() -> None:
    assert host_ports({"ports": ["50051:50051"]}) == ["50051"]
    assert host_ports({"ports": ["127.0.0.1:50051:50051/tcp"]}) == ["50051"]
    assert host_ports({"ports": [{"target": 50051, "published": 50051}]}) == ["50051"]
    assert host_ports({"ports": ["50051", {"target": 50051}]}) == ["", ""]


def test_gpu_in_the_main_file_only(gpu: dict[str, Any], cpu: dict[str, Any],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    devices = gpu_devices(gpu["services"]["encoder"])
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert parse_service_config("encoder", gpu["services"]["encoder"]["environment"],
                                monkeypatch).device == "cuda"
    assert not gpu_devices(cpu["services"]["encoder"]), "the CPU variant still reserves a GPU"
    assert parse_service_config("encoder", cpu["services"]["encoder"]["environment"],
                                monkeypatch).device == "cpu"
    assert "/cpu" in cpu["services"]["encoder"]["build"]["args"]["TORCH_INDEX_URL"]
    gpu_args = gpu["services"]["encoder"]["build"].get("args") or {}
    assert "/cpu" not in gpu_args.get("TORCH_INDEX_URL", ""), "the GPU image needs CUDA torch"
    assert cpu["services"]["encoder"]["image"] != gpu["services"]["encoder"]["image"]
    for name, service in gpu["services"].items():
        if name != "encoder":
            assert not gpu_devices(service), f"{name} reserves a GPU"


def test_the_override_reader_applies_reset() -> None:
    """`!reset` really removes (else the check above could pass for the wrong reason)."""
    base = {"services": {"a": {"deploy": {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}}}}
    override = yaml.load("services:\n  a:\n    deploy:\n      resources:\n        reservations:\n"
                         "          devices: !reset []\n", Loader=ComposeLoader)
    assert gpu_devices(base["services"]["a"])
    assert not gpu_devices(merge(base, override)["services"]["a"])
    assert gpu_devices(merge(base, {"services": {"a": {"image": "x:1"}}})["services"]["a"])


def test_environment_names_real_flags(project: dict[str, Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONFIGS:
        environment = project["services"][name]["environment"]
        assert not env_problems(name, environment), env_problems(name, environment)
        assert any(k.startswith(CONFIGS[name][1]) for k in environment)
        # Every value parses as its flag's type, as at the service's start.
        parse_service_config(name, environment, monkeypatch)
    for name, service in project["services"].items():
        if name not in CONFIGS:
            stray = [k for k in service["environment"] if k.startswith("CLIPSEARCH_")]
            assert not stray, f"{name} sets {stray}"


def test_environment_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_problems("encoder", {"CLIPSEARCH_ENCODER_BATCH_SIZE": "8"})
    assert env_problems("encoder", {"CLIPSEARCH_SEARCH_MILVUS": "http://x:19530"})
    assert env_problems("search", {"CLIPSEARCH_SEARCH_MILVUS_URI": "http://x:19530"})
    assert not env_problems("search", {"CLIPSEARCH_SEARCH_MILVUS": "http://x:19530",
                                       "PATH": "/usr/bin"})
    with pytest.raises(SystemExit):
        parse_service_config("encoder", {"CLIPSEARCH_ENCODER_PORT": "fifty"}, monkeypatch)


def test_weights_live_in_a_volume(project: dict[str, Any],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = project["services"]["encoder"]
    weights_dir = parse_service_config("encoder", encoder["environment"], monkeypatch).weights_dir
    mounts = {}
    for entry in encoder.get("volumes", []):
        if isinstance(entry, dict):
            mounts[entry["target"]] = entry.get("source", "")
        else:
            source, target = str(entry).split(":")[:2]
            mounts[target] = source
    assert weights_dir in mounts, f"no volume at the weights dir {weights_dir}"


def test_named_volumes_are_declared(project: dict[str, Any]) -> None:
    declared = set(project.get("volumes") or {})
    for name, service in project["services"].items():
        for entry in service.get("volumes", []):
            source = entry.get("source", "") if isinstance(entry, dict) else \
                str(entry).split(":")[0]
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_metrics_ports(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, port in METRICS_PORTS.items():
        service = project["services"][name]
        config = parse_service_config(name, service["environment"], monkeypatch)
        assert config.metrics_port == port, f"{name}: metrics on {config.metrics_port}"
        assert port in container_ports(service), f"{name}: metrics port {port} not exposed"


# --- the Dockerfiles --------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def user_problems(instructions: list[tuple[str, str]]) -> list[str]:
    users = [rest.split(":")[0] for keyword, rest in final_stage(instructions)
             if keyword == "USER"]
    if not users:
        return ["no USER in the final stage: runs as root"]
    if users[-1] in ("root", "0"):
        return [f"USER {users[-1]} is root"]
    return []


@pytest.mark.parametrize("service", sorted(DOCKERFILES))
def test_dockerfile_runs_as_a_user_with_a_healthcheck(service: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILES[service])
    final = final_stage(instructions)
    assert not user_problems(instructions), user_problems(instructions)
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK in the final stage"
    assert "clipsearch health --address" in checks[0]
    assert checks[0].split(" CMD ", 1)[0] != checks[0], "HEALTHCHECK ... CMD <command>"
    entrypoint = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == f'["clipsearch", "serve", "{service}"]'


def test_user_check_can_fail() -> None:
    assert user_problems([("FROM", "python:3.11.13-slim")])
    assert user_problems([("FROM", "python:3.11.13-slim"), ("USER", "root")])
    assert user_problems([("FROM", "a:1"), ("USER", "app"), ("FROM", "b:1")])
    assert not user_problems([("FROM", "a:1"), ("USER", "10001:10001")])


@pytest.mark.parametrize("service", sorted(DOCKERFILES))
def test_dockerfile_base_is_pinned_and_slim(service: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILES[service])
    defaults = arg_defaults(instructions)
    for keyword, rest in instructions:
        if keyword != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        assert not image_problems(image), image_problems(image)
        assert image.startswith("python:3.11") and "slim" in image, image


@pytest.mark.parametrize("service", sorted(DOCKERFILES))
def test_dockerfile_listens_where_compose_expects(service: str) -> None:
    final = final_stage(dockerfile_instructions(DOCKERFILES[service]))
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    prefix = CONFIGS[service][1]
    assert f"{prefix}HOST=0.0.0.0" in env, "bind all interfaces in a container"
    for name in re.findall(r"(CLIPSEARCH_\w+)=", env):
        assert not env_problems(service, {name: ""}), env_problems(service, {name: ""})
    exposed = {int(p.split("/")[0]) for keyword, rest in final if keyword == "EXPOSE"
               for p in rest.split()}
    config_cls = CONFIGS[service][0]
    port = next(f.default for f in dataclasses.fields(config_cls) if f.name == "port")
    assert {port, METRICS_PORTS[service]} <= exposed


def test_encoder_dockerfile_torch_matches_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(torch|torchvision)==([\w.]+)"', pyproject))
    assert set(pins) == {"torch", "torchvision"}, "pyproject.toml pins torch and torchvision"
    defaults = arg_defaults(dockerfile_instructions(DOCKERFILES["encoder"]))
    assert defaults["TORCH_VERSION"] == pins["torch"]
    assert defaults["TORCHVISION_VERSION"] == pins["torchvision"]


def test_search_dockerfile_installs_the_search_tier_only() -> None:
    final = final_stage(dockerfile_instructions(DOCKERFILES["search"]))
    installs = [rest for keyword, rest in final if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1, installs
    assert "[search]" in installs[0] and "[encoder]" not in installs[0], installs
    text = " ".join(rest for _, rest in final).lower()
    assert "torch" not in text, "the search image installs no torch"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".cache", "data", "results", "models"} <= ignored
    assert any("__pycache__" in line for line in ignored)


# --- a first deployment as it would go (issue 17) ----------------------------------------

def schema_problems(document: dict[str, Any]) -> list[str]:
    """Where `document` breaks the compose-spec JSON schema (as `docker compose config`
    checks it)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_each_file_matches_the_compose_spec(path: Path) -> None:
    document = yaml.load(path.read_text(), Loader=ComposeLoader)
    # `!reset` removes a value before validation; variables take their defaults.
    assert not schema_problems(interpolate(strip_tags(document))), \
        schema_problems(interpolate(strip_tags(document)))


def test_the_merged_projects_match_the_compose_spec(project: dict[str, Any]) -> None:
    assert not schema_problems(project), schema_problems(project)


def test_schema_check_can_fail(gpu: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(gpu))
    broken["services"]["encoder"]["restart"] = 3  # a number, not a policy
    broken["services"]["search"]["healthchek"] = {}  # a typo
    broken["services"]["minio"]["ports"] = [{"target": 9000, "publish": 9000}]
    problems = schema_problems(broken)
    assert len(problems) >= 3, problems
    assert any(p.startswith("services/encoder/restart") for p in problems)


def restart_problems(project: dict[str, Any]) -> list[str]:
    """A service of ours that another waits for (`service_healthy`) must not restart for
    ever when it cannot start: a restart resets its health to `starting`, so `up` would
    wait without end. `on-failure:N` ends it `exited`, which `up` reports."""
    problems = []
    services = project["services"]
    awaited = {dep for service in services.values()
               for dep, rule in (service.get("depends_on") or {}).items()
               if isinstance(rule, dict) and rule.get("condition") == "service_healthy"}
    for name in sorted(awaited):
        if clipsearch_service_of(services[name]) is None:
            continue  # etcd, MinIO and Milvus: their own images and restart habits
        policy = str(services[name].get("restart", "no"))
        match = re.fullmatch(r"on-failure:(\d+)", policy)
        if policy != "no" and not (match and 1 <= int(match.group(1)) <= 10):
            problems.append(f"{name}: restart {policy!r} never ends a failed start")
    return problems


def test_a_failed_encoder_start_ends_visibly(project: dict[str, Any]) -> None:
    assert not restart_problems(project), restart_problems(project)
    assert project["services"]["encoder"]["restart"].startswith("on-failure:")
    docs = DEPLOYMENT_DOC.read_text()
    assert "--wait --wait-timeout" in docs and "docker compose logs -f encoder" in docs


def test_restart_check_can_fail(gpu: dict[str, Any]) -> None:
    looping = json.loads(json.dumps(gpu))
    looping["services"]["encoder"]["restart"] = "unless-stopped"
    assert restart_problems(looping) == ["encoder: restart 'unless-stopped' never ends a "
                                         "failed start"]
    looping["services"]["encoder"]["restart"] = "on-failure"  # unbounded
    assert restart_problems(looping)


# The programs each image's health check may call (what the image has on every
# architecture it is published for).
HEALTH_TOOLS = {"quay.io/coreos/etcd": "etcdctl", "minio/minio": "mc",
                "milvusdb/milvus": "curl"}


def test_health_checks_use_tools_the_images_have(project: dict[str, Any]) -> None:
    for name, service in project["services"].items():
        command = health_command(service)
        program = shlex.split(command[1])[0] if command[0] == "CMD-SHELL" else command[1]
        if clipsearch_service_of(service):
            assert program == "clipsearch", f"{name}: {command}"
            continue
        repository = service["image"].rsplit(":", 1)[0]
        assert program == HEALTH_TOOLS[repository], f"{name}: {command}"
    # MinIO's image has no curl on arm64; `mc ready local` asks the server itself.
    assert health_command(project["services"]["minio"]) == ["CMD", "mc", "ready", "local"]


def host_ips(service: dict[str, Any]) -> list[str]:
    """The host address of each published port ("" for every interface)."""
    ips = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ips.append(str(entry.get("host_ip", "")))
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        ips.append(parts[0].strip("[]") if len(parts) == 3 else "")
    return ips


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ports_are_published_on_loopback_unless_asked(variant: str) -> None:
    for env, expected in (({}, "127.0.0.1"), ({"CLIPSEARCH_PUBLISH_HOST": "0.0.0.0"},
                                              "0.0.0.0")):
        project = read_compose(*VARIANTS[variant], env=env)
        published = {name: host_ips(service) for name, service in project["services"].items()
                     if service.get("ports")}
        assert {"search", "standalone"} <= set(published)
        for name, ips in published.items():
            assert ips and set(ips) == {expected}, f"{name} publishes on {ips} with {env}"
    assert "CLIPSEARCH_PUBLISH_HOST" in DEPLOYMENT_DOC.read_text()


def test_host_ip_check_can_fail() -> None:
    assert host_ips({"ports": ["50052:50052", "127.0.0.1:9101:9101", "9000"]}) == \
        ["", "127.0.0.1", ""]
    assert host_ips({"ports": ["[::1]:50052:50052", {"target": 1, "host_ip": "10.0.0.1"}]}) == \
        ["::1", "10.0.0.1"]


def test_torch_build_is_a_build_argument() -> None:
    """PyPI's torch is the CUDA 13.0 build (driver >= 580); another index picks another."""
    gpu_default = read_compose(COMPOSE)["services"]["encoder"]["build"]["args"]
    assert gpu_default["TORCH_INDEX_URL"] == ""  # PyPI: the CUDA 13.0 build
    cu126 = "https://download.pytorch.org/whl/cu126"
    for files in VARIANTS.values():
        chosen = read_compose(*files, env={"CLIPSEARCH_TORCH_INDEX_URL": cu126})
        assert chosen["services"]["encoder"]["build"]["args"]["TORCH_INDEX_URL"] == cu126
    final = final_stage(dockerfile_instructions(DOCKERFILES["encoder"]))
    assert ("ARG", "TORCH_INDEX_URL=") in final
    assert any(k == "RUN" and "TORCH_INDEX_URL" in rest and "torch==" in rest
               for k, rest in final)
    docs = DEPLOYMENT_DOC.read_text()
    assert "CLIPSEARCH_TORCH_INDEX_URL" in docs and "580" in docs and "Turing" in docs


def test_every_compose_variable_is_documented() -> None:
    docs = DEPLOYMENT_DOC.read_text()
    names = {m.group("name") or m.group("bare")
             for path in (COMPOSE, COMPOSE_CPU) for m in _VARIABLE.finditer(path.read_text())
             if m.group(0) != "$$"}
    assert names >= {"CLIPSEARCH_PUBLISH_HOST", "CLIPSEARCH_TORCH_INDEX_URL",
                     "CLIPSEARCH_WEIGHTS_MIRROR"}
    missing = sorted(name for name in names if f"`{name}`" not in docs)
    assert not missing, f"compose variables not in docs/deployment.md: {missing}"
