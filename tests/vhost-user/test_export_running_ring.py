# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd's vhost-user-blk export: messages that would change a ring's state under the lane serving it.
SET_VRING_BASE on a running ring resets the device (as SET_VRING_NUM does); SET_FEATURES while requests are in
flight waits for them and changes EVENT_IDX/INDIRECT with the lanes paused, so no completion loses its interrupt."""
import os
import struct
import time

import vhu
from conftest import MiB


def still_serves(d):
    assert d.alive
    f = vhu.Frontend(d.sock)
    f.start()
    assert f.request(vhu.T_FLUSH)[0] == vhu.S_OK
    f.close()


def want_interrupt(f):
    """With EVENT_IDX: ask for an interrupt at the next completion (used_event, after the avail ring)."""
    q = f.queues[0]
    struct.pack_into("<H", f.mem, q["avail"] + 4 + 2 * q["num"], q["used_seen"])


def test_set_vring_base_on_a_running_ring(vdiskd):
    d = vdiskd(null=True)
    f = vhu.Frontend(d.sock)
    f.start()
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK
    f.send(vhu.SET_VRING_BASE, struct.pack("<II", 0, 0), flags=vhu.FLAG_VERSION | vhu.FLAG_NEED_REPLY)
    assert f.hung_up(), "SET_VRING_BASE rewound a running ring"
    f.close()
    d.wait_log("SET_VRING_BASE on a running ring")
    still_serves(d)


def test_set_features_while_requests_are_in_flight(vdiskd):
    """EVENT_IDX on, then off, each time with requests waiting in a slow node: every completion is signalled."""
    d = vdiskd(null=True, size=16 * MiB, blockdev_opts="latency-ns=200000000")
    f = vhu.Frontend(d.sock)
    f.start()
    assert f.offered & (1 << vhu.F_EVENT_IDX)
    q = f.queues[0]
    for features in (f.features | (1 << vhu.F_EVENT_IDX), f.features):
        heads = (0, 3, 6)
        want_interrupt(f)
        for h in heads:
            f.prepare(vhu.T_IN, 0, in_len=512, head=h)
            f.post(h)
        time.sleep(0.05)
        assert f.set_u64(vhu.SET_FEATURES, features) == 0  # waits for the three requests
        got = sorted(f.used(timeout=5)[0] for _ in heads)
        assert got == sorted(heads)
        try:
            os.eventfd_read(q["call"])
        except BlockingIOError:
            raise AssertionError("completions without an interrupt")
        # The ring goes on under the new features, and signals.
        want_interrupt(f)
        assert f.request(vhu.T_FLUSH, head=9)[0] == vhu.S_OK
        end = time.monotonic() + 5
        while True:
            try:
                os.eventfd_read(q["call"])
                break
            except BlockingIOError:
                assert time.monotonic() < end, "no interrupt after SET_FEATURES"
                time.sleep(0.01)
    f.close()
    still_serves(d)
