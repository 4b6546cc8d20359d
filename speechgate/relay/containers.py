"""The containers compressed audio comes in, read without I/O: bytes in at any boundary (a
recorder's chunks cut pages and elements anywhere), codec packets out.

- `OggReader`: Ogg (RFC 3533), as Firefox's `MediaRecorder`, Android and iOS Opus encoders and
  `opusenc` write it: one logical stream, each page's CRC checked.
- `WebmReader`: WebM (Matroska's EBML), as Chromium's `MediaRecorder` writes it: a Segment and
  Clusters of unknown size. The reader walks elements flat: it enters the few containers that lead
  to the audio (Segment, Tracks, TrackEntry, Cluster, BlockGroup) and reads or skips everything
  else by its size, skipping without holding it.

Both say what is wrong with a `ContainerError`: not this container at all, a damaged page, more
than one stream, audio that is not Opus.
"""

from __future__ import annotations

import struct
import zlib


class ContainerError(ValueError):
    """The bytes are not the container the stream declared, or are damaged; the message says which."""


# --- Ogg ------------------------------------------------------------------------------------

CAPTURE = b"OggS"
HEADER = struct.Struct("<4sBBqIII B")  # capture, version, flags, granule, serial, sequence, crc, segments
MAX_PACKET = 64 * 1024  # far more than an Opus packet (at most 1275 bytes a frame, 120 ms)

# Ogg's CRC-32 is unreflected (polynomial 0x04C11DB7, initial value 0, no final XOR). zlib's is the
# reflected form: on bit-reversed bytes it gives the bit-reversed checksum, in C.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))
_ZEROS = bytes(4)


def _unreflected(reflected: int) -> int:
    """`reflected`'s 32 bits in reverse order: its bytes reversed, and each byte's bits."""
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_REVERSED), "big")


def crc(data: bytes | bytearray) -> int:
    return _unreflected(zlib.crc32(bytes(data).translate(_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF)


def page_crc(page: bytes) -> int:
    """The CRC of an Ogg page, computed as its checksum field (bytes 22 to 25) were zero."""
    view = memoryview(page.translate(_REVERSED))
    reflected = zlib.crc32(view[26:], zlib.crc32(_ZEROS, zlib.crc32(view[:22], 0xFFFFFFFF)))
    return _unreflected(reflected ^ 0xFFFFFFFF)


def page_size(buffer: bytes | bytearray, at: int = 0) -> int | None:
    """The size of the Ogg page at `at` (header, lacing, body), or None until its lacing is there."""
    if len(buffer) < at + 27:
        return None
    segments = buffer[at + 26]
    if len(buffer) < at + 27 + segments:
        return None
    return 27 + segments + sum(buffer[at + 27 : at + 27 + segments])


def ogg_pages(data: bytes) -> list[bytes]:
    """A whole Ogg stream cut into its pages, unchecked (for tools and tests that send pages)."""
    pages, at = [], 0
    while (size := page_size(data, at)) is not None and at + size <= len(data):
        pages.append(data[at : at + size])
        at += size
    return pages


class OggReader:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._packet = bytearray()  # a packet continued on the next page
        self._serial: int | None = None
        self.pages = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        packets: list[bytes] = []
        while len(self._buffer) >= 4:
            if self._buffer[:4] != CAPTURE:
                raise ContainerError("not an Ogg page where one should start (is this Ogg/Opus?)")
            size = page_size(self._buffer)
            if size is None or len(self._buffer) < size:
                break
            page = bytes(self._buffer[:size])
            del self._buffer[:size]
            packets += self._page(page)
        return packets

    def _page(self, page: bytes) -> list[bytes]:
        lacing = page[27 : 27 + page[26]]
        _, version, flags, _, serial, _, checksum, _ = HEADER.unpack_from(page)
        if version != 0:
            raise ContainerError(f"Ogg version {version} is not known; only 0 is")
        if page_crc(page) != checksum:
            raise ContainerError(f"Ogg page {self.pages} is damaged (its checksum does not match)")
        if self._serial is None:
            self._serial = serial
        elif serial != self._serial:
            raise ContainerError("more than one Ogg stream; send one Opus stream")
        if not flags & 1 and self._packet:  # the continued packet was never finished
            raise ContainerError(f"Ogg page {self.pages} drops a packet the page before began")
        self.pages += 1
        packets, at = [], 27 + len(lacing)
        for size in lacing:
            self._packet += page[at : at + size]
            at += size
            if len(self._packet) > MAX_PACKET:
                raise ContainerError(f"an Ogg packet larger than {MAX_PACKET} bytes")
            if size < 255:
                packets.append(bytes(self._packet))
                self._packet.clear()
        return packets


# --- WebM -----------------------------------------------------------------------------------

EBML, SEGMENT, CLUSTER, TRACKS, TRACK_ENTRY, BLOCK_GROUP = (
    0x1A45DFA3,
    0x18538067,
    0x1F43B675,
    0x1654AE6B,
    0xAE,
    0xA0,
)
SIMPLE_BLOCK, BLOCK, TRACK_NUMBER, CODEC_ID, CODEC_PRIVATE = 0xA3, 0xA1, 0xD7, 0x86, 0x63A2
ENTERED = frozenset({SEGMENT, CLUSTER, TRACKS, TRACK_ENTRY, BLOCK_GROUP})
READ = frozenset({SIMPLE_BLOCK, BLOCK, TRACK_NUMBER, CODEC_ID, CODEC_PRIVATE})
MAX_ELEMENT = 256 * 1024  # an element the reader holds: far more than a block of Opus frames
UNKNOWN = -1


def vint(data: bytes | bytearray, at: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at `at`: (value, length), None until all of it is there."""
    if at >= len(data):
        return None
    first = data[at]
    length = 8 - first.bit_length() + 1
    if first == 0 or length > 8:
        raise ContainerError("not WebM where an element should start (is this WebM/Opus?)")
    if at + length > len(data):
        return None
    value = int.from_bytes(data[at : at + length], "big")
    if keep_marker:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (UNKNOWN if value == (1 << (7 * length)) - 1 else value), length


class WebmReader:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0  # bytes of an element being skipped that have not arrived yet
        self._started = False
        self.codec_private: bytes | None = None  # the Opus track's OpusHead
        self._track: int | None = None  # the Opus track's number
        self._entry: dict[int, bytes] = {}  # the TrackEntry being read

    def feed(self, data: bytes) -> list[bytes]:
        """The Opus frames that `data` completes."""
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        self._buffer += data
        frames: list[bytes] = []
        while True:
            element = vint(self._buffer, 0, True)
            if element is None:
                break
            ident, id_length = element
            if not self._started:
                if ident != EBML:
                    raise ContainerError(
                        "not WebM: it does not start with an EBML header (is this WebM/Opus?)"
                    )
                self._started = True
            sized = vint(self._buffer, id_length, False)
            if sized is None:
                break
            size, size_length = sized
            head = id_length + size_length
            if ident in ENTERED:
                self._enter(ident)
                del self._buffer[:head]
                continue
            if size == UNKNOWN:
                raise ContainerError(f"WebM element {ident:#x} of unknown size; only containers may be")
            if ident in READ:
                if size > MAX_ELEMENT:
                    raise ContainerError(
                        f"a WebM element of {size} bytes; the largest taken is {MAX_ELEMENT}"
                    )
                if len(self._buffer) < head + size:
                    break
                frames += self._read(ident, bytes(self._buffer[head : head + size]))
                del self._buffer[: head + size]
            else:  # skipped whole, even if it has not all arrived
                available = min(len(self._buffer) - head, size)
                self._skip = size - available
                del self._buffer[: head + available]
        return frames

    def _enter(self, ident: int) -> None:
        if ident == TRACK_ENTRY:
            self._entry = {}

    def _read(self, ident: int, body: bytes) -> list[bytes]:
        if ident in (TRACK_NUMBER, CODEC_ID, CODEC_PRIVATE):
            self._entry[ident] = body
            if CODEC_ID in self._entry and TRACK_NUMBER in self._entry and self._track is None:
                if self._entry[CODEC_ID].rstrip(b"\0") != b"A_OPUS":
                    codec = self._entry[CODEC_ID].rstrip(b"\0").decode("ascii", "replace")[:20]
                    if codec.startswith("A_"):
                        raise ContainerError(f"the WebM audio is {codec}, not Opus")
                    return []  # a video track, say: not ours
                self._track = int.from_bytes(self._entry[TRACK_NUMBER], "big")
            if ident == CODEC_PRIVATE and self._entry.get(CODEC_ID, b"").rstrip(b"\0") == b"A_OPUS":
                self.codec_private = body
            return []
        # SimpleBlock or Block: track number, 16-bit relative time, flags, then the frame(s)
        number = vint(body, 0, False)
        if number is None or len(body) < number[1] + 3:
            raise ContainerError("a WebM block too short to hold its header")
        if self._track is None:
            raise ContainerError("WebM audio before its track was described (no Opus track?)")
        if number[0] != self._track:
            return []
        flags = body[number[1] + 2]
        if flags & 0x06:
            raise ContainerError("laced WebM blocks are not taken; send one Opus frame a block")
        return [body[number[1] + 3 :]]
