"""The value codec between the sandbox and trusted code (nanochat/sandbox/plain_data.py): round trips keep type and
value, anything with behaviour is refused on the way in, and hostile bytes are refused on the way out."""

import collections
import math
import os

import pytest

from nanochat.sandbox.plain_data import MAX_BYTES, MAX_DEPTH, PlainDataError, decode, encode, read_frame, write_frame

VALUES = [None, True, False, 0, -1, 2**63 - 1, 2**63, -2**63 - 1, 7**500, 1.5, -0.0, 1e308, 5e-324, 1 + 2j, "",
          "h\u00e9\ud800", b"\x00\xff", bytearray(b"ab"), [], [1, [2, [3]]], (), (1, "a", (2.5,)), {}, {"a": 1},
          {1: "x", (1, 2): [3], None: {frozenset({1}): b""}}, {1, 2, "x"}, frozenset({(1, 2)}), set()]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:30] for v in VALUES])
def test_round_trip_keeps_type_and_value(value):
    back = decode(encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)):
        assert [type(x) for x in back] == [type(x) for x in value]


def test_special_floats():
    back = decode(encode([float("nan"), float("inf"), float("-inf"), complex(float("nan"), 1)]))
    assert math.isnan(back[0]) and back[1] == math.inf and back[2] == -math.inf
    assert math.isnan(back[3].real) and back[3].imag == 1
    assert math.copysign(1, decode(encode(-0.0))) == -1


def test_subclasses_travel_as_their_base_type():
    Point = collections.namedtuple("Point", "x y")

    class Loud(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    for value, expected in [(collections.Counter("aab"), {"a": 2, "b": 1}), (Point(1, 2), (1, 2)),
                            (collections.OrderedDict(a=1), {"a": 1}), (Loud(3), 3), (True, True)]:
        back = decode(encode(value))
        assert back == expected and type(back) is type(expected)
    assert decode(encode(Loud(3))) != 4  # the subclass's __eq__ did not come along


@pytest.mark.parametrize("value", [object(), type("Yes", (), {"__eq__": lambda s, o: True})(), print, int,
                                   iter([1]), (x for x in [1]), range(3), [1, object()], {1: object()}])
def test_behaviour_is_refused(value):
    with pytest.raises(PlainDataError, match="not plain data"):
        encode(value)


def test_limits_on_the_way_in():
    deep = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(PlainDataError, match="nested deeper"):
        encode(deep)
    loop = []
    loop.append(loop)
    with pytest.raises(PlainDataError, match="nested deeper"):
        encode(loop)
    with pytest.raises(PlainDataError, match="limit is"):
        encode("x" * (MAX_BYTES + 1))


@pytest.mark.parametrize("data", [
    b"", b"{", b"NaN", b"Infinity", b'{"a": 1}', b'{"tuple": 1}', b'{"set": [[1]]}', b'{"dict": [[[1], 2]]}',
    b'{"dict": [[1]]}', b'{"int": 5}', b'{"int": "zz"}', b'{"float": "1.5"}', b'{"bytes": "xyz"}',
    b'{"complex": [1, 2]}', b'{"tuple": [1], "set": []}', b"1" * 5000, b"[" * 100_000 + b"]" * 100_000,
    b'{"__class__": "os.system"}',
])
def test_hostile_bytes_are_refused(data):
    with pytest.raises(PlainDataError):
        decode(data)


def test_oversized_bytes_are_refused_before_parsing():
    with pytest.raises(PlainDataError, match="limit"):
        decode(b" " * (MAX_BYTES + 1))


def test_frames():
    r, w = os.pipe()
    try:
        write_frame(w, b"hello")
        write_frame(w, b"")
        assert read_frame(r) == b"hello" and read_frame(r) == b""
        os.write(w, (MAX_BYTES + 100).to_bytes(4, "big"))
        with pytest.raises(PlainDataError, match="a frame of"):
            read_frame(r)
        with pytest.raises(TimeoutError):
            read_frame(r, deadline=0)  # nothing more to read
        os.write(w, b"\x00\x00\x00\x09abc")
        os.close(w)
        w = None
        with pytest.raises(EOFError):
            read_frame(r)  # the sender went away mid-frame
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
