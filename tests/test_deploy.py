"""The deploy files, checked without Docker or Kubernetes (neither runs here).

Each YAML file parses; every environment variable the worker is given is a real setting;
the image runs `trio-counter-worker` with a real command; compose builds the image once
and publishes nothing by default; the Kubernetes manifest ships no Secret, and the
example Secret holds placeholders only.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trio_counter_worker.cli import main
from trio_counter_worker.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_PORTS = DEPLOY / "docker-compose.ports.yml"
KUBERNETES = DEPLOY / "kubernetes.yaml"
K8S_SECRET = DEPLOY / "k8s-secret.example.yaml"
DOCKERFILE = ROOT / "Dockerfile"

SETTING_NAMES = frozenset(s.name for s in SETTINGS)
SECRET_NAMES = frozenset(s.name for s in SETTINGS if s.secret)
WORKERS = ("worker-1", "worker-2", "worker-3")
# Variables the Python base image reads, not the worker.
PYTHON_ENV = re.compile(r"PYTHON[A-Z_]*|PIP_[A-Z_]+")
# What a shipped value of a secret setting may be: an obvious placeholder.
PLACEHOLDER = re.compile(r"change-me[a-z-]*|<[^<>]+>")


def load(path: Path) -> Any:
    (document,) = yaml.safe_load_all(path.read_text())
    return document


def load_all(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load(COMPOSE)["services"]
    return services


def deployment_container() -> dict[str, Any]:
    (deployment,) = load_all(KUBERNETES)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            yield instruction.upper(), rest.strip()


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: use the NAME=value form"
                env[name] = value
    return env


def dockerfile_exec_form(name: str) -> list[str]:
    (rest,) = [rest for instruction, rest in dockerfile_instructions() if instruction == name]
    value = json.loads(rest)  # the exec form: a JSON array, so signals reach the worker
    assert isinstance(value, list)
    return [str(v) for v in value]


def assert_a_command(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``args`` is a command line the worker's CLI accepts (checked with --help)."""
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0, capsys.readouterr().err
    capsys.readouterr()


def assert_placeholder(name: str, value: str, where: str) -> None:
    if "://" in value:  # a URL: no credentials in it, or only a placeholder
        credentials = value.split("://", 1)[1].partition("@")
        password = credentials[0].partition(":")[2] if credentials[1] else ""
        assert not password or PLACEHOLDER.fullmatch(password), f"{where}: {name} has a password"
    else:
        assert PLACEHOLDER.fullmatch(value), f"{where}: {name}={value!r} is not a placeholder"


# -- every file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    documents = load_all(path)
    assert documents
    assert all(isinstance(d, dict) for d in documents)


def test_the_files_the_tests_know_are_all_there_is() -> None:
    # the alert rules and the dashboard have theirs in tests/test_alerts.py
    known = {COMPOSE, COMPOSE_PORTS, KUBERNETES, K8S_SECRET, DEPLOY / "prometheus-alerts.yml"}
    assert set(DEPLOY.glob("*.y*ml")) == known  # a new file needs its own checks here
    assert {p.name for p in DEPLOY.glob("*.json")} == {"grafana-dashboard.json"}


# -- the image -------------------------------------------------------------------------


def test_image_runs_the_installed_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert dockerfile_exec_form("ENTRYPOINT") == ["trio-counter-worker"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["trio-counter-worker"] == "trio_counter_worker.cli:main"
    assert_a_command(dockerfile_exec_form("CMD"), capsys)


def test_image_env_names_are_settings() -> None:
    env = dockerfile_env()
    assert env  # the parse found the ENV block
    worker_env = {name for name in env if not PYTHON_ENV.fullmatch(name)}
    assert worker_env <= SETTING_NAMES, worker_env - SETTING_NAMES
    assert not worker_env & SECRET_NAMES  # the image holds no secret


# -- compose ---------------------------------------------------------------------------


def test_compose_worker_env_names_are_settings() -> None:
    services = compose_services()
    for name in WORKERS:
        env = services[name]["environment"]
        assert isinstance(env, dict)  # the mapping form, so the names can be checked
        assert set(env) <= SETTING_NAMES, (name, set(env) - SETTING_NAMES)
        assert env["REPLICA_ID"] == name
        for key in env.keys() & SECRET_NAMES:
            assert_placeholder(key, str(env[key]), f"{COMPOSE.name} {name}")


def test_compose_builds_the_image_once_and_runs_it_three_times() -> None:
    services = compose_services()
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["worker-1"]
    image = services["worker-1"]["image"]
    assert all(services[name]["image"] == image for name in WORKERS)
    assert all(services[name]["pull_policy"] == "never" for name in WORKERS)
    build = services["worker-1"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert all("entrypoint" not in services[name] for name in WORKERS)
    assert all("command" not in services[name] for name in WORKERS)  # CMD: run


def test_compose_publishes_nothing_by_default() -> None:
    assert {name: s["ports"] for name, s in compose_services().items() if "ports" in s} == {}


def test_compose_ports_override_uses_loopback_and_ports_of_its_own() -> None:
    base = compose_services()
    published = load(COMPOSE_PORTS)["services"]
    assert set(published) <= set(base)
    host_ports = []
    for service in published.values():
        for mapping in service["ports"]:
            address, host_port, container_port = str(mapping).split(":")
            assert address == "127.0.0.1"
            host_ports.append(int(host_port))
            assert int(container_port) in (6379, 3000, 8080)
    assert len(set(host_ports)) == len(host_ports)
    # Not the ports a local Redis, app or proxy already uses.
    assert not set(host_ports) & {6379, 3000, 8080, 8081, 8082, 8083}


# -- Kubernetes ------------------------------------------------------------------------


def test_kubernetes_ships_no_secret() -> None:
    kinds = [d["kind"] for d in load_all(KUBERNETES)]
    assert kinds == ["Deployment"]


def test_kubernetes_env_names_are_settings(capsys: pytest.CaptureFixture[str]) -> None:
    container = deployment_container()
    names = {entry["name"] for entry in container["env"]}
    assert names <= SETTING_NAMES, names - SETTING_NAMES
    assert not names & SECRET_NAMES  # secret settings come from the Secret only
    assert "command" not in container  # the image's ENTRYPOINT: trio-counter-worker
    assert_a_command(container["args"], capsys)
    (source,) = container["envFrom"]
    assert source["secretRef"]["name"] == load(K8S_SECRET)["metadata"]["name"]


def test_kubernetes_memory_limit_covers_the_documented_rss() -> None:
    limit = deployment_container()["resources"]["limits"]["memory"]
    match = re.fullmatch(r"(\d+)Mi", limit)
    assert match, limit
    assert int(match.group(1)) >= 256  # ~95 MiB RSS at 100k counters (README, Figures)


def test_example_secret_holds_placeholders_only() -> None:
    secret = load(K8S_SECRET)
    assert secret["kind"] == "Secret"
    values = secret["stringData"]
    assert "RESET_SECRET" in values
    assert set(values) <= SECRET_NAMES, set(values) - SECRET_NAMES
    for name, value in values.items():
        assert_placeholder(name, str(value), K8S_SECRET.name)
    # The commented optional entries are meant to be uncommented: the same rules hold.
    commented = yaml.safe_load(
        "\n".join(
            line.strip().removeprefix("# ")
            for line in K8S_SECRET.read_text().splitlines()
            if re.fullmatch(r"\s+# [A-Z_]+: \S+", line)
        )
    )
    assert commented
    for name, value in commented.items():
        assert name in SECRET_NAMES
        assert_placeholder(name, str(value), f"{K8S_SECRET.name} (commented)")


def test_no_file_carries_a_real_looking_secret() -> None:
    """Over the raw text, comments included: a password in a URL must be a placeholder."""
    for path in [*DEPLOY.glob("*.y*ml"), DOCKERFILE]:
        for match in re.finditer(r"rediss?://[^\s'\"]*@", path.read_text()):
            assert_placeholder("a Redis URL", match.group(0), path.name)
