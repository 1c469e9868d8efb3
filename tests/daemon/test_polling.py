# SPDX-License-Identifier: GPL-2.0-or-later
"""
Adaptive polling of NBD connections (the export's poll-max-us): after a
reply, the connection looks at its socket for a while before sleeping, if
the client has been answering within the maximum window; a client that
takes longer, or is idle, costs no CPU.
"""
import os
import time

import pytest

from conftest import MiB, nbd_handle
from vdtest import cpu_seconds

SIZE = 64 * MiB


def null_daemon(daemon_factory, export_opts=""):
    return daemon_factory([
        "--blockdev", f"driver=null-co,node-name=n0,size={SIZE},read-zeroes=on",
        "--export", f"type=nbd,id=e0,node-name=n0,writable=on{export_opts}",
    ])


def polled_wakeups(d):
    [e] = [e for e in d.qmp("query-stats", target="export")["exports"] if e["id"] == "e0"]
    return e["polled-wakeups"]


def ping_pong(d, n, think=0.0):
    h = nbd_handle(d.uri("n0"))
    buf = b"p" * 4096
    for i in range(n):
        h.pwrite(buf, (i % 1024) * 4096)
        if think:
            time.sleep(think)
    h.shutdown()


def test_option_and_query(daemon_factory):
    d = null_daemon(daemon_factory)
    [e] = d.qmp("query-block-exports")
    assert e["poll-max-us"] == 64
    c = d.control()
    for bad in (1000001, -1, "fast"):
        err = c.cmd_raw("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n0", "name": "x",
                                            "poll-max-us": bad})
        assert "error" in err, err
        assert "poll-max-us" in err["error"]["desc"], err
    assert c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "n0", "name": "x", "poll-max-us": 0}) == {}
    assert {e["id"]: e["poll-max-us"] for e in d.qmp("query-block-exports")} == {"e0": 64, "e1": 0}
    c.close()


def test_queue_depth_one_client_is_caught_by_polling(daemon_factory):
    d = null_daemon(daemon_factory, ",poll-max-us=1000")
    # A Python client answers a reply within a millisecond; a loaded machine may take the CPU
    # away now and then (the window then restarts), so allow a few rounds.
    for _ in range(5):
        ping_pong(d, 2000)
        if polled_wakeups(d) > 0:
            break
    assert polled_wakeups(d) > 0


def test_no_polling_when_off(daemon_factory):
    d = null_daemon(daemon_factory, ",poll-max-us=0")
    ping_pong(d, 2000)
    assert polled_wakeups(d) == 0


def test_slow_client_costs_no_polling_cpu(daemon_factory):
    """Think time (~1 ms) beyond the window (0.5 ms): the window drops and stays shut."""
    costs = {}
    for opts in (",poll-max-us=0", ",poll-max-us=500"):
        d = null_daemon(daemon_factory, opts)
        before = cpu_seconds(d.proc.pid)
        ping_pong(d, 1000, think=0.001)
        costs[opts] = cpu_seconds(d.proc.pid) - before
        d.stop()
    # Polling through every think time would cost about 1000 x 0.5 ms = 0.5 s more.
    assert costs[",poll-max-us=500"] - costs[",poll-max-us=0"] < 0.15, costs


def test_idle_connection_sleeps(daemon_factory):
    d = null_daemon(daemon_factory, ",poll-max-us=1000")
    h = nbd_handle(d.uri("n0"))
    for i in range(500):
        h.pwrite(b"i" * 4096, i * 4096)
    before = cpu_seconds(d.proc.pid)
    time.sleep(1.0)
    idle = cpu_seconds(d.proc.pid) - before
    assert len(h.pread(4096, 0)) == 4096  # still served after the idle second
    h.shutdown()
    assert idle < 0.05, idle


@pytest.mark.parametrize("opts", ["", ",poll-max-us=0"])
def test_data_intact_with_and_without_polling(daemon_factory, tmp_path, opts):
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    d = daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--export", f"type=nbd,id=e0,node-name=f0,writable=on{opts}",
    ])
    h = nbd_handle(d.uri("f0"))
    blocks = {i: os.urandom(4096) for i in range(0, 2048, 7)}
    for i, b in blocks.items():
        h.pwrite(b, i * 4096)
    for i, b in blocks.items():
        assert h.pread(4096, i * 4096) == b
    h.shutdown()


def test_shutdown_while_polling(daemon_factory):
    """SIGTERM while a connection polls its socket (a 1 s window) stops it at once, not after the grace period."""
    d = null_daemon(daemon_factory, ",poll-max-us=1000000")
    h = nbd_handle(d.uri("n0"))
    for i in range(2000):  # short answers: the window grows towards 1 s
        h.pwrite(b"s" * 4096, (i % 1024) * 4096)
    assert polled_wakeups(d) > 0
    h.pwrite(b"s" * 4096, 0)
    t0 = time.monotonic()
    d.stop()
    took = time.monotonic() - t0
    assert took < 1.5, f"stopped after {took:.2f} s (the grace period is 2 s)"
