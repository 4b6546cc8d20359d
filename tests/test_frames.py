"""speechgate/relay/frames.py: frame boundaries, peeking through masks, the frames the relay writes itself."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from speechgate.relay import frames


def websockets_frame(opcode: Opcode, data: bytes, mask: bool, fin: bool = True) -> bytes:
    """The reference encoding, from the websockets library."""
    return Frame(opcode, data, fin).serialize(mask=mask, extensions=[])


@pytest.mark.parametrize("size", [0, 5, 125, 126, 3200, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [True, False])
def test_headers_match_the_reference_encoding_at_every_length_form(size: int, mask: bool) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    wire = websockets_frame(Opcode.BINARY, data[:size], mask)
    header = frames.parse_header(wire, 0, 2**20)
    assert header is not None
    assert (header.fin, header.opcode, header.length, header.end) == (True, frames.BINARY, size, len(wire))
    assert (header.mask is not None) == mask
    assert frames.payload(wire, header) == data[:size]
    assert frames.peek(wire, header, 3, 7) == data[3:10][: max(0, size - 3)]
    assert frames.peek_u16(wire, header) == (int.from_bytes(data[:2], "big") if size >= 2 else None)
    for at in range(min(5, size)):  # every phase of the mask
        assert frames.byte_at(wire, header, at) == data[at]


def test_an_incomplete_frame_is_waited_for() -> None:
    wire = websockets_frame(Opcode.BINARY, b"x" * 70000, mask=True)
    for cut in (1, 3, 9, 13):
        assert frames.parse_header(wire[:cut], 0, 2**20) is None
    header = frames.parse_header(wire[:14], 0, 2**20)  # the header is whole; the payload is not
    assert header is not None
    assert header.end > 14


def test_frames_follow_each_other_in_one_buffer() -> None:
    wire = websockets_frame(Opcode.TEXT, b"hello", True) + websockets_frame(
        Opcode.BINARY, b"abc", True, False
    )
    first = frames.parse_header(wire, 0, 100)
    assert first is not None
    second = frames.parse_header(wire, first.end, 100)
    assert second is not None
    assert (first.opcode, second.opcode, second.fin) == (frames.TEXT, frames.BINARY, False)
    assert frames.payload(wire, second) == b"abc"


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes([0xC2, 0x00]), 1002),  # RSV1
        (bytes([0x83, 0x00]), 1002),  # opcode 3
        (bytes([0x09, 0x00]), 1002),  # a fragmented ping
        (bytes([0x89, 126, 0, 200]), 1002),  # a ping over 125 bytes
        (bytes([0x82, 127]) + (2**20 + 1).to_bytes(8, "big"), 1009),  # over the limit
    ],
)
def test_bad_frames_are_refused_with_their_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(frames.FrameError) as caught:
        frames.parse_header(wire, 0, 2**20)
    assert caught.value.code == code


@pytest.mark.parametrize("masked", [True, False])
def test_frames_of_our_own_parse_with_websockets(masked: bool) -> None:
    data = frames.close_payload(4000, "token revoked")
    wire = frames.encode(frames.CLOSE, data, masked=masked)
    reader = StreamReader()
    reader.feed_data(wire)
    parser = Frame.parse(reader.read_exact, mask=masked)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert (frame.opcode, frame.data) == (Opcode.CLOSE, data)
    assert frames.parse_close(frame.data) == (4000, "token revoked")
    assert frames.parse_close(b"") == (1005, "")
