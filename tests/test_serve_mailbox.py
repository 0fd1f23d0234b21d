"""The serving app's hand-off from the engine's thread to the event loop (serve/app.py's mailbox): every event
arrives, in the order posted for each request, and a burst of events costs one wake-up of the loop, not one
each. Controls: a mailbox that wakes the loop per event, and one that delivers a burst out of order."""
import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
from alibi_export.serve import app as app_module  # noqa: E402


def _burst(box_cls, rng, rows=8, rounds=25, blocked=False):
    """``rounds`` engine iterations on a thread, each posting one event to each of ``rows`` queues (a shuffled
    row order per iteration, as rows finish and join); returns what each queue received and the wake-ups.
    ``blocked``: the loop waits for the thread to finish posting (one burst, deterministically); otherwise the
    loop runs while the thread posts (deliveries interleave with posts)."""
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = [0]
        real = loop.call_soon_threadsafe

        def counting(*a, **k):
            wakeups[0] += 1
            return real(*a, **k)

        loop.call_soon_threadsafe = counting
        box = box_cls(loop)
        queues = [asyncio.Queue() for _ in range(rows)]
        orders = [rng.permutation(rows).tolist() for _ in range(rounds)]

        def engine():
            for r, order in enumerate(orders):
                for i in order:
                    box.post(queues[i], (i, r))

        t = threading.Thread(target=engine)
        t.start()
        if blocked:
            t.join()  # blocks the loop: nothing is delivered until every event is posted
        got = [[] for _ in range(rows)]
        for _ in range(rows * rounds):
            for i, q in enumerate(queues):
                while not q.empty():
                    got[i].append(q.get_nowait())
            if sum(map(len, got)) == rows * rounds:
                break
            await asyncio.sleep(0.001)
        t.join()
        await asyncio.sleep(0.01)
        for i, q in enumerate(queues):
            while not q.empty():
                got[i].append(q.get_nowait())
        return got, wakeups[0]

    return asyncio.run(main())


class _PerEvent(app_module._Mailbox):
    """Control: the old hand-off, one wake-up per event."""

    def post(self, queue, item):
        self.loop.call_soon_threadsafe(queue.put_nowait, item)


class _Reordering(app_module._Mailbox):
    """Control: a delivery that hands a burst over last-posted first."""

    def _deliver(self):
        with self.lock:
            items, self.items, self.scheduled = self.items, type(self.items)(), False
        for queue, item in reversed(items):
            queue.put_nowait(item)


def _in_order(got, rows=8, rounds=25):
    return all([x for x in got[i]] == [(i, r) for r in range(rounds)] for i in range(rows))


def test_one_wakeup_per_burst(rng):
    got, wakeups = _burst(app_module._Mailbox, rng, blocked=True)
    assert _in_order(got) and wakeups == 1  # 200 events posted while the loop was busy: one wake-up
    got, wakeups = _burst(_PerEvent, rng, blocked=True)  # control: the measure sees a wake-up per event
    assert _in_order(got) and wakeups == 8 * 25


def test_every_event_arrives_in_order_while_the_loop_runs(rng):
    got, wakeups = _burst(app_module._Mailbox, rng)
    assert _in_order(got) and 1 <= wakeups <= 8 * 25
    got, _ = _burst(_Reordering, rng, blocked=True)  # control: a burst handed over out of order is caught
    assert not _in_order(got)
