"""WebSocket frames (RFC 6455 §5) without I/O, for the relay's splice: find where each frame
starts and ends in a byte stream, peek at a few payload bytes, build the handful of frames the
relay writes itself (close, pong). Payloads are never copied or re-encoded here.

A client's frame keeps its mask when forwarded: the app masked it with a key of its own choosing,
and the relay is the client of Azure, so the very same bytes are a valid client frame upstream.
Server frames are unmasked both ways. So forwarding is writing the received bytes unchanged.
"""

from __future__ import annotations

import os
import struct

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (CONTINUATION, TEXT, BINARY)


class FrameError(ValueError):
    """Not a frame the relay accepts; `code` is the close code to answer with."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


class Header:
    """Where one frame lies in a buffer. A plain slotted class: one is made per frame on the relay's
    hot path, and a frozen dataclass's `__init__` costs twice as much."""

    __slots__ = ("end", "fin", "length", "mask", "opcode", "start")

    def __init__(self, fin: bool, opcode: int, mask: bytes | None, start: int, length: int) -> None:
        self.fin = fin
        self.opcode = opcode
        self.mask = mask  # 4 bytes, or None for an unmasked (server) frame
        self.start = start  # where the payload starts in the buffer
        self.length = length  # payload length
        self.end = start + length

    def __repr__(self) -> str:
        return f"Header(fin={self.fin}, opcode={self.opcode}, start={self.start}, length={self.length})"


def parse_header(buffer: bytes | bytearray, offset: int, max_length: int) -> Header | None:
    """The header of the frame at `offset`, or None if the buffer does not hold all of it yet."""
    available = len(buffer) - offset
    if available < 2:
        return None
    first, second = buffer[offset], buffer[offset + 1]
    if first & 0x70:
        raise FrameError("reserved bits set: no extension was negotiated")
    opcode = first & 0x0F
    length = second & 0x7F
    start = offset + 2
    if length == 126:  # the usual audio frame: read without struct's call
        if available < 4:
            return None
        length = buffer[start] << 8 | buffer[start + 1]
        start += 2
    elif length == 127:
        if available < 10:
            return None
        (length,) = struct.unpack_from(">Q", buffer, start)
        start += 8
    if opcode >= CLOSE:
        if length > 125 or not first & 0x80:
            raise FrameError("control frames are at most 125 bytes and never fragmented")
    elif opcode not in DATA_OPCODES:
        raise FrameError(f"unknown opcode {opcode}")
    if length > max_length:
        raise FrameError(f"frame of {length} bytes; the limit is {max_length}", 1009)
    mask = None
    if second & 0x80:
        if len(buffer) < start + 4:
            return None
        mask = bytes(buffer[start : start + 4])
        start += 4
    return Header(bool(first & 0x80), opcode, mask, start, length)


def peek(buffer: bytes | bytearray, header: Header, at: int, count: int) -> bytes:
    """`count` payload bytes from payload offset `at`, unmasked; fewer if the payload is shorter."""
    begin = header.start + at
    chunk = buffer[begin : min(begin + count, header.end)]
    mask = header.mask
    if mask is None or not chunk:
        return bytes(chunk)
    size, turn = len(chunk), at & 3
    if size <= 2:  # the USP header's length, the first byte of a payload: the splice's usual asks
        return (
            bytes([chunk[0] ^ mask[turn]])
            if size == 1
            else bytes([chunk[0] ^ mask[turn], chunk[1] ^ mask[(turn + 1) & 3]])
        )
    key = ((mask[turn:] + mask[:turn]) * (size // 4 + 1))[:size]
    return (int.from_bytes(chunk, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def peek_u16(buffer: bytes | bytearray, header: Header) -> int | None:
    """The payload's first two bytes as a big-endian number, unmasked; None if it is shorter."""
    if header.length < 2:
        return None
    at, mask = header.start, header.mask
    if mask is None:
        return buffer[at] << 8 | buffer[at + 1]
    return (buffer[at] ^ mask[0]) << 8 | (buffer[at + 1] ^ mask[1])


def byte_at(buffer: bytes | bytearray, header: Header, at: int) -> int:
    """The payload's byte at offset `at` (within the payload), unmasked."""
    mask = header.mask
    value = buffer[header.start + at]
    return value if mask is None else value ^ mask[at & 3]


def payload(buffer: bytes | bytearray, header: Header, limit: int | None = None) -> bytes:
    """The payload (its first `limit` bytes), unmasked: control frames and the text the relay reads."""
    end = header.end if limit is None else min(header.end, header.start + limit)
    data = bytes(buffer[header.start : end])
    if header.mask is None:
        return data
    key = (header.mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def encode(opcode: int, data: bytes, masked: bool) -> bytes:
    """A whole (FIN) frame; masked with a fresh random key when the relay writes as a client."""
    head = bytes([0x80 | opcode])
    length = len(data)
    bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", length)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", length)
    if not masked:
        return head + data
    mask = os.urandom(4)
    key = (mask * (length // 4 + 1))[:length]
    return head + mask + (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def fit_reason(reason: str) -> str:
    """A close reason cut to the 123 bytes a close frame holds, still valid UTF-8."""
    return reason.encode("utf-8")[:123].decode("utf-8", "ignore")


def close_payload(code: int, reason: str) -> bytes:
    """At most 125 bytes, as control frames must be."""
    return struct.pack(">H", code) + fit_reason(reason).encode("utf-8")


def parse_close(data: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005: none given)."""
    if len(data) < 2:
        return 1005, ""
    (code,) = struct.unpack_from(">H", data)
    return code, data[2:].decode("utf-8", "replace")
