"""HTTP/1.x on the wire, as the classifier reads it (bpf/http1.h) and as the readers of
captures do: the registered request methods and the status-line test. One definition, so
that what a capture reader calls a request or a response is what the kernel did."""
from __future__ import annotations

import re

# RFC 9110 section 9 and RFC 5789 (PATCH): the methods whose request line the classifier
# recognises.
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
           b"PATCH")
STATUS_LINE_LEN = 13        # "HTTP/1.x NNN " (bpf/mirror.h)
_REQUEST_LINE = re.compile(rb"^[A-Z]+ \S+ HTTP/1\.[01]$")


def starts_request(payload: bytes) -> bool:
    """Whether a segment starts with a registered method and a space."""
    return payload.split(b" ", 1)[0] in METHODS and b" " in payload


def is_request_line(line: bytes) -> bool:
    """A whole request line: METHOD SP target SP HTTP/1.x (no CRLF)."""
    return line.split(b" ", 1)[0] in METHODS and bool(_REQUEST_LINE.match(line))


def status_line(payload: bytes) -> bool:
    """The same test the classifier applies (bpf/http1.h): "HTTP/1.x NNN" then a space or
    a CR at the start of the payload."""
    p = payload[:STATUS_LINE_LEN]
    return (len(p) == STATUS_LINE_LEN and p[:7] == b"HTTP/1." and p[7:8] in (b"0", b"1")
            and p[8:9] == b" " and p[9:12].isdigit() and p[12:13] in (b" ", b"\r"))
