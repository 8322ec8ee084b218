"""HTTP/1.x request heads as a capture holds them, and which request a response answered.

A request frame in a capture may be cut: the mirror's kernel side keeps only the first
--request-bytes of the frame that started a request, and the controller writes that
snapshot onto the debug interface (IP length fields rewritten to the cut, TCP sequence
number kept). So a head may lack its blank line, its last header line, or even the end of
its request line; what is read from it says how far it got.

Pairing is by TCP sequence numbers, never by capture order (the snapshot reaches the
capture after the response): a response answered the request whose bytes its
acknowledgement number covers, i.e. request.seq < response.ack <= the end of the request
message, modulo 2**32. The end is the segment's end, or, when the segment shows that the
message goes on (a head cut by the snapshot or split over segments, a body still to
come), the end its Content-Length gives, or MAX_SPAN bytes when nothing tells."""
from __future__ import annotations

from dataclasses import dataclass

from ..http1 import starts_request

SEQ_MOD = 1 << 32
# How far past a request's first byte an acknowledgement may lie when the request's length
# is unknown (a cut head, a chunked body). Under 2**31, so that "before" and "after" stay
# defined in sequence-number arithmetic; larger than any request whose head is worth
# pairing.
MAX_SPAN = 1 << 30


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str             # as far as the segment holds it
    host: str | None        # the Host header, None when absent or cut off
    complete: bool          # the head's blank line is in the segment
    length: int | None      # the whole message's length when the head tells it


def parse_request(payload: bytes) -> RequestHead | None:
    """The head of a segment that starts a request (registered method and a space), or
    None for any other segment. Only whole header lines are read: a Host line cut by the
    snapshot counts as absent."""
    if not starts_request(payload):
        return None
    head, blank, _ = payload.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    headers = lines[1:] if blank else lines[1:-1]
    fields = _fields(headers)
    return RequestHead(method=parts[0].decode("ascii"),
                       target=parts[1].decode("latin-1"),
                       host=fields.get("host"),
                       complete=bool(blank),
                       length=_length(len(head) + 4, fields) if blank else None)


def _fields(lines: list[bytes]) -> dict[str, str]:
    """Header fields by lower-cased name; the first of repeated names wins."""
    out: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon and name and name == name.strip():
            out.setdefault(name.decode("latin-1").lower(), value.strip().decode("latin-1"))
    return out


def _length(head_len: int, fields: dict[str, str]) -> int | None:
    """The message length a complete head gives (RFC 9112 section 6.3 for requests): no
    body without Content-Length or Transfer-Encoding; unknown with Transfer-Encoding."""
    if "transfer-encoding" in fields:
        return None
    value = fields.get("content-length")
    if value is None:
        return head_len
    return head_len + int(value) if value.isdigit() else None


def ack_distance(seq: int, ack: int) -> int:
    """How many bytes past `seq` the acknowledgement `ack` lies, modulo 2**32."""
    return (ack - seq) % SEQ_MOD


def covers(seq: int, payload: bytes, ack: int, head: RequestHead | None = None) -> bool:
    """Whether an acknowledgement number `ack` covers the request that starts at `seq`
    with this segment payload (the pairing rule of the module docstring)."""
    d = ack_distance(seq, ack)
    if d == 0 or d >= SEQ_MOD // 2:
        return False                # the response was sent before this request arrived
    if d <= len(payload):
        return True
    head = head or parse_request(payload)
    if head is None:
        return False
    if head.length is not None:
        return d <= head.length
    return d <= MAX_SPAN


def answered(requests: list[tuple[int, bytes]], ack: int) -> tuple[int, bytes] | None:
    """Of (seq, payload) request segments, the one a response acknowledging `ack`
    answered: the last request start before the acknowledgement, as the kernel keeps the
    last request start it saw."""
    best = None
    for seq, payload in requests:
        if covers(seq, payload, ack):
            if best is None or ack_distance(seq, ack) < ack_distance(best[0], ack):
                best = (seq, payload)
    return best
