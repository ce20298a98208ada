"""A client that writes raw bytes: requests no well-behaved HTTP library would send.

The reply is read as far as its head and its Content-Length (every answer the proxy or Hypercorn
writes itself has one), so the helper works whether or not the server then closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

READ_LIMIT = 1 << 20


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def raw_request(url: str, data: bytes, *, within: float = 5.0) -> RawReply:
    """Send ``data`` as it is and read one reply; raises ``trio.TooSlowError`` after ``within``
    seconds."""
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream(*address(url))
        async with stream:
            await stream.send_all(data)
            return await read_reply(stream)


async def read_reply(stream: trio.SocketStream) -> RawReply:
    """One reply with a Content-Length (or none, read to the end of the connection)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some()
        if not data:
            raise ConnectionError(f"connection closed after {buffer!r}")
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", READ_LIMIT))
    while len(body) < length:
        data = await stream.receive_some()
        if not data:
            break
        body += data
    return RawReply(int(status_line.split()[1]), headers, body[:length])


def post(target: bytes, body: bytes, *, extra: bytes = b"") -> bytes:
    """A POST with a correct Content-Length; ``extra`` holds more header lines, each ending CRLF."""
    return (
        b"POST %s HTTP/1.1\r\nhost: tproxy\r\ncontent-type: application/json\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (target, extra, len(body), body)
    )
