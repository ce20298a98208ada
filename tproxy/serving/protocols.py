"""Hypercorn's HTTP/1.1 and HTTP/2 protocols, as tproxy serves them: bytes in, events and
bytes out, per HTTP version, with the repairs each needs. The connection that runs them on a
socket is :mod:`tproxy.serving.connection`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from http import HTTPStatus
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Response, Trailers
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol


class BoundedH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 connection, with its streams' writes bounded.

    - A write waits for the client's flow-control window at most ``stall_timeout``; a stream whose
      window stays shut longer is reset (``CANCEL``) and its request told the client has gone,
      as the kernel's ``TCP_USER_TIMEOUT`` does for a TCP client that stops reading (a client that
      stops sending WINDOW_UPDATE keeps reading the socket, so the kernel never notices).
    - Once the connection is closed, every stream's pending write returns at once. Hypercorn
      leaves them waiting for a window that can no longer open, and the request behind each (its
      answer in memory) waits until its own deadline.
    - DATA for a stream already answered is dropped (see :meth:`_handle_events`).
    - A request whose method or path is not ASCII has its stream reset (see
      :meth:`_create_stream`), not the whole connection failed.
    """

    def __init__(self, *arguments: Any, stall_timeout: float) -> None:
        super().__init__(*arguments)
        self._stall_timeout = stall_timeout

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, Body | Data | EndBody | EndData | Trailers):
            await super().stream_send(event)
            return
        with trio.move_on_after(self._stall_timeout) as waiting:
            await super().stream_send(event)
        if waiting.cancelled_caught:
            await self._reset_stalled(event.stream_id)

    async def handle(self, event: Event) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            for buffer in self.stream_buffers.values():
                await buffer.close()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        """Hypercorn's handling, one event at a time, less DATA for a stream already answered.

        A stream answered before its body was read (a 413 from the declared length) has left
        ``streams``; Hypercorn then failed the whole connection on the client's next DATA frame
        for it (``KeyError``). The data is acknowledged, so the connection's window stays open,
        and dropped.
        """
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                await self._flush()
            else:
                await super()._handle_events([event])

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        """Hypercorn's stream for ``request``, unless its ``:method`` or ``:path`` is not ASCII.

        HTTP/1.1 refuses such a request line at parsing (h11); h2 passes the bytes on, and
        Hypercorn's decoding of them raised out of the connection, ending every stream on it.
        Such a request is malformed (RFC 9113, 8.1.1): its stream alone is reset with
        PROTOCOL_ERROR, and the client's other streams go on.
        """
        pseudo = (b":method", b":path")
        if all(value.isascii() for name, value in request.headers if name in pseudo):
            await super()._create_stream(request)
            return
        with suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(request.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            await self._flush()

    async def _reset_stalled(self, stream_id: int) -> None:
        with suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            await self._flush()
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:  # Hypercorn's sending task drops a closed buffer of a reset stream
            await buffer.close()
            self.priority.unblock(stream_id)
            await self.has_data.set()
        await self._close_stream(stream_id)


class _ContinueWhenAsked(h11.Connection):
    """h11's connection, hiding from Hypercorn's reader a client that waits for ``100 Continue``,
    and writing the reason phrase Hypercorn leaves out.

    Hypercorn sends ``100 Continue`` as soon as the head is parsed, before the app has seen it;
    a refusal decidable from the head (413 for a declared length, 401) then came after a 100 that
    told the client to send the body. Here the 100 is sent when the app first asks for the body
    (:meth:`RepairedH11Protocol.continue_if_expected`); an answer sent first makes it unnecessary.

    Hypercorn builds every ``h11.Response`` without a reason, so the status line read
    ``HTTP/1.1 200 `` (legal, RFC 9112 §4, but curl, logs and people expect ``200 OK``).
    """

    def send(self, event: h11.Event) -> bytes | None:  # type: ignore[override]
        if isinstance(event, h11.Response | h11.InformationalResponse) and not event.reason:
            event = type(event)(
                status_code=event.status_code,
                headers=event.headers.raw_items(),
                http_version=event.http_version,
                reason=_reason_phrase(event.status_code),
            )
        return super().send(event)

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return False

    @property
    def waiting_for_100_continue(self) -> bool:
        return self.client_is_waiting_for_100_continue  # h11 serving: the other side is a client


def _has_length(response: Response) -> bool:
    return any(name.lower() == b"content-length" for name, _ in response.headers)


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""  # a status without a registered phrase keeps an empty one


class RepairedH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1, which never upgrades a connection to HTTP/2 (h2c) and sends
    ``100 Continue`` only when the app reads the body.

    An ``Upgrade: h2c`` request is answered in HTTP/1.1, as RFC 9110 §7.8 lets a server do (RFC
    9113 deprecated the upgrade). Served, it would open a channel that a front end passing the
    header through (as it does for WebSocket) no longer parses: every request after it would
    reach tproxy unseen by the front end's per-request rules ("h2c smuggling"). Prior-knowledge
    HTTP/2 (``PRI * HTTP/2.0``) is still served: a front end that speaks HTTP/1.1 never sends it.
    """

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.connection = _ContinueWhenAsked(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        self._write = self.send
        self.send = self._send_or_hold
        self._holding_head = False
        self._head = b""
        # Whether the answer being written says ``Connection: close`` (the connection's close
        # waits for such an answer to be whole).
        self.closing_answer = False

    async def stream_send(self, event: StreamEvent) -> None:
        """Hypercorn's, noting an answer whose head says ``Connection: close``; and the head of
        an answer with a Content-Length (a hit, a refusal, a JSON answer) waits for the answer's
        first bytes, so that both leave in one write."""
        if isinstance(event, Response) and event.status_code >= 200:
            self.closing_answer = (b"connection", b"close") in event.headers
            self._holding_head = _has_length(event)
        try:
            await super().stream_send(event)
        finally:
            self._holding_head = False

    async def _send_or_hold(self, event: Event) -> None:
        """The connection's ``send``: a held head goes out with the next bytes, or before
        anything else the connection is told (the answer ended, the connection closes); an empty
        write (the end of an answer framed by its Content-Length) is no write at all."""
        if isinstance(event, RawData):
            if self._holding_head:
                self._head += event.data
                return
            data, self._head = self._head + event.data, b""
            if data:
                await self._write(RawData(data))
            return
        if self._head:
            head, self._head = self._head, b""
            await self._write(RawData(head))
        await self._write(event)

    async def continue_if_expected(self) -> None:
        """Send ``100 Continue`` if the client waits for it before sending its body."""
        connection = self.connection
        if isinstance(connection, _ContinueWhenAsked) and connection.waiting_for_100_continue:
            await self._send_h11_event(
                h11.InformationalResponse(
                    status_code=100, headers=self.config.response_headers("h11")
                )
            )

    async def _check_protocol(self, event: h11.Request) -> None:
        upgrades = [value for name, value in event.headers if name == b"upgrade"]
        if not any(b"h2c" in value.lower() for value in upgrades):
            await super()._check_protocol(event)


class Protocols(ProtocolWrapper):
    """HTTP/1.1 (:class:`RepairedH11Protocol`), switching to :class:`BoundedH2Protocol` for
    prior-knowledge HTTP/2; HTTP/2 from the start when TLS's ALPN agreed on it.

    ``closed`` is called each time the protocol is told the connection has closed: by the
    reading loop at its end, and by a write that failed (Hypercorn's), which the reading loop
    may not notice by itself (see :meth:`Connection._closed
    <tproxy.serving.connection.Connection._closed>`)."""

    def __init__(
        self,
        *arguments: Any,
        alpn_protocol: str,
        stall_timeout: float,
        closed: Callable[[], None],
    ) -> None:
        super().__init__(*arguments)
        self.protocol = (
            BoundedH2Protocol(*arguments, stall_timeout=stall_timeout)
            if alpn_protocol == "h2"
            else RepairedH11Protocol(*arguments)
        )
        self._arguments = arguments
        self._stall_timeout = stall_timeout
        self._closed = closed

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as switch:
            self.protocol = h2_protocol = BoundedH2Protocol(
                *self._arguments, stall_timeout=self._stall_timeout
            )
            await h2_protocol.initiate()
            await h2_protocol.handle(RawData(data=switch.data))
        if isinstance(event, Closed):
            self._closed()
