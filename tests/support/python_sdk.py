"""Driving the official Python Speech SDK in tests: the waiting every continuous test needs."""

from __future__ import annotations

import threading
from typing import Any

import azure.cognitiveservices.speech as speechsdk


def continuous(recognizer: Any, start: str, stop: str, timeout: float = 60) -> list[Any]:
    """Runs a recognizer or transcriber to the end of its audio; its final results. The end of
    the file cancels with EndOfStream; any other cancellation fails the test with its details."""
    results: list[Any] = []
    errors: list[str] = []
    stopped = threading.Event()
    final = getattr(recognizer, "transcribed", None) or recognizer.recognized
    final.connect(lambda e: results.append(e.result))
    recognizer.session_stopped.connect(lambda e: stopped.set())

    def canceled(e: Any) -> None:
        if e.cancellation_details.reason != speechsdk.CancellationReason.EndOfStream:
            errors.append(e.cancellation_details.error_details)
        stopped.set()

    recognizer.canceled.connect(canceled)
    getattr(recognizer, start)().get()
    assert stopped.wait(timeout)
    getattr(recognizer, stop)().get()
    assert not errors
    return results
