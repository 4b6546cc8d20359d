"""`speechgate dev`: the embedded defaults — a local file store with a signing key and a
development client, so the whole path runs on a laptop with one command."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from speechgate.core.clients import (
    ClientPolicy,
    check_client_id,
    check_secret,
    ensure_hash_key,
    hash_secret,
    new_client_secret,
    save_client,
    secret_name,
)
from speechgate.core.keys import ensure_signing_key
from speechgate.core.settings import Settings
from speechgate.core.store import SecretNotFound, SecretStore
from speechgate.devtools import offline_synthesis
from speechgate.relay.endpoints import CONVERSATION_PATH

DEV_CLIENT_ID = "dev-client"


@dataclass(frozen=True)
class DevClient:
    client_id: str
    client_secret: str


def _saved_path(store_dir: Path) -> Path:
    return store_dir / "dev-client.json"


def saved_client(store_dir: Path) -> DevClient | None:
    """The dev client `speechgate dev` made in this store, for the tools that act as an app."""
    path = _saved_path(store_dir)
    if not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return DevClient(saved["client_id"], saved["client_secret"])


async def bootstrap(store: SecretStore, store_dir: Path, environ: dict[str, str] | None = None) -> DevClient:
    """Make sure the store has a signing key and a development client; return its credentials.

    The dev client's secret is kept in `<store>/dev-client.json` (0600) so that a restart prints
    the same credentials; `SPEECHGATE_DEV_CLIENT_ID`/`_SECRET` fix them instead.
    """
    env = os.environ if environ is None else environ
    await ensure_signing_key(store)
    hash_key = await ensure_hash_key(store)
    saved_path = _saved_path(store_dir)
    saved: dict[str, str] = {}
    if saved_path.exists():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    client_id = env.get("SPEECHGATE_DEV_CLIENT_ID") or saved.get("client_id") or DEV_CLIENT_ID
    check_client_id(client_id)
    secret = (
        env.get("SPEECHGATE_DEV_CLIENT_SECRET")
        or (saved.get("client_secret") if saved.get("client_id") == client_id else None)
        or new_client_secret()
    )

    try:
        current = ClientPolicy.from_json((await store.get(secret_name(client_id))).value or "")
    except SecretNotFound:
        current = None
    if current is None or not check_secret(hash_key, current, secret):
        policy = ClientPolicy(
            client_id=client_id,
            name="development client created by speechgate dev",
            secret_hash=hash_secret(hash_key, client_id, secret),
        )
        await save_client(store, policy)
    if saved != {"client_id": client_id, "client_secret": secret}:
        fd = os.open(saved_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"client_id": client_id, "client_secret": secret}, handle)
    return DevClient(client_id, secret)


def banner(
    client: DevClient, token_url: str, relay_url: str, settings: Settings, private: bool = False
) -> str:
    if private:
        limits = f"Redis of its own at {settings.redis_url} (data in {settings.store_dir}/redis)"
    elif settings.redis_url:
        limits = f"Redis at {settings.redis_url}"
    else:
        limits = f"in-memory; revocation and quotas commands need Redis: {REDIS_HINT}"
    defaults = Settings()
    urls = (
        ""
        if (token_url, relay_url) == (defaults.issuer, defaults.relay_url)
        else (f" --token-url {token_url} --relay-url {relay_url}")
    )
    if settings.speech_endpoint or settings.speech_region:
        upstream = settings.speech_endpoint or f"Azure Speech in {settings.speech_region}"
    else:
        speaker = (
            "espeak-ng, PCM output formats" if offline_synthesis.ESPEAK else "none: install espeak-ng for it"
        )
        upstream = (
            "OFFLINE recognizer (PocketSphinx): English only, low accuracy;\n"
            f"                  synthesis: {speaker};\n"
            "                  set SPEECH_KEY and SPEECH_REGION for Azure Speech"
        )
    demo = relay_url.replace("ws://", "http://", 1) + "/demo"
    command = cli_command()
    credentials = f"{client.client_id}:{client.client_secret}"
    return f"""
speechgate dev — development mode, not for production
  token service   {token_url}
  relay           {relay_url}
                  Speech SDK endpoint: {relay_url}{CONVERSATION_PATH}
  upstream        {upstream}
  rate limits     {limits}
  dev client      client_id={client.client_id}
                  client_secret={client.client_secret}

Try it:
  1. get a token:
     curl -s -u '{credentials}' -d grant_type=client_credentials {token_url}/v1/token
  2. transcribe a WAV file (16 kHz mono is best; others are converted):
     {command} stream some.wav{urls}
  3. talk to it: open {demo} in a browser
"""


def cli_command() -> str:
    """How to run the CLI from a new terminal here: in a checkout, its wrapper (uv may be where a
    new shell does not look: `uv run` printed here once answered "uv: command not found")."""
    return "script/speechgate" if (Path.cwd() / "script" / "speechgate").is_file() else "speechgate"


# --- the running dev instance, as other commands find it -------------------------------------


@dataclass(frozen=True)
class DevState:
    """What a running `speechgate dev` serves, in `<store>/dev.json` while it runs: the URLs it
    bound and its private Redis, so that `stream`, `tokens`, `keys` and `quotas` find them."""

    token_url: str
    relay_url: str
    redis_url: str | None
    pid: int


def _state_path(store_dir: Path) -> Path:
    return store_dir / "dev.json"


def save_state(store_dir: Path, state: DevState) -> None:
    _state_path(store_dir).write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")


def clear_state(store_dir: Path) -> None:
    _state_path(store_dir).unlink(missing_ok=True)


def hold_store(store_dir: Path) -> int | None:
    """This process's hold on the store (a lock file descriptor, released when the process ends,
    however it ends), or None while another `speechgate dev` holds it. Two on one store once ran
    two Redis servers on one data folder, and the second's exit removed the first's dev.json."""
    store_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(store_dir / "dev.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def already_running(store_dir: Path) -> str:
    """What to tell a second `speechgate dev` on the same store."""
    state = running_state(store_dir)
    first = (
        f"PID {state.pid}, token service {state.token_url}, relay {state.relay_url}"
        if state
        else "it is still starting"
    )
    return (
        f"speechgate dev is already running on {store_dir} ({first}); use that one, stop it "
        "(Ctrl-C), or give this one a store of its own with SPEECHGATE_STORE_DIR"
    )


def running_state(store_dir: Path) -> DevState | None:
    """The state of the `speechgate dev` running on this store, if one is (its process alive)."""
    try:
        state = DevState(**json.loads(_state_path(store_dir).read_text(encoding="utf-8")))
        os.kill(state.pid, 0)
    except (OSError, ValueError, TypeError):
        return None
    return state


# --- a private Redis for dev -------------------------------------------------------------------

REDIS_HINT = "install redis-server (apt-get install redis-server, brew install redis) for shared limits"


def _die_with_parent() -> None:
    """In the child, before redis-server starts: on Linux, end it when dev's process ends, however
    dev ends (a SIGKILL included); elsewhere dev's own cleanup stops it."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        # SIGKILL: a SIGTERM makes redis-server save first, and refuse to exit when it cannot.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class PrivateRedis:
    """A redis-server of dev's own: loopback, a free port, its data in `<store>/redis`, stopped
    with dev. The security and SRE commands (revocation, quotas) need Redis; this gives them one."""

    def __init__(self, store_dir: Path) -> None:
        self.directory = (store_dir / "redis").absolute()  # redis-server changes into it first
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str | None:
        """The Redis URL, or None when redis-server is not installed or does not start."""
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.directory)]
        args += ["--save", "60 1", "--appendonly", "no", "--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(  # noqa: S603 - redis-server from PATH, our own arguments
            args,
            preexec_fn=_die_with_parent,
            # Not in the terminal's process group: Ctrl-C there stops dev, and dev stops this Redis
            # after the services (it once died first, and they logged its loss on the way out).
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        try:
            for _ in range(100):
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        self.url = url
                        return url
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)  # redis-server is starting: poll its port
        finally:
            client.close()
        self.stop()
        return None

    def stop(self) -> None:
        """Stop it, saving its data; if it cannot save (and so will not exit), stop it anyway."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
