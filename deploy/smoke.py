"""The container stack, run for real: build, start, stream, drain, tear down.

    uv run python deploy/smoke.py [--local-base] [--keep]

1. Builds the image (deploy/build-image; `--local-base`: base images from Debian's packages, for
   machines that reach no registry) and, with `--local-base`, a Redis image the same way; checks
   that the image runs as uid 10001 with no pip, setuptools, uv or compiler in it.
2. Starts deploy/compose.yaml with deploy/compose.smoke.yaml (a fake Azure Speech service inside the
   stack's network) in order: Redis, `keys init`, the token service and the relay.
3. Registers a client with the CLI inside the token service's container, gets a token from the
   container's token service and streams tests/data/speech.wav with `speechgate stream` through
   the container's relay (only 127.0.0.1 from here).
4. Reads both services' /metrics and checks that they counted the token and the stream.
5. Stops the relay container with its stop signal while a stream is mid-turn: new streams are
   refused at once (readiness 503), the live one goes on to the end of its audio with every final result and
   closes with 1000 (the plain door's turn is the whole stream), and the container exits 0.
6. Tears the stack down (volumes too); on a failure first prints every container's logs.
7. With podman: runs the Kubernetes manifests (deploy/k8s/base) as pods with `podman kube play`,
   made local by `local_manifests` (what it changes, and why, is written there): the keys-init Job's
   container and a Redis pod, then the token service and relay Deployments with their ConfigMap;
   checks that they run as the user and read-only root they ask for, checks the path of
   every probe they declare, and streams through them to a fake Speech service on the host.

With podman, podman-compose; with Docker, `docker compose` (and no step 7: use a real cluster).
Exits 1 on any failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "speechgate-smoke"
ISSUER = "http://127.0.0.1:8000"
RELAY_URL = "ws://127.0.0.1:8001"
WAV = ROOT / "tests" / "data" / "speech.wav"
LOCAL_REDIS = "localhost/redis:bookworm-local"
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # an import has none
# What podman needs on these machines (docs/operations.md): runc, as crun refuses the cgroups
# here, and limits on open files below the host's hard limit.
PODMAN_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""


class Failed(Exception):
    """A check failed; the message says which and what was seen."""


def say(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def run(
    *command: str, check: bool = True, capture: bool = False, quiet: bool = False, timeout: float = 600
) -> str:
    if not quiet:
        say("$ " + " ".join(command))
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=capture, timeout=timeout)
    if check and done.returncode != 0:
        detail = f":\n{done.stdout[-3000:]}{done.stderr[-3000:]}" if capture else ""
        raise Failed(f"{' '.join(command)} exited {done.returncode}{detail}")
    return done.stdout if capture else ""


def until(what: str, probe: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.25)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def names(engine: list[str]) -> list[str]:
    """Every container's name, running or not."""
    return run(*engine, "ps", "-a", "--format", "{{.Names}}", capture=True, quiet=True).split()


def inspect(engine: list[str], container: str, template: str) -> str:
    return run(*engine, "inspect", "--format", template, container, capture=True, quiet=True).strip()


def print_logs(engine: list[str], prefix: str) -> None:
    for name in names(engine):
        if name.startswith(prefix):
            print(f"----- logs of {name} -----", flush=True)
            subprocess.run([*engine, "logs", name], cwd=ROOT, check=False)


class Stack:
    """One compose project: the commands of whichever engine is here."""

    def __init__(self) -> None:
        if shutil.which("podman"):
            if not shutil.which("podman-compose"):
                raise Failed("podman is here but podman-compose is not (apt-get install podman-compose)")
            self.engine = ["podman"]
            self.compose = ["podman-compose"]
        elif shutil.which("docker"):
            self.engine = ["docker"]
            self.compose = ["docker", "compose"]
        else:
            raise Failed("neither podman nor docker is installed")
        self.compose += ["-p", PROJECT, "-f", "deploy/compose.yaml", "-f", "deploy/compose.smoke.yaml"]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return run(*self.compose, *args, capture=True, timeout=timeout)  # podman-compose says much

    def container(self, service: str) -> str:
        """The container's name (podman-compose: project_service_1; Docker: project-service-1)."""
        seen = names(self.engine)
        for name in seen:
            if name in (f"{PROJECT}_{service}_1", f"{PROJECT}-{service}-1"):
                return name
        raise Failed(f"no container for {service} among {seen}")


def build(stack: Stack, local_base: bool) -> None:
    run(
        "deploy/build-image",
        *(["--local-base"] if local_base else []),
        "--tag",
        "localhost/speechgate:latest",
    )
    os.environ["SPEECHGATE_IMAGE"] = "localhost/speechgate:latest"
    if not local_base:
        return
    exists = subprocess.run([*stack.engine, "image", "exists", LOCAL_REDIS], check=False).returncode == 0
    if not exists:
        with tempfile.TemporaryDirectory() as rootfs:
            say(f"making {LOCAL_REDIS} with debootstrap")
            run(
                "debootstrap",
                "--variant=minbase",
                "--include=redis-server",
                "bookworm",
                rootfs,
                "http://deb.debian.org/debian",
                capture=True,
            )
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(
                [*stack.engine, "import", "--change", f"ENV PATH={DEBIAN_PATH}", "-", LOCAL_REDIS],
                stdin=tar.stdout,
                check=True,
            )
            tar.wait()
    os.environ["REDIS_IMAGE"] = LOCAL_REDIS


IMAGE_FACTS = """
import importlib.metadata, json, os, shutil
from speechgate.relay.opus import native
found = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
print(json.dumps({
    "uid": os.getuid(),
    "tools": [t for t in ("pip", "pip3", "uv", "gcc", "cc", "make") if shutil.which(t)],
    "installers": sorted(found & {"pip", "setuptools", "uv"}),
    "distributions": len(found),
    "opus": native().version if native() else None,
}))
"""


def check_image(engine: list[str]) -> None:
    """What the final image promises: not root, no installers or compilers on PATH or in the venv,
    and Opus decoded by libopus (FFmpeg's decoder costs up to twice the CPU)."""
    image = os.environ["SPEECHGATE_IMAGE"]
    out = run(*engine, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", IMAGE_FACTS,
              capture=True)  # fmt: skip
    facts = json.loads(out)
    say(f"image: {int(inspect(engine, image, '{{.Size}}')) / 1e6:.0f} MB, {facts}")
    if facts["uid"] != 10001 or facts["tools"] or facts["installers"]:
        raise Failed(f"the image should run as 10001 with no installers or compilers: {facts}")
    if not str(facts["opus"]).startswith("libopus "):
        raise Failed(f"the image's relay would decode Opus without libopus: {facts}")


def start(stack: Stack) -> None:
    stack("up", "-d", "--no-build", "redis", "fake-speech")
    redis = stack.container("redis")
    until(
        "Redis answers PING",
        lambda: (
            "PONG"
            in run(*stack.engine, "exec", redis, "redis-cli", "ping", check=False, capture=True, quiet=True)
        ),
        60,
    )
    stack("run", "--rm", "--no-deps", "init")
    stack("up", "-d", "--no-build", "--no-deps", "token-service", "relay")
    until("the token service is ready", lambda: answers(f"{ISSUER}/readyz"), 60)
    until("the relay is ready", lambda: answers(f"{RELAY_URL.replace('ws', 'http', 1)}/readyz"), 60)
    say("ready: token service on 127.0.0.1:8000, relay on 127.0.0.1:8001")


def register_client(engine: list[str], container: str) -> tuple[str, str]:
    """`speechgate clients add` in the token service's container: (client id, its secret)."""
    out = run(*engine, "exec", container, "speechgate", "clients", "add", "smoke", "--json", capture=True)
    client = json.loads(out)
    return str(client["client_id"]), str(client["client_secret"])


def stream_once(client_id: str, secret: str) -> dict[str, Any]:
    os.environ["SPEECHGATE_CLIENT_SECRET"] = secret  # not on the command line, which is printed
    out = run(
        str(Path(sys.executable).with_name("speechgate")),
        "stream",
        str(WAV),
        "--token-url",
        ISSUER,
        "--relay-url",
        RELAY_URL,
        "--client-id",
        client_id,
        "--fast",
        "--json",
        capture=True,
    )
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finals = [line for line in lines if line["type"] == "final"]
    summary = lines[-1] if lines else {}
    if not finals or summary.get("type") != "summary":
        raise Failed(f"the stream gave no final result: {out[-2000:]}")
    say(f"stream: {len(finals)} finals, first {finals[0]['text']!r}; summary {summary}")
    return summary


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def check_metrics() -> None:
    relay = httpx.get(f"{RELAY_URL.replace('ws', 'http', 1)}/metrics", timeout=5).text
    tokens = httpx.get(f"{ISSUER}/metrics", timeout=5).text
    figures = {
        "speechgate_tokens_issued_total": metric(tokens, "speechgate_tokens_issued_total"),
        "speechgate_relay_closes_total": metric(relay, "speechgate_relay_closes_total"),
        "speechgate_relay_audio_seconds_total": metric(relay, "speechgate_relay_audio_seconds_total"),
    }
    say(f"metrics: { {name: round(value, 2) for name, value in figures.items()} }")
    missing = [name for name, value in figures.items() if value <= 0]
    if missing:
        raise Failed(f"/metrics did not count the stream: {missing} are 0")


async def stream_through_a_stop(stack: Stack, token: str) -> tuple[list[str], list[str], int | None]:
    """Half the audio, the relay's stop signal, the rest: the events before and after the stop, and
    the close code."""
    pcm = WAV.read_bytes()[44:]
    half = len(pcm) // 2
    events: list[str] = []
    url = f"{RELAY_URL}/v1/listen?language=en-US"
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        for at in range(0, half, 3200):
            await ws.send(pcm[at : at + 3200])
        while not events:  # a result: the turn is under way upstream
            events.append(json.loads(await ws.recv())["type"])
        after: list[str] = []
        stopping = threading.Thread(target=stack, args=("stop", "-t", "45", "relay"), daemon=True)
        stopping.start()
        # The relay has the signal once new streams are refused; then the second half goes.
        await asyncio.to_thread(
            until,
            "the relay refuses new streams",
            lambda: not answers(f"{RELAY_URL.replace('ws', 'http', 1)}/readyz"),
            30,
        )
        for at in range(half, len(pcm), 3200):
            await ws.send(pcm[at : at + 3200])
        await ws.send(json.dumps({"type": "end"}))
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                after.append(json.loads(message)["type"])
        await asyncio.to_thread(stopping.join, 60)
    return events, after, ws.close_code


def check_drain(stack: Stack, client_id: str, secret: str) -> None:
    token = httpx.post(
        f"{ISSUER}/v1/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
        timeout=10,
    ).json()["access_token"]
    before, after, code = asyncio.run(stream_through_a_stop(stack, str(token)))
    exit_code = run(
        *stack.engine, "inspect", "--format", "{{.State.ExitCode}}", stack.container("relay"), capture=True
    ).strip()
    say(f"drain: before the stop {before}, after it {after}, close {code}, relay container exit {exit_code}")
    if "final" not in after or code != 1000:
        raise Failed(f"the stream mid-turn did not finish its turn: after the stop {after}, close {code}")
    if exit_code != "0":
        raise Failed(f"the relay container exited {exit_code} on its stop signal, not 0")


# --- Kubernetes manifests as pods (podman kube play) ------------------------------------------

K8S_BASE = ROOT / "deploy" / "k8s" / "base"
# What kube play runs: it has no Job, HorizontalPodAutoscaler, PodDisruptionBudget,
# NetworkPolicy or ServiceAccount (tests/test_deploy.py validates those against the schemas).
PLAYED = {"ConfigMap", "Deployment"}
PODMAN = ["podman"]
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def local_manifests(
    store: Path, speech_url: str, redis_url: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """deploy/k8s/base made to run on one machine: (the ConfigMap and Deployments, the keys-init
    Job's pod). The pods' own specs (image entry point, args, envFrom, probes, security contexts,
    resources) are kept; what a cluster would provide is replaced:
    - the image: the one just built (kustomize's `images:` does this in an overlay);
    - Key Vault and workload identity: a file store on a hostPath volume;
    - the Redis Secret (secretKeyRef): REDIS_URL as a value, a Redis pod's address;
    - Services and cluster DNS: host networking on 127.0.0.1, so the JWKS URL is the token service's
      loopback address, each Deployment runs one replica (two would share one port) and the
      container ports go (podman refuses them with host networking; the probes keep the numbers);
    - Azure Speech: the fake on the host, with its key."""
    import yaml

    docs = [
        doc
        for path in sorted(K8S_BASE.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    for name in ("SPEECHGATE_KEY_VAULT_URL", "SPEECHGATE_SPEECH_RESOURCE_ID", "SPEECH_REGION"):
        config["data"].pop(name, None)
    config["data"].update(
        {
            "SPEECHGATE_STORE_DIR": "/data/store",
            "SPEECHGATE_UPSTREAM_AUTH": "key",
            "SPEECHGATE_SPEECH_ENDPOINT": speech_url,
            "SPEECH_KEY": "0123456789abcdef0123456789abcdef",  # the fake's; a real key lives in Key Vault
            "SPEECHGATE_JWKS_URL": f"{ISSUER}/.well-known/jwks.json",
            "SPEECHGATE_ISSUER": ISSUER,
            "SPEECHGATE_RELAY_URL": RELAY_URL,
            "SPEECHGATE_HOST": "127.0.0.1",
            "SPEECHGATE_RELAY_HOST": "127.0.0.1",
        }
    )

    def localize(spec: dict[str, Any]) -> dict[str, Any]:
        spec["hostNetwork"] = True
        spec.pop("serviceAccountName", None)
        spec["volumes"] = [{"name": "store", "hostPath": {"path": str(store), "type": "Directory"}}]
        for container in spec["containers"]:
            container["image"] = os.environ["SPEECHGATE_IMAGE"]
            # Podman refuses container ports with host networking: the probes name the numbers.
            ports = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
            for kind in PROBES:
                if kind in container:
                    get = container[kind]["httpGet"]
                    get["port"] = ports.get(get["port"], get["port"])
            container["volumeMounts"] = [{"name": "store", "mountPath": "/data/store"}]
            container["env"] = [
                {"name": "REDIS_URL", "value": redis_url} if env["name"] == "REDIS_URL" else env
                for env in container.get("env", [])
            ]
        return spec

    played = []
    for doc in docs:
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 1
            localize(doc["spec"]["template"]["spec"])
        if doc["kind"] in PLAYED:
            played.append(doc)
    job = next(doc for doc in docs if doc["kind"] == "Job")
    init_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": job["metadata"]["name"],
            "labels": job["spec"]["template"]["metadata"]["labels"],
        },
        "spec": {**localize(job["spec"]["template"]["spec"]), "restartPolicy": "Never"},
    }
    return played, init_pod


def probe_paths(manifests: list[dict[str, Any]]) -> list[str]:
    """Every httpGet probe the Deployments declare, as a URL on this machine."""
    urls: set[str] = set()
    for doc in manifests:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
            for kind in PROBES:
                get = container[kind]["httpGet"]
                urls.add(f"http://127.0.0.1:{ports.get(get['port'], get['port'])}{get['path']}")
    return sorted(urls)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kube_play() -> None:
    import yaml

    port, redis_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    # The manifests expect a managed Redis (a Secret holds its URL); here, a pod of its own.
    redis_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "speechgate-smoke-redis"},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {
                    "name": "redis",
                    "image": os.environ.get("REDIS_IMAGE", "redis:7-alpine"),
                    "command": [
                        "redis-server",
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        str(redis_port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                }
            ],
        },
    }
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.speech", "127.0.0.1", str(port)], cwd=ROOT)
    with tempfile.TemporaryDirectory() as work:
        store = Path(work) / "store"
        store.mkdir()
        os.chown(store, 10001, 10001)  # the pods' user, as fsGroup would in a cluster
        manifests, init_pod = local_manifests(store, f"ws://127.0.0.1:{port}", redis_url)
        played = Path(work) / "speechgate.yaml"
        played.write_text(yaml.safe_dump_all(manifests))
        init = Path(work) / "keys-init.yaml"
        config = next(doc for doc in manifests if doc["kind"] == "ConfigMap")
        init.write_text(yaml.safe_dump_all([config, redis_pod, init_pod]))
        try:
            run("podman", "kube", "play", "--replace", str(init), capture=True)
            name = f"{init_pod['metadata']['name']}-keys-init"
            until(
                "the keys-init pod has exited",
                lambda: inspect(PODMAN, name, "{{.State.Status}}") == "exited",
                60,
            )
            status = inspect(PODMAN, name, "{{.State.ExitCode}}")
            if status != "0":
                raise Failed(f"the keys-init Job's container exited {status}")
            run("podman", "kube", "play", "--replace", str(played), capture=True)
            for url in probe_paths(manifests):
                until(f"the probe {url} answers 200", functools.partial(answers, url), 60)
            say(f"kube play: every probe the manifests declare answers 200: {probe_paths(manifests)}")
            pods = [name for name in names(PODMAN) if name.endswith(("-token-service", "-relay"))]
            for name in pods:
                seen = inspect(PODMAN, name, "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}")
                if seen != "10001:10001 true":
                    raise Failed(f"{name} runs as {seen}: the manifests ask for 10001 and a read-only root")
            say(f"kube play: {', '.join(pods)} run as 10001:10001 on a read-only root")
            token_service = next(name for name in pods if name.endswith("-token-service"))
            stream_once(*register_client(PODMAN, token_service))
        except (Failed, subprocess.TimeoutExpired, StopIteration):
            print_logs(PODMAN, "speechgate-")
            raise
        finally:
            run("podman", "kube", "down", str(played), check=False, capture=True)
            run("podman", "kube", "down", str(init), check=False, capture=True)
            fake.terminate()
            fake.wait(10)


@contextlib.contextmanager
def podman_settings() -> Iterator[None]:
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write(PODMAN_CONF)
        conf.flush()
        os.environ["CONTAINERS_CONF"] = conf.name
        yield


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--local-base", action="store_true", help="base images from Debian's packages")
    parser.add_argument("--keep", action="store_true", help="leave the compose stack running (no kube play)")
    args = parser.parse_args()
    started = time.monotonic()
    with podman_settings():
        stack = Stack()
        ok = False
        try:
            build(stack, args.local_base)
            check_image(stack.engine)
            stack("down", "-v", timeout=120)  # what an earlier, interrupted run left
            start(stack)
            client_id, secret = register_client(stack.engine, stack.container("token-service"))
            stream_once(client_id, secret)
            check_metrics()
            check_drain(stack, client_id, secret)
            if not args.keep:
                stack("down", "-v", timeout=120)
                if stack.engine == PODMAN:
                    kube_play()
            ok = True
        except (Failed, subprocess.TimeoutExpired, httpx.HTTPError, OSError) as exc:
            say(f"FAILED: {exc}")
            print_logs(stack.engine, PROJECT)
        finally:
            if not args.keep:
                stack("down", "-v", timeout=120)
    say(f"{'passed' if ok else 'failed'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
