"""deploy/: the manifests against the Kubernetes schemas, the alerting rules through promtool, and
every metric the dashboard and the alerts use against what the running services export."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from websockets.sync.client import connect

from speechgate.core.settings import ENV_NAMES
from tests.support.relays import Stack

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest AKS version still in support when this was written
METRIC = re.compile(r"\bspeechgate_[a-z_]+")
HISTOGRAM_OR_COUNTER = re.compile(r"_(bucket|sum|count|total|created)$")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_kustomizations_name_files_that_exist_and_cover_every_manifest() -> None:
    named: set[Path] = set()
    for kustomization in kustomizations():
        spec = documents(kustomization)[0]
        assert spec["kind"] == "Kustomization"
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            named.add(target)
    assert {p.resolve() for p in manifests()} <= named  # no manifest is forgotten


def test_workloads_are_hardened_and_probed() -> None:
    deployments = [d for p in manifests() for d in documents(p) if d["kind"] in ("Deployment", "Job")]
    assert {d["metadata"]["name"] for d in deployments} == {
        "speechgate-token-service",
        "speechgate-relay",
        "speechgate-keys-init",
    }
    for workload in deployments:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["serviceAccountName"] == "speechgate"
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
            if workload["kind"] == "Deployment":
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    assert container[probe]["httpGet"]["path"] in ("/healthz", "/readyz")
    relay = next(d for d in deployments if d["metadata"]["name"] == "speechgate-relay")
    config = next(d for d in documents(K8S / "base" / "configmap.yaml"))
    drain_s = int(config["data"]["SPEECHGATE_DRAIN_S"])
    assert relay["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_s


def test_configuration_names_only_settings_that_exist() -> None:
    """A typo in an environment variable would be ignored at run time: catch it here."""
    known = set(ENV_NAMES.values()) | {"REDIS_URL"}
    configmaps = [d for p in manifests() for d in documents(p) if d["kind"] == "ConfigMap"]
    names = {name for c in configmaps for name in c["data"]}
    compose = documents(DEPLOY / "compose.yaml")[0]
    names |= set(compose["x-speechgate"]["environment"])
    smoke = documents(DEPLOY / "compose.smoke.yaml")[0]
    names |= {name for service in smoke["services"].values() for name in service.get("environment", {})}
    assert names
    assert names <= known, names - known


def test_compose_runs_redis_token_service_and_relay_from_the_image() -> None:
    compose = documents(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"redis", "init", "token-service", "relay"}
    assert services["token-service"]["command"] == ["token-service"]
    assert services["relay"]["command"] == ["relay"]
    assert compose["x-speechgate"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_dockerfile_is_multi_stage_non_root_without_build_tools_in_the_final_stage() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3.11-slim-bookworm$", text, flags=re.MULTILINE)
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) == 2
    build, final = stages
    assert build.startswith("${PYTHON_IMAGE} AS build")
    assert final.startswith("${PYTHON_IMAGE}\n")
    # every dependency pinned by hash, as wheels: no compiler, the same bytes as the lock says
    assert "--only-binary :all: --require-hashes -r /tmp/requirements.txt" in build
    assert "--no-index --find-links /wheels" in build  # the offline mode
    assert "pip uninstall --yes setuptools pip" in build  # the venv's own installers: not needed to run
    assert "uv" not in re.sub(r"--from=build /app/.venv", "", final).split()  # no uv in the final image
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in final
    assert re.search(r"^USER 10001", final, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["speechgate"]' in final


def test_the_images_requirements_are_the_lock_exported() -> None:
    """deploy/requirements.txt is `uv export` of uv.lock: a dependency change shows up in the image."""
    exported = subprocess.run(
        [
            "uv",
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--format",
            "requirements-txt",
            "--quiet",
        ],
        cwd=DEPLOY.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    body = [line for line in exported.splitlines() if not line.startswith("#")]
    committed = (DEPLOY / "requirements.txt").read_text(encoding="utf-8").splitlines()
    again = (
        "uv export --frozen --no-dev --no-emit-project --format requirements-txt -o deploy/requirements.txt"
    )
    assert body == [line for line in committed if not line.startswith("#")], f"run: {again}"


def test_the_build_context_holds_the_requirements_and_the_wheelhouse_and_no_secrets() -> None:
    ignored = (DEPLOY.parent / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert {"deploy", "!deploy/requirements.txt", "!deploy/wheels", ".speechgate", ".git"} <= set(ignored)
    assert (DEPLOY / "wheels" / ".gitignore").read_text(encoding="utf-8").split() == ["*", "!.gitignore"]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (.ci/run does)")
    return found


def test_alerting_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    rules = DEPLOY / "prometheus"
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=rules, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 11 rules found" in check.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"],
        cwd=rules,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_alerts_cover_what_sres_must_hear_about() -> None:
    rules = documents(DEPLOY / "prometheus" / "alerts.yaml")[0]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "SpeechgateRedisDown",
        "SpeechgateEventsNotSubscribed",
        "SpeechgateKeyStoreStale",
        "SpeechgateUpstreamFailures",
        "SpeechgateHigh5xxRate",
        "SpeechgateTokenRefusalsRising",
        "SpeechgateStreamRefusalsRising",
        "SpeechgateTenantNearDailyQuota",
        "SpeechgateKeyTooOld",
        "SpeechgateUpstreamPoolNearlyFull",
        "SpeechgateUpstreamUnhealthy",
    }


def _used_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "speechgate.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = documents(DEPLOY / "prometheus" / "alerts.yaml")[0]["groups"][0]["rules"]
    exprs += [str(r["expr"]) for r in rules]
    return {HISTOGRAM_OR_COUNTER.sub("", m) for e in exprs for m in METRIC.findall(e)}


def _exported(text: str) -> set[str]:
    """Every family the scrape declares (labelled ones too, before their first sample)."""
    return {
        HISTOGRAM_OR_COUNTER.sub("", line.split()[2])
        for line in text.splitlines()
        if line.startswith("# TYPE ")
    }


def test_every_metric_the_dashboard_and_alerts_use_is_exported(stack: Stack) -> None:
    # Traffic first: a token, a refused one, a stream with results, a refused handshake.
    client = stack.service.add_client()
    token = stack.token(client)
    assert stack.service.token(client[0], "wrong").status_code == 401
    with connect(
        f"{stack.relay.url}/v1/listen?language=en-US", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        for _ in range(20):
            ws.send(b"\0" * 3200)
        ws.send(json.dumps({"type": "end"}))
        while json.loads(ws.recv()).get("type") != "final":
            pass
    with pytest.raises(Exception, match="401"), connect(f"{stack.relay.url}/v1/listen"):
        pass
    exported = _exported(stack.service.http.get("/metrics").text)
    exported |= _exported(httpx.get(stack.relay.url.replace("ws://", "http://") + "/metrics").text)
    used = _used_metrics()
    assert len(used) >= 15
    assert used <= exported, f"used but not exported: {sorted(used - exported)}"


# Labelled by client id (or a key id): those series appear with the client's first token or
# stream. Every other series a panel or an alert names exists, at 0, before anything happened.
PER_CLIENT = {
    "speechgate_tokens_issued",
    "speechgate_tokens_refused",
    "speechgate_relay_audio_seconds",
    "speechgate_quota_use_ratio",
}


def _sampled(text: str) -> set[str]:
    return {
        HISTOGRAM_OR_COUNTER.sub("", re.split(r"[{ ]", line, maxsplit=1)[0])
        for line in text.splitlines()
        if line.startswith("speechgate_")
    }


def test_every_series_the_dashboard_and_alerts_use_exists_before_its_first_event(stack_factory: Any) -> None:
    """With a pool configured, `speechgate_upstream_refusals_total` was absent until an upstream
    refused, so its panel and any alert on it read "no data" (so did every refusal reason, close
    code and door before its first use)."""
    from speechgate.core.upstreams import Upstream, save_pool

    stack: Stack = stack_factory()
    asyncio.run(save_pool(stack.service.store, [Upstream("home", 10)], "test"))
    relay = stack.relay.url.replace("ws://", "http://")
    stack.relay.call(stack.relay.relay.pool.load())  # what the reload event does

    sampled = _sampled(stack.service.http.get("/metrics").text) | _sampled(httpx.get(f"{relay}/metrics").text)
    missing = _used_metrics() - PER_CLIENT - sampled
    assert not missing, f"no series before the first event: {sorted(missing)}"
    relay_text = httpx.get(f"{relay}/metrics").text
    assert 'speechgate_upstream_refusals_total{reason="throttled",upstream="home"} 0.0' in relay_text
    assert 'speechgate_relay_refusals_total{reason="audio_quota"} 0.0' in relay_text
