"""BatchQueue: offers never wait, a full queue drops and counts, batches, flush and close.

The store writer and the telemetry sinks are built on it; their own tests cover what they do with
a batch. Time is Trio's autojump clock: a linger passes without anyone sleeping.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tproxy.batchqueue import BatchQueue, send_or_refuse


class Recorder:
    """A ``deliver`` that keeps each batch and, while ``gate`` is unset, waits on it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = trio.Event()
        self.gate.set()

    async def __call__(self, batch: list[int]) -> None:
        await self.gate.wait()
        self.batches.append(list(batch))


def test_send_or_refuse_says_whether_the_item_went() -> None:
    send, receive = trio.open_memory_channel[int](1)
    assert send_or_refuse(send, 1)
    assert not send_or_refuse(send, 2)  # full
    assert receive.receive_nowait() == 1
    receive.close()
    assert not send_or_refuse(send, 3)  # nobody receives any more
    send.close()
    assert not send_or_refuse(send, 4)  # closed


def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    queue = BatchQueue[int](capacity=2, max_batch=10)
    assert [queue.offer(number) for number in range(5)] == [True, True, False, False, False]
    stats = queue.statistics()
    assert (stats.accepted, stats.refused_full, stats.refused_closed, stats.queued) == (2, 3, 0, 2)


async def test_batches_take_what_is_queued_up_to_max_batch() -> None:
    queue = BatchQueue[int](capacity=10, max_batch=3)
    recorder = Recorder()
    for number in range(7):
        queue.offer(number)
    queue.close()
    await queue.serve(recorder)
    assert recorder.batches == [[0, 1, 2], [3, 4, 5], [6]]
    stats = queue.statistics()
    assert (stats.delivered, stats.batches, stats.abandoned, stats.queued) == (7, 3, 0, 0)


async def test_a_linger_gathers_items_that_arrive_soon_after_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = BatchQueue[int](capacity=10, max_batch=10, linger=0.02)
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.serve, recorder)
        queue.offer(1)
        await trio.sleep(0.01)  # the mock clock: within the linger
        queue.offer(2)
        await trio.sleep(0.05)  # past it: a batch of its own
        queue.offer(3)
        queue.close()
    assert recorder.batches == [[1, 2], [3]]


async def test_flush_waits_for_what_was_offered_and_close_ends_serve() -> None:
    queue = BatchQueue[int](capacity=10, max_batch=10)
    recorder = Recorder()
    recorder.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.serve, recorder)
        queue.offer(1)
        queue.offer(2)
        flushed = False

        async def flush() -> None:
            nonlocal flushed
            await queue.flush()
            flushed = True

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed  # the batch is still being delivered
        recorder.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert flushed
        queue.close()
    assert recorder.batches == [[1, 2]]
    assert not queue.offer(3)
    assert queue.statistics().refused_closed == 1


async def test_an_offer_after_serve_ended_is_refused_as_closed() -> None:
    queue = BatchQueue[int](capacity=10, max_batch=10)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.serve(Recorder())
    assert not queue.offer(1)
    stats = queue.statistics()
    assert (stats.refused_closed, stats.refused_full) == (1, 0)


async def test_cancelling_serve_counts_the_batch_and_the_queue_as_abandoned() -> None:
    queue = BatchQueue[int](capacity=10, max_batch=2)
    recorder = Recorder()
    recorder.gate = trio.Event()  # the endpoint never answers
    for number in range(5):
        queue.offer(number)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.serve, recorder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    stats = queue.statistics()
    assert (stats.delivered, stats.abandoned, stats.queued) == (0, 5, 0)
    with trio.fail_after(1):
        await queue.flush()  # abandoned items count as handled: nobody waits for them forever


@pytest.mark.parametrize("capacity", [1, 3])
async def test_every_offer_is_counted_once(capacity: int) -> None:
    queue = BatchQueue[int](capacity=capacity, max_batch=2)
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.serve, recorder)
        for number in range(20):
            queue.offer(number)
            if number % 4 == 0:
                await trio.testing.wait_all_tasks_blocked()
        queue.close()
    stats = queue.statistics()
    assert stats.accepted + stats.refused_full + stats.refused_closed == 20
    assert stats.delivered == stats.accepted == sum(map(len, recorder.batches))


async def test_close_during_a_linger_delivers_the_batch_without_waiting_it_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = BatchQueue[int](capacity=10, max_batch=10, linger=60.0)
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.serve, recorder)
        queue.offer(1)
        await trio.testing.wait_all_tasks_blocked()  # the batch is lingering for more
        queue.close()
    assert recorder.batches == [[1]]
    assert trio.current_time() < 60.0  # the mock clock: the linger was cut short, not waited out
