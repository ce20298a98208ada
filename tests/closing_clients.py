"""Clients that close the moment they have the last byte, as curl does, run in a process of their
own beside the proxy (not in its event loop, not under its GIL), one thread per client.

``python closing_clients.py HOST PORT ROUNDS CLIENTS EXTRA``: ROUNDS times, CLIENTS identical JSON
chat requests at once (EXTRA is more header lines, each ending CRLF); each client reads the head
and the Content-Length bytes of the body, then closes. Prints the bodies as a JSON list.
"""

from __future__ import annotations

import json
import socket
import sys
import threading


def ask(address: tuple[str, int], request: bytes, bodies: list[str]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += sock.recv(65536)
    bodies.append(body.decode())


def main(host: str, port: str, rounds: str, clients: str, extra: str) -> None:
    bodies: list[str] = []
    for round_ in range(int(rounds)):
        question = {"role": "user", "content": f"question {round_}"}
        payload = json.dumps({"model": "fake", "stream": False, "messages": [question]}).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: tproxy\r\nx-fault: 1\r\n%s"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (extra.encode(), len(payload), payload)
        )
        threads = [
            threading.Thread(target=ask, args=((host, int(port)), request, bodies))
            for _ in range(int(clients))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(json.dumps(bodies))


if __name__ == "__main__":
    main(*sys.argv[1:])
