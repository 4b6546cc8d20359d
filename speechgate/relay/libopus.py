"""libopus itself, through ctypes: the decoder the relay prefers for Opus.

libopus decodes straight to 16 kHz (one of Opus' own output rates, RFC 6716 §4), so nothing is
resampled, and speech a phone encoded at 16 kHz (SILK, wideband) is decoded without running the
full-band decoder at all. FFmpeg's decoder, through PyAV, always gives 48 kHz and needs a
resampler after it: 1.5 to 2.2 times the CPU per audio second (docs/benchmarks.md, bench/opus_cost.py).

No binding on PyPI that ships libopus in wheels is kept up (those found were a few months old,
with one release day each), so this is the few calls the relay needs. The library is the one
PyAV's wheels already carry (the relay depends on PyAV anyway; nothing to install), else the
system's. Where neither is found, `load()` gives None and opus.py decodes with FFmpeg: slower,
the same audio. tests/test_opus.py checks that it is found on the platforms CI runs on, so a PyAV
release that stops carrying it fails a test instead of quietly costing CPU.

ctypes lets go of the GIL during each call, as PyAV does: a decoder may run in a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

MAX_FRAME_MS = 120  # the longest Opus packet (RFC 6716 §3.2.5)
BUFFER_FRAMES = 4  # a decoder's buffer holds 4 of the longest packets: a 250-ms chunk of 20-ms ones
# auditwheel (Linux) and delvewheel (Windows) put a wheel's libraries in `<package>.libs`, delocate
# (macOS) in `<package>/.dylibs`; the name may carry a hash: libopus-114e2b1a.so.0.11.1.
_NAME = re.compile(r"^(lib)?opus([-.]|-?\d)")
_SUFFIXES = (".so", ".dylib", ".dll")


class OpusError(ValueError):
    """libopus refused a packet; the message is its own (opus_strerror)."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index  # of the packet refused, in the list given to `Decoder.decode`


@dataclass(frozen=True)
class Library:
    path: str
    version: str
    _lib: ctypes.CDLL

    def decoder(self, rate: int, channels: int = 1) -> Decoder:
        return Decoder(self, rate, channels)

    def strerror(self, code: int) -> str:
        message: bytes = self._lib.opus_strerror(code)
        return message.decode("ascii", "replace")


def _candidates() -> list[Path]:
    found: list[Path] = []
    spec = importlib.util.find_spec("av")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        package = Path(location)
        for folder in (package.parent / "av.libs", package / ".dylibs", package):
            if folder.is_dir():
                found += sorted(
                    p for p in folder.iterdir() if _NAME.match(p.name) and any(s in p.name for s in _SUFFIXES)
                )
    system = ctypes.util.find_library("opus")
    if system is not None:
        found.append(Path(system))
    return found


def _bind(path: Path) -> Library | None:
    try:
        lib = ctypes.CDLL(str(path))
        create = lib.opus_decoder_create
        decode = lib.opus_decode
        destroy = lib.opus_decoder_destroy
        version = lib.opus_get_version_string
        strerror = lib.opus_strerror
    except (OSError, AttributeError):  # not loadable here, or not libopus after all
        return None
    create.restype = ctypes.c_void_p
    create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    decode.restype = ctypes.c_int
    decode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    destroy.restype = None
    destroy.argtypes = [ctypes.c_void_p]
    version.restype = ctypes.c_char_p
    version.argtypes = []
    strerror.restype = ctypes.c_char_p
    strerror.argtypes = [ctypes.c_int]
    return Library(str(path), version().decode("ascii", "replace"), lib)


def load() -> Library | None:
    """libopus from PyAV's wheel, else the system's; None where there is neither."""
    for path in _candidates():
        library = _bind(path)
        if library is not None:
            return library
    return None


class Decoder:
    """One stream's libopus decoder: packets in, 16-bit PCM out at `rate`, `channels` (a mono
    decoder mixes a stereo stream down itself)."""

    def __init__(self, library: Library, rate: int, channels: int) -> None:
        self._library = library
        error = ctypes.c_int()
        state = library._lib.opus_decoder_create(rate, channels, ctypes.byref(error))
        if not state:
            raise OpusError(
                f"libopus cannot decode at {rate} Hz, {channels} channels: {library.strerror(error.value)}"
            )
        self._state = ctypes.c_void_p(state)
        self._frames = rate * MAX_FRAME_MS // 1000
        self._channels = channels
        self._out = ctypes.create_string_buffer(BUFFER_FRAMES * self._frames * channels * 2)
        weakref.finalize(self, library._lib.opus_decoder_destroy, self._state)

    def decode(self, packets: list[bytes]) -> bytes:
        """The PCM of `packets`, decoded one after the other into one buffer, copied out when
        the next packet might not fit: memory for the audio decoded, whatever the packets claim."""
        largest = self._frames * self._channels * 2
        decode, state, start, size = (
            self._library._lib.opus_decode,
            self._state,
            ctypes.addressof(self._out),
            len(self._out),
        )
        done, at = bytearray(), 0
        for index, packet in enumerate(packets):
            if at + largest > size:
                done += ctypes.string_at(start, at)
                at = 0
            samples = decode(state, packet, len(packet), start + at, self._frames, 0)
            if samples < 0:
                raise OpusError(self._library.strerror(samples), index)
            at += samples * self._channels * 2
        if not done:  # the usual chunk: one copy
            return ctypes.string_at(start, at)
        done += ctypes.string_at(start, at)
        return bytes(done)
