"""The event-loop lag probe every actor runs (transport.loop_probe_interval_s)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from espo_async.runtime.actor import LoopLagProbe


def test_each_lag_lands_in_the_first_bucket_that_holds_it():
    counters: Counter = Counter()
    probe = LoopLagProbe(0.01, counters)
    for lag in (0.2, 1.0, 1.5, 7.0, 49.0, 80.0):
        probe.record(lag)
    assert counters["loop_lag.samples"] == 6
    assert (counters["loop_lag.le_1ms"], counters["loop_lag.le_2ms"], counters["loop_lag.le_10ms"]) == (2, 1, 1)
    assert counters["loop_lag.le_50ms"] == 1 and counters["loop_lag.gt_50ms"] == 1
    assert counters["loop_lag.max_ms"] == 80.0


async def test_a_blocked_loop_is_measured():
    counters: Counter = Counter()
    probe = LoopLagProbe(0.005, counters)
    task = asyncio.create_task(probe.run())
    try:
        async with asyncio.timeout(5):
            await probe.sampled.wait()  # the probe runs
            probe.sampled.clear()
            time.sleep(0.06)  # a callback holding the loop for 60 ms (what the probe must see)
            await probe.sampled.wait()
    finally:
        task.cancel()
    assert counters["loop_lag.gt_50ms"] == 1 and counters["loop_lag.max_ms"] >= 50
