"""The protobuf wire format, as much of it as the containerd client needs: a few request
messages written, and replies read field by field.

containerd publishes its API as .proto files only; generating Python classes from them
would bring protoc, the protobuf runtime and a dozen files for the six fields read here
(mirror.workload.containerd names them with their numbers)."""
from __future__ import annotations

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a protobuf message."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def bytes_field(number: int, data: bytes) -> bytes:
    """A length-delimited field: bytes, or a message already written."""
    return _varint(number << 3 | LENGTH) + _varint(len(data)) + data


def string_field(number: int, text: str) -> bytes:
    return bytes_field(number, text.encode())


def _read_varint(data: bytes, off: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if off >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[off]
        off += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, off
        shift += 7


def fields(data: bytes) -> dict[int, list]:
    """field number -> its values in order: ints for varints, bytes for length-delimited
    fields (strings, messages, maps' entries); fixed-size fields are skipped."""
    out: dict[int, list] = {}
    off = 0
    while off < len(data):
        key, off = _read_varint(data, off)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, off = _read_varint(data, off)
        elif wire == LENGTH:
            size, off = _read_varint(data, off)
            if off + size > len(data):
                raise WireError("field runs past the message")
            value, off = data[off:off + size], off + size
        elif wire in (FIXED64, FIXED32):
            off += 8 if wire == FIXED64 else 4
            if off > len(data):
                raise WireError("truncated fixed-size field")
            continue
        else:
            raise WireError(f"wire type {wire} is not one proto3 uses")
        out.setdefault(number, []).append(value)
    return out


def text(values: dict[int, list], number: int) -> str:
    """The last value of a string field ('' when absent, as proto3 reads it)."""
    found = values.get(number)
    if not found:
        return ""
    try:
        return found[-1].decode()
    except (AttributeError, UnicodeDecodeError):
        raise WireError(f"field {number} is not a string") from None


def number(values: dict[int, list], num: int) -> int:
    found = values.get(num)
    if not found:
        return 0
    if not isinstance(found[-1], int):
        raise WireError(f"field {num} is not a varint")
    return found[-1]


def string_map(values: dict[int, list], num: int) -> dict[str, str]:
    """A map<string, string> field: its entries are messages with key 1 and value 2."""
    out = {}
    for entry in values.get(num, []):
        if not isinstance(entry, bytes):
            raise WireError(f"field {num} is not a map")
        kv = fields(entry)
        out[text(kv, 1)] = text(kv, 2)
    return out


def messages(values: dict[int, list], num: int) -> list[dict[int, list]]:
    """A repeated (or single) message field, each entry read into fields()."""
    out = []
    for entry in values.get(num, []):
        if not isinstance(entry, bytes):
            raise WireError(f"field {num} is not a message")
        out.append(fields(entry))
    return out
