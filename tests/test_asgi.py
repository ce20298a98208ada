"""``send_whole``: the one way tproxy sends an answer it has whole (errors, hits, admin pages)."""

from __future__ import annotations

from tproxy.asgi import Message, send_whole


async def test_a_whole_answer_is_its_head_then_one_body_message_that_ends_it() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-length", b"2"), (b"Content-Type", b"text/plain"), (b"x-a", b"1")]
    await send_whole(send, 418, headers, b"hi")
    assert sent == [
        {"type": "http.response.start", "status": 418, "headers": headers},
        {"type": "http.response.body", "body": b"hi", "more_body": False},
    ]
