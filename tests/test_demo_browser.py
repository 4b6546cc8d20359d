"""The demo page in a real browser: Debian's Chromium, driven by Playwright, with a fake microphone
that plays tests/data/speech.wav, against `speechgate dev` recognizing offline."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.support.cli import SPEECHGATE
from tests.support.processes import Process, free_port

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes advise: no background connections (the network is closed), a fresh profile.
QUIET = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAKE_MICROPHONE = [
    "--use-fake-ui-for-media-stream",  # grant the microphone without asking
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={SPEECH_WAV}",
]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    relay_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("SPEECH_KEY", "SPEECH_REGION", "REDIS_URL")},
        "SPEECHGATE_PORT": str(free_port()),
        "SPEECHGATE_RELAY_PORT": str(relay_port),
    }
    with Process([SPEECHGATE, "dev"], "Uvicorn running on", env=env, cwd=tmp_path_factory.mktemp("demo")):
        yield f"http://127.0.0.1:{relay_port}/demo"


def launch(playwright: object, args: list[str]) -> Browser:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run does)")
    browser: Browser = playwright.chromium.launch(  # type: ignore[attr-defined]
        executable_path=CHROMIUM, headless=True, args=QUIET + args
    )
    return browser


def test_the_demo_page_shows_final_transcripts_with_their_latency(demo_url: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright, FAKE_MICROPHONE)
        try:
            page = browser.new_page()
            page.goto(demo_url)
            page.click("#start")
            page.wait_for_selector("text=listening: speak", timeout=15_000)
            final = page.wait_for_selector("#finals li.final", timeout=30_000)
            assert final is not None
            text = final.inner_text()
            latency = final.query_selector(".latency")
            assert latency is not None
            assert latency.inner_text().endswith(" ms")
            assert text.removesuffix(latency.inner_text()).strip()  # a transcript, not only a figure
            page.screenshot(path=str(ARTIFACTS / "demo-chromium.png"), full_page=True)
            assert page.inner_text("#error") == ""
            page.click("#stop")
            page.wait_for_selector("text=done", timeout=15_000)
        finally:
            browser.close()


def test_the_demo_page_shows_why_it_cannot_listen(demo_url: str) -> None:
    with sync_playwright() as playwright:
        # No fake UI: the microphone request is denied, as when a user says no.
        browser = launch(playwright, ["--use-fake-device-for-media-stream", "--deny-permission-prompts"])
        try:
            page = browser.new_page()
            page.goto(demo_url)
            page.click("#start")
            page.wait_for_selector("#error:not(:empty)", timeout=15_000)
            assert "Permission denied" in page.inner_text("#error")
            assert page.inner_text("#status") == "stopped"
            assert page.is_enabled("#start")
        finally:
            browser.close()


def test_the_compressed_switch_streams_mediarecorders_opus_and_gets_the_same_kind_of_result(
    demo_url: str,
) -> None:
    """Chromium's MediaRecorder (WebM/Opus, 250-ms chunks cut wherever it likes) from the fake
    microphone, decoded by the relay: transcripts come, in a fraction of PCM's bytes."""
    with sync_playwright() as playwright:
        browser = launch(playwright, FAKE_MICROPHONE)
        try:
            page = browser.new_page()
            page.goto(demo_url)
            page.check("#compressed")
            page.click("#start")
            page.wait_for_selector("text=listening (webm-opus): speak", timeout=15_000)
            final = page.wait_for_selector("#finals li.final", timeout=30_000)
            assert final is not None
            latency = final.query_selector(".latency")
            assert latency is not None
            assert final.inner_text().removesuffix(latency.inner_text()).strip()
            sent = page.inner_text("#sent")  # "12.3 kB sent (as PCM: 140.6 kB)"
            numbers = [float(n) for n in re.findall(r"(\d+\.\d) kB", sent)]
            assert len(numbers) == 2, sent
            assert numbers[1] >= 6 * numbers[0], sent  # the browser's bitrate, its container's overhead
            assert page.inner_text("#error") == ""
            page.click("#stop")
            page.wait_for_selector("text=done", timeout=15_000)
        finally:
            browser.close()
