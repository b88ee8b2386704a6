"""Plain data to bytes and back, for values that cross the sandbox boundary: None, bool, int, float,
complex, str, bytes, bytearray, list, tuple, dict, set and frozenset, nested, and nothing else, so a
decoded value carries no behaviour of its sender's (no classes, no pickle); size and nesting are capped
both ways. Also the length-prefixed frames both sides send these in.

The format is JSON with one rule: a list is an array, and every other container or special value is an
object with one key naming its type:
    {"tuple": [...]}  {"set": [...]}  {"frozenset": [...]}  {"dict": [[key, value], ...]}
    {"bytes": "hex"}  {"bytearray": "hex"}  {"complex": [re, im]}  {"float": "nan" | "inf" | "-inf"}
    {"int": "hex"} (beyond 64 bits: decimal text of huge ints is slow and capped by Python)
Subclasses of these types (a Counter, a namedtuple, an IntEnum) are sent as their base type, the way
they compare. Runs inside the sandbox too (bound next to the runner), so it imports the stdlib only.
"""

import json
import math
import os
import select
import struct
import time

MAX_BYTES = 4 * 2**20   # one encoded value
MAX_DEPTH = 64          # nesting of containers
_HEADER = struct.Struct(">I")


class PlainDataError(ValueError):
    """The value is not plain data, or the bytes are not a plain value in this format."""


# -----------------------------------------------------------------------------
# values

def _to_json(v, depth):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if v is None or v is True or v is False:
        return v
    if isinstance(v, int):
        v = int.__int__(v)  # the number itself, not a subclass's idea of it
        return v if -2**63 <= v < 2**63 else {"int": hex(v)}
    if isinstance(v, float):
        v = float.__float__(v)
        return v if math.isfinite(v) else {"float": "nan" if v != v else ("inf" if v > 0 else "-inf")}
    if isinstance(v, complex):
        return {"complex": [_to_json(v.real, depth + 1), _to_json(v.imag, depth + 1)]}
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return {"bytearray" if isinstance(v, bytearray) else "bytes": bytes(v).hex()}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_to_json(x, depth + 1) for x in v]
        if isinstance(v, list):
            return items
        return {"tuple" if isinstance(v, tuple) else "frozenset" if isinstance(v, frozenset) else "set": items}
    if isinstance(v, dict):
        return {"dict": [[_to_json(k, depth + 1), _to_json(x, depth + 1)] for k, x in dict.items(v)]}
    raise PlainDataError(f"a {type(v).__name__} is not plain data (only None, bool, int, float, complex, str, "
                         "bytes, list, tuple, dict, set and frozenset cross the sandbox boundary)")


def encode(value):
    """value -> bytes (at most MAX_BYTES). Raises PlainDataError for anything else."""
    try:
        data = json.dumps(_to_json(value, 0), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
    except RecursionError:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels") from None
    if len(data) > MAX_BYTES:
        raise PlainDataError(f"the value is {len(data):,} bytes encoded; the limit is {MAX_BYTES:,}")
    return data


def _items(payload, depth):
    if type(payload) is not list:
        raise PlainDataError("a container's items must be a list")
    return [_from_json(x, depth + 1) for x in payload]


def _hex(payload):
    if type(payload) is not str:
        raise PlainDataError("bytes must be hex text")
    return bytes.fromhex(payload)


def _from_json(x, depth):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return _items(x, depth)
    if type(x) is dict and len(x) == 1:
        (tag, payload), = x.items()
        if tag == "tuple":
            return tuple(_items(payload, depth))
        if tag in ("set", "frozenset"):
            return (set if tag == "set" else frozenset)(_items(payload, depth))
        if tag == "dict":
            pairs = _items(payload, depth)
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise PlainDataError("a dict must be a list of [key, value] pairs")
            return {k: v for k, v in pairs}
        if tag in ("bytes", "bytearray"):
            return (bytes if tag == "bytes" else bytearray)(_hex(payload))
        if tag == "int" and type(payload) is str:
            return int(payload, 16)
        if tag == "float" and payload in ("nan", "inf", "-inf"):
            return float(payload)
        if tag == "complex" and type(payload) is list and len(payload) == 2:
            real, imag = (_from_json(p, depth + 1) for p in payload)
            if type(real) is float and type(imag) is float:
                return complex(real, imag)
    raise PlainDataError(f"not a plain value: {json.dumps(x)[:80]}")


def _no_constant(name):
    raise PlainDataError(f"{name} is not in this format")


def decode(data):
    """bytes from encode() -> the value, made of builtin types only. Raises PlainDataError for anything else."""
    if len(data) > MAX_BYTES:
        raise PlainDataError(f"{len(data):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        return _from_json(json.loads(data, parse_constant=_no_constant), 0)
    except PlainDataError:
        raise
    except (ValueError, TypeError, RecursionError) as e:  # bad JSON, unhashable set items or dict keys, ...
        raise PlainDataError(f"not a plain value: {type(e).__name__}: {e}") from None


# -----------------------------------------------------------------------------
# frames: 4-byte big-endian length, then that many bytes

def _read_exactly(fd, n, deadline):
    data = b""
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no answer in time")
        chunk = os.read(fd, min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        data += chunk
    return data


def read_frame(fd, deadline=None):
    """One frame's payload from fd, by time.monotonic() `deadline` (None: wait as long as it takes)."""
    n, = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    if n > MAX_BYTES + 64:
        raise PlainDataError(f"a frame of {n:,} bytes; the limit is {MAX_BYTES:,}")
    return _read_exactly(fd, n, deadline)


def write_frame(fd, payload, deadline=None):
    """Write one frame to fd (a non-blocking fd when there is a deadline) by `deadline`."""
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError("the other side does not read")
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            continue
