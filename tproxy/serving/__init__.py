"""Hypercorn's HTTP/1.1 and HTTP/2 protocol code on an accept loop of ours.

``hypercorn.trio.serve`` keeps a connection's socket open after its client has closed it, for as
long as the connection's idle timer still runs (``keep_alive_timeout``, 75 s by default): the
reading side ends, but the connection's task group waits for the timer before closing. Sockets
then sit in CLOSE_WAIT at the rate clients close them. Here each connection stops its idle timer
once the client's side has ended, so the socket is closed as soon as the last answer is out.

The listening sockets are ours too, for the options set before ``bind`` and after it:

- ``TCP_USER_TIMEOUT``, inherited by every accepted connection. Hypercorn writes to a client's
  socket inside a cancel shield with no deadline, so a client that never reads would hold its
  request and the upstream call behind it for as long as it keeps the connection; the kernel
  instead drops a connection whose sent data stays unacknowledged, or whose receive window stays
  shut, for longer than ``stall_timeout``, and the shielded write then fails like any write to a
  departed client. A drain is shorter: at its deadline the sockets still open are closed
  (:class:`~tproxy.serving.connection.Connections`).
- ``SO_REUSEPORT`` when asked, so that several tproxy processes can share one address.

What ``hypercorn.trio.serve`` does and this loop leaves out, because tproxy uses none of it: ASGI
lifespan events (the server opens the app's resources), QUIC and Unix socket listeners,
restarts after ``max_requests``, statsd. TLS is Hypercorn's: the
context its configuration makes, on Trio's TLS streams; the connection does the handshake
(bounded by ``ssl_handshake_timeout``) and picks HTTP/2 or HTTP/1.1 by the protocol ALPN agreed.

It also costs less per request than Hypercorn's own loop (docs/benchmarks.md, issue 16): one idle
timer per connection, no cancel scope around every read, and an answer with a Content-Length
leaves with its head in one write.

The package splits where the work does: ``listener.py`` opens the sockets and accepts,
``connection.py`` runs one client's connection (reading, writing, idle timer, closing),
``protocols.py`` holds the HTTP/1.1 and HTTP/2 protocol code with its repairs, ``requests.py``
starts each request's app and tells it when its client leaves.
"""

from tproxy.serving.listener import SocketOptions, serve_asgi

__all__ = ["SocketOptions", "serve_asgi"]
