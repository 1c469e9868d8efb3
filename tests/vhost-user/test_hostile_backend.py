# SPDX-License-Identifier: LGPL-2.1-or-later
"""
The virtio-blk-vhost-user driver against a hostile or broken vhost-user-blk
back end (hostile_vhu.py): each scenario breaks the protocol at one point --
a control reply of the wrong size, flags or request code, fds where none
belong, a reply that never comes, an absurd config space, a used ring with
impossible entries, status bytes and lengths that do not add up, hang-ups
with requests in flight -- and the client must fail that step (or the
device) with a clear errno and message, or cope where the spec lets it,
never crash, hang, trip a sanitizer, or pass a buffer the back end did not
fill off as a successful read.

The driver never negotiates INFLIGHT_SHMFD, so it never sends
GET_INFLIGHT_FD and never expects an fd: a GET_INFLIGHT_FD reply (with or
without its fd) is an answer to the wrong request, and fds attached to any
reply are closed.  Stall scenarios set reply-timeout=1 so each costs ~1 s.
"""
import os
import re
import select
import struct
import time
from pathlib import Path

import pytest

from conftest import DRIVER, compile_client, info, run
from vdtest import hostile_peers
from hostile_vhu import (ADD_MEM_REG, DEFAULT_FEATURES, DEFAULT_PROTOCOL, F_BLK_SIZE, F_EVENT_IDX, F_SIZE_MAX,
                         F_TOPOLOGY, FILL, FLAG_VERSION, GET_CONFIG, GET_FEATURES, GET_INFLIGHT_FD,
                         GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE, PF_MEM_SLOTS, REM_MEM_REG, REPLY_FLAGS,
                         S_IOERR, S_UNSUPP, SET_FEATURES, SET_MEM_TABLE, SET_PROTOCOL_FEATURES, SET_VRING_ADDR,
                         SET_VRING_ENABLE, SIZE, HostileBackend, Scenario, u64)

TIMEOUT = 20      # per client run: a hang fails the test long before anything else notices
READ = f"read -P {FILL:#x} 0 4k"
READ2 = f"read -P {FILL:#x} 4k 4k"
DEAD = "back-end disconnected (protocol error: bad used ring entry on queue 0)"
DEAD_RING = "protocol error: bad used ring entry on queue 0"
EIO = os.strerror(5)


@pytest.fixture
def hostile(tmp_path):
    """hostile(scenario) -> HostileBackend on a Unix socket in tmp_path."""
    yield from hostile_peers(tmp_path, HostileBackend)


def io_run(vdisk_io, b, *cmds, extra=(), timeout=TIMEOUT):
    args = [vdisk_io, f"--driver={DRIVER}", f"--path={b.path}", "--map", *extra]
    for c in cmds:
        args += ["-c", c]
    return run(args, timeout=timeout)


# ---- control-plane hooks ----------------------------------------------------------------------------------------

def send(payload=None, req=None, flags=REPLY_FLAGS, size=None, fds=None, then=None):
    """A reply hook: the normal reply with some fields replaced; then: 'close' or 'stall' afterwards."""
    def hook(c, in_flags, in_payload, normal):
        code = hook.req
        p = normal if payload is None else payload
        own = fds() if fds else []
        c.send_msg(code if req is None else req, p if p is not None else u64(0), flags=flags, size=size,
                   fds=own)
        for fd in own:
            os.close(fd)
        if then == "close":
            c.hang_up()
        if then == "stall":
            c.stall()
    return hook


def stall(c, flags, payload, normal):
    c.stall()


def hang_up(c, flags, payload, normal):
    c.hang_up()


def memfd():
    fd = os.memfd_create("hostile")
    os.ftruncate(fd, 4096)
    return [fd]


def answer_twice(c, flags, payload, normal):
    c.send_msg(GET_FEATURES, normal)
    c.send_msg(GET_FEATURES, normal)


def R(code, hook):
    """reply={code: hook}; a send() hook learns which code it answers."""
    if getattr(hook, "__name__", "") == "hook":
        hook.req = code
    return {code: hook}


CONNECT_FAILS = [
    # id, reply hooks, expected text (all of it in stderr)
    ("features-short", R(GET_FEATURES, send(payload=b"\0" * 4)), ["GET_FEATURES: expected a 8-byte reply, got 4"]),
    ("features-long", R(GET_FEATURES, send(payload=b"\0" * 16)), ["GET_FEATURES: expected a 8-byte reply, got 16"]),
    ("features-empty", R(GET_FEATURES, send(payload=b"")), ["GET_FEATURES: expected a 8-byte reply, got 0"]),
    ("features-no-reply-flag", R(GET_FEATURES, send(flags=FLAG_VERSION)), ["reply for request 1 (flags 0x1)"]),
    ("features-version-2", R(GET_FEATURES, send(flags=2 | 4)), ["reply for request 1 (flags 0x6)"]),
    ("features-version-0", R(GET_FEATURES, send(flags=4)), ["reply for request 1 (flags 0x4)"]),
    ("features-wrong-code", R(GET_FEATURES, send(req=GET_QUEUE_NUM)), ["GET_FEATURES", "reply for request 17"]),
    ("features-garbage-code", R(GET_FEATURES, send(req=0xdeadbeef)), ["reply for request 3735928559"]),
    ("features-huge-size", R(GET_FEATURES, send(payload=b"", size=1 << 30, then="close")),
     ["GET_FEATURES: reply too large"]),
    ("features-truncated", R(GET_FEATURES, send(payload=b"\0" * 3, size=8, then="close")),
     ["GET_FEATURES: the back-end closed the connection"]),
    ("features-answered-twice", R(GET_FEATURES, answer_twice),
     ["GET_PROTOCOL_FEATURES", "reply for request 1 "]),
    ("protocol-short", R(GET_PROTOCOL_FEATURES, send(payload=b"\0" * 7)),
     ["GET_PROTOCOL_FEATURES: expected a 8-byte reply, got 7"]),
    ("protocol-wrong-code", R(GET_PROTOCOL_FEATURES, send(req=SET_PROTOCOL_FEATURES)),
     ["GET_PROTOCOL_FEATURES", "reply for request 16"]),
    ("queue-num-empty", R(GET_QUEUE_NUM, send(payload=b"")), ["GET_QUEUE_NUM: expected a 8-byte reply, got 0"]),
    ("queue-num-no-reply-flag", R(GET_QUEUE_NUM, send(flags=FLAG_VERSION | 8)), ["reply for request 17 (flags 0x9)"]),
    ("config-short", R(GET_CONFIG, send(payload=bytes(12 + 40))), ["GET_CONFIG: expected a 72-byte reply, got 52"]),
    ("config-long", R(GET_CONFIG, send(payload=bytes(12 + 61))), ["GET_CONFIG: expected a 72-byte reply, got 73"]),
    ("config-refused", R(GET_CONFIG, send(payload=bytes(12))), ["refused GET_CONFIG"]),
    ("config-huge-size", R(GET_CONFIG, send(payload=b"", size=0xffffffff, then="close")),
     ["GET_CONFIG: reply too large"]),
    ("config-max-payload-plus-one", R(GET_CONFIG, send(payload=bytes(4097))), ["GET_CONFIG: reply too large"]),
    ("config-hang-up", R(GET_CONFIG, hang_up), ["GET_CONFIG: the back-end closed the connection"]),
    ("config-as-inflight-reply", R(GET_CONFIG, send(req=GET_INFLIGHT_FD, payload=struct.pack("<QQHHI", 4096, 0, 1,
                                                                                              128, 0), fds=memfd)),
     ["GET_CONFIG", "reply for request 31"]),
    ("config-as-inflight-reply-no-fd", R(GET_CONFIG, send(req=GET_INFLIGHT_FD,
                                                          payload=struct.pack("<QQHHI", 4096, 0, 1, 128, 0))),
     ["GET_CONFIG", "reply for request 31"]),
    ("ack-nonzero", R(SET_FEATURES, send(payload=u64(1))), ["rejected SET_FEATURES (status 1)"]),
    ("ack-short", R(SET_FEATURES, send(payload=b"\0" * 4)), ["SET_FEATURES: ack of 4 bytes"]),
    ("ack-wrong-code", R(SET_FEATURES, send(req=GET_FEATURES)), ["SET_FEATURES", "reply for request 1 "]),
    ("ack-hang-up", R(SET_FEATURES, hang_up), ["SET_FEATURES: the back-end closed the connection"]),
    ("mem-table-ack-nonzero", R(SET_MEM_TABLE, send(payload=u64(22))), ["rejected SET_MEM_TABLE (status 22)"]),
    ("vring-addr-ack-wrong-code", R(SET_VRING_ADDR, send(req=GET_VRING_BASE)),
     ["SET_VRING_ADDR", "reply for request 11"]),
    ("capacity-2^63-bytes", dict(config=dict(capacity=1 << 54)), ["impossible capacity of 18014398509481984"]),
    ("capacity-max", dict(config=dict(capacity=(1 << 64) - 1)), ["impossible capacity"]),
]


@pytest.mark.parametrize("knobs,texts", [pytest.param(k, t, id=i) for i, k, t in CONNECT_FAILS])
def test_broken_handshake_fails_cleanly(hostile, vdisk_io, knobs, texts):
    sc = Scenario(**knobs) if "config" in knobs else Scenario(reply=knobs)
    b = hostile(sc)
    t0 = time.monotonic()
    p = io_run(vdisk_io, b, "info", READ)
    assert p.returncode == 1, p.stdout + p.stderr
    for t in texts:
        assert t in p.stderr, p.stderr
    assert time.monotonic() - t0 < 10


STALLS = [
    # id, the request whose reply never comes, the step that reports it
    ("GET_FEATURES", GET_FEATURES, "vdisk_connect"),
    ("GET_QUEUE_NUM", GET_QUEUE_NUM, "vdisk_connect"),
    ("SET_FEATURES-ack", SET_FEATURES, "vdisk_connect"),
    ("GET_CONFIG", GET_CONFIG, "vdisk_connect"),
    ("SET_MEM_TABLE-ack", SET_MEM_TABLE, "vdisk_start"),
    ("SET_VRING_ADDR-ack", SET_VRING_ADDR, "vdisk_start"),
]


@pytest.mark.parametrize("code,step", [pytest.param(c, s, id=i) for i, c, s in STALLS])
def test_stalled_reply_times_out(hostile, vdisk_io, code, step):
    b = hostile(Scenario(reply={code: stall}))
    t0 = time.monotonic()
    p = io_run(vdisk_io, b, "info", READ, extra=["--set", "reply-timeout=1"])
    took = time.monotonic() - t0
    assert p.returncode == 1
    assert step in p.stderr and "no reply in time" in p.stderr, p.stderr
    assert 0.9 < took < 8, took
    assert "stall" in b.log


def test_stalled_get_vring_base_bounds_destroy(hostile, vdisk_io):
    """destroy stops the ring with GET_VRING_BASE: a back-end that never answers costs one reply-timeout."""
    b = hostile(Scenario(reply={GET_VRING_BASE: stall}))
    t0 = time.monotonic()
    p = io_run(vdisk_io, b, READ, extra=["--set", "reply-timeout=1"])
    assert p.returncode == 0, p.stderr
    assert 0.9 < time.monotonic() - t0 < 8


def test_reply_timeout_property(hostile, vdisk_io):
    b = hostile(Scenario())
    p = io_run(vdisk_io, b, "info", extra=["--set", "reply-timeout=7"])
    assert info(p)["reply-timeout"] == "7"
    b2 = hostile(Scenario())
    p = io_run(vdisk_io, b2, "info", extra=["--set", "reply-timeout=0"])
    assert p.returncode == 1 and "reply-timeout" in p.stderr


@pytest.mark.parametrize("slots,regions", [(0, 7), (1, 7), (2, 1), ((1 << 64) - 1, 512)],
                         ids=["0", "1", "2", "huge"])
def test_max_mem_slots_is_sanitized(hostile, vdisk_io, slots, regions):
    """GET_MAX_MEM_SLOTS: fewer than 2 (rings + one buffer) falls back to SET_MEM_TABLE; huge is capped."""
    b = hostile(Scenario(protocol=DEFAULT_PROTOCOL | 1 << PF_MEM_SLOTS, mem_slots=slots))
    p = io_run(vdisk_io, b, "info", READ, "write -P 4 0 4k", "read -P 4 0 4k")
    assert p.returncode == 0, p.stderr
    assert info(p)["max-mem-regions"] == str(regions)
    assert (ADD_MEM_REG in b.requests) == (slots >= 2)


def reject_nth(code, n):
    """Reject (ack 1, state unchanged) the n-th message `code`; answer the others normally."""
    def hook(c, flags, payload, normal):
        if c.server.requests.count(code) != n:
            return False
        c.send_msg(code, u64(1))
    return hook


UNMAP_REJECTED = [
    # id, protocol features, the rejected message (n-th of its kind: start, map, *unmap*)
    ("REM_MEM_REG", DEFAULT_PROTOCOL | 1 << PF_MEM_SLOTS, REM_MEM_REG, 1),
    ("SET_MEM_TABLE", DEFAULT_PROTOCOL, SET_MEM_TABLE, 3),
]


@pytest.mark.parametrize("proto,code,n", [pytest.param(*x[1:], id=x[0]) for x in UNMAP_REJECTED])
def test_rejected_unmap_kills_the_device(hostile, vdisk_io, proto, code, n):
    """A back-end that keeps an unmapped region would serve later buffers at the same address from the stale
    pages: reads "succeeded" with data that never reached the caller's buffer.  Now the device dies instead."""
    b = hostile(Scenario(protocol=proto, reply={code: reject_nth(code, n)}))
    p = io_run(vdisk_io, b, READ, READ2, f"read -P {FILL:#x} 8k 4k")
    assert p.returncode == 1
    assert "the back-end did not drop an unmapped memory region" in p.stderr, p.stderr
    assert "Pattern verification failed" not in p.stderr


def test_rejected_map_fails_the_map(hostile, vdisk_io):
    b = hostile(Scenario(protocol=DEFAULT_PROTOCOL | 1 << PF_MEM_SLOTS,
                         reply={ADD_MEM_REG: reject_nth(ADD_MEM_REG, 2)}))
    p = io_run(vdisk_io, b, READ)
    assert p.returncode == 1 and "rejected ADD_MEM_REG (status 1)" in p.stderr, p.stderr


@pytest.mark.parametrize("hook", [send(payload=b"\0" * 4), send(req=GET_FEATURES), hang_up, stall],
                         ids=["short", "wrong-code", "hang-up", "stall"])
def test_broken_get_vring_base_at_destroy(hostile, vdisk_io, hook):
    """destroy's GET_VRING_BASE answered badly: destroy still returns, quickly, with nothing leaked."""
    b = hostile(Scenario(reply=R(GET_VRING_BASE, hook)))
    t0 = time.monotonic()
    p = io_run(vdisk_io, b, READ, extra=["--set", "reply-timeout=1", "--set", "num-queues=2"])
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 8
    # One queue's failure is enough: the second queue does not ask (and wait) again.
    assert b.requests.count(GET_VRING_BASE) == 1


def test_unexpected_fds_are_closed(hostile, vdisk_io):
    """fds on replies that carry none are closed at once (a pipe's read end sees EOF while we still talk)."""
    ends = {}

    def with_pipe(c, flags, payload, normal):
        r, w = os.pipe()
        ends.setdefault("r", []).append(r)
        c.send_msg(hook_code(c), normal, fds=[w, w, w])
        os.close(w)

    def hook_code(c):
        return c.server.requests[-1]

    def check(c, flags, payload, normal):
        # Still connected: every copy of the write ends must be gone already.
        ends["eof"] = all(select.select([r], [], [], 2)[0] and os.read(r, 1) == b"" for r in ends["r"])
        return False

    b = hostile(Scenario(reply={GET_FEATURES: with_pipe, GET_CONFIG: with_pipe, SET_VRING_ENABLE: check}))
    p = io_run(vdisk_io, b, READ)
    assert p.returncode == 0, p.stderr
    assert ends.get("eof") is True
    for r in ends["r"]:
        os.close(r)


# ---- config space -------------------------------------------------------------------------------------------------

CONFIG_OK = [
    # id, config fields (and features), expected info values, commands that must succeed
    ("capacity-0", dict(capacity=0), {"capacity": "0"}, []),
    ("blk-size-0", dict(blk_size=0), {"request-alignment": "512"}, [READ]),
    ("blk-size-not-pow2", dict(blk_size=3000), {"request-alignment": "512"}, [READ]),
    ("blk-size-huge", dict(blk_size=1 << 31), {"request-alignment": "512"}, [READ]),
    ("blk-size-4k", dict(blk_size=4096), {"request-alignment": "4096"}, [READ]),
    ("num-queues-0", dict(num_queues=0), {"max-queues": "1"}, [READ]),
    ("num-queues-huge", dict(num_queues=0xffff, queue_num=(1 << 64) - 1), {"max-queues": "256"}, [READ]),
    ("seg-max-0", dict(seg_max=0), {"max-segments": "1"}, [READ]),
    ("seg-max-huge", dict(seg_max=0xffffffff), {"max-segments": "1022"}, [READ, f"read -v -P {FILL:#x} 0 12k"]),
    ("size-max-1", dict(size_max=1, features=DEFAULT_FEATURES | 1 << F_SIZE_MAX), {"max-transfer": "512"},
     [f"read -P {FILL:#x} 0 512"]),
    ("topology-absurd", dict(physical_block_exp=255, opt_io_size=0xffffffff,
                             features=DEFAULT_FEATURES | 1 << F_TOPOLOGY),
     {"optimal-io-alignment": "512", "optimal-io-size": "512"}, [READ]),
    ("discard-limits-huge", dict(max_discard_sectors=0xffffffff, discard_sector_alignment=0xffffffff,
                                 max_write_zeroes_sectors=0xffffffff),
     {"can-discard": "true"}, ["discard 0 4m", "zero 0 4m", "read -P 0 0 64k"]),
    ("blk-size-no-feature", dict(blk_size=4096, features=DEFAULT_FEATURES & ~(1 << F_BLK_SIZE)),
     {"request-alignment": "512"}, [READ]),
]


@pytest.mark.parametrize("cfg,want,cmds", [pytest.param(*x[1:], id=x[0]) for x in CONFIG_OK])
def test_odd_config_space_is_sanitized(hostile, vdisk_io, cfg, want, cmds):
    cfg = dict(cfg)
    knobs = {k: cfg.pop(k) for k in ("features", "queue_num") if k in cfg}
    b = hostile(Scenario(config=cfg, **knobs))
    p = io_run(vdisk_io, b, "info", *cmds)
    assert p.returncode == 0, p.stderr
    i = info(p)
    for k, v in want.items():
        assert i[k] == v, (k, i[k])
    for typ, sector, num in b.ranges:
        assert sector * 512 + num * 512 <= SIZE and num > 0


def test_capacity_0_rejects_io(hostile, vdisk_io):
    b = hostile(Scenario(config=dict(capacity=0)))
    p = io_run(vdisk_io, b, READ)
    assert p.returncode == 1 and "past capacity 0" in p.stderr


def test_max_write_zeroes_1_sector_splits(hostile, vdisk_io):
    b = hostile(Scenario(config=dict(max_write_zeroes_sectors=1)))
    p = io_run(vdisk_io, b, "zero 0 16k", "read -P 0 0 16k", READ2.replace("4k 4k", "16k 4k"))
    assert p.returncode == 0, p.stderr
    assert [(s, n) for t, s, n in b.ranges] == [(s, 1) for s in range(32)]


# ---- data plane ---------------------------------------------------------------------------------------------------

def serve(c, req, status=None):
    st, n = c.serve(req)
    c.set_status(req, st if status is None else status)
    return n


def push_id(f):
    """Complete with the used entry's id replaced by f(req, vq)."""
    def hook(c, vq, req):
        n = serve(c, req)
        c.push(vq, f(req, vq), n)
    return hook


def push_twice(c, vq, req):
    n = serve(c, req)
    for k in range(2):
        c.write(vq.used + 4 + 8 * ((vq.used_idx + k) % vq.num), "<II", req.head, n)
    vq.used_idx = (vq.used_idx + 2) & 0xffff
    c.write(vq.used + 2, "<H", vq.used_idx)
    c.signal(vq)


def idx_jump(d):
    """One real entry, but used->idx moves by d."""
    def hook(c, vq, req):
        n = serve(c, req)
        c.write(vq.used + 4 + 8 * (vq.used_idx % vq.num), "<II", req.head, n)
        vq.used_idx = (vq.used_idx + d) & 0xffff
        c.write(vq.used + 2, "<H", vq.used_idx)
        c.signal(vq)
    return hook


def backwards(c, vq, req):
    """The first request completes; on the second, used->idx goes back by one."""
    if vq.seen == 1:
        c.finish(vq, req)
        return
    c.write(vq.used + 2, "<H", (vq.used_idx - 1) & 0xffff)
    c.signal(vq)


def length(f):
    def hook(c, vq, req):
        serve(c, req)
        c.push(vq, req.head, f(req))
    return hook


def status(value):
    """Data served, status byte set to value (None: never written)."""
    def hook(c, vq, req):
        st, n = c.serve(req)
        if value is not None:
            c.set_status(req, value)
        c.push(vq, req.head, n)
    return hook


def no_data_ok_len_1(c, vq, req):
    """Status OK, nothing written, and the used length says so."""
    c.set_status(req, 0)
    c.push(vq, req.head, 1)


def nothing_at_all(c, vq, req):
    """A completion with neither data nor status written (the length claims everything)."""
    c.push(vq, req.head, req.in_len)


def hang_up_after(n, complete=0):
    """Take n requests (complete the first `complete`), then hang up with the rest in flight."""
    def hook(c, vq, req):
        if vq.seen <= complete:
            c.finish(vq, req)
        if vq.seen >= n:
            c.hang_up()
    return hook


IO_FAILS = [
    # id, complete hook, commands, expected texts
    ("id-out-of-range", push_id(lambda r, vq: vq.num + 3), [READ], [DEAD, EIO]),
    ("id-huge", push_id(lambda r, vq: 0xffffffff), [READ], [DEAD_RING]),
    ("id-not-in-flight", push_id(lambda r, vq: (r.head + 1) % vq.num), [READ], [DEAD_RING]),
    ("id-completed-twice", push_twice, [READ, READ2], [DEAD_RING]),
    # (the real entry before the stale ones completes its request; the next one finds the device dead)
    ("idx-jump-past-ring", idx_jump(129), [READ, READ2], [DEAD_RING]),
    ("idx-jump-0x8000", idx_jump(0x8000), [READ], [DEAD_RING]),
    ("idx-jump-stale-entries", idx_jump(5), [READ, READ2], [DEAD_RING]),
    ("idx-backwards", backwards, [READ, READ2], [DEAD_RING]),
    ("no-data-no-status", nothing_at_all, [READ], ["the back-end set no valid status (0xff)", EIO]),
    ("status-never-written", status(None), [READ], ["the back-end set no valid status (0xff)"]),
    ("status-invalid", status(7), [READ], ["the back-end set no valid status (0x07)"]),
    ("status-invalid-write", status(0x80), ["write -P 1 0 4k"],
     ["write at 0: the back-end set no valid status (0x80)"]),
    ("status-ioerr", status(S_IOERR), [READ], ["reported an I/O error (VIRTIO_BLK_S_IOERR)", EIO]),
    ("status-unsupp", status(S_UNSUPP), ["flush"], ["not supported by the back-end", os.strerror(95)]),
    ("hang-up-in-flight", hang_up_after(8), [f"aio-read -P {FILL:#x} 0 4k 8"],
     ["back-end disconnected (the back-end closed the connection)", EIO]),
    ("hang-up-after-3-of-8", hang_up_after(8, 3), [f"aio-read -P {FILL:#x} 0 4k 8"], ["back-end disconnected"]),
]


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "chained"])
@pytest.mark.parametrize("hook,cmds,texts", [pytest.param(*x[1:], id=x[0]) for x in IO_FAILS])
def test_broken_completion_fails_request(hostile, vdisk_io, hook, cmds, texts, indirect):
    b = hostile(Scenario(complete=hook))
    t0 = time.monotonic()
    p = io_run(vdisk_io, b, *cmds, extra=[] if indirect else ["--set", "indirect-desc=false"])
    assert p.returncode == 1, p.stdout + p.stderr
    for t in texts:
        assert t in p.stderr, p.stderr
    assert "Pattern verification failed" not in p.stderr
    assert time.monotonic() - t0 < 10


# With strict-used-len=true the used length is checked too (off by default, see below).
LEN_FAILS = [
    ("len-past-buffer", length(lambda r: r.in_len + 1), [READ],
     ["claims 4098 bytes written into 4097 device-writable bytes", EIO]),
    ("len-huge", length(lambda r: 0xffffffff), [READ], ["claims 4294967295 bytes written into 4097"]),
    ("len-past-status-of-write", length(lambda r: 2), ["write -P 1 0 4k"], ["claims 2 bytes written into 1 device"]),
    ("len-short-read", length(lambda r: 100), [READ], ["reports only 100 of 4096 bytes read", EIO]),
    ("no-data-len-1", no_data_ok_len_1, [READ], ["reports only 1 of 4096 bytes read"]),
]


@pytest.mark.parametrize("hook,cmds,texts", [pytest.param(*x[1:], id=x[0]) for x in LEN_FAILS])
def test_strict_used_len_fails_request(hostile, vdisk_io, hook, cmds, texts):
    b = hostile(Scenario(complete=hook))
    p = io_run(vdisk_io, b, *cmds, extra=["--set", "strict-used-len=true"])
    assert p.returncode == 1, p.stdout + p.stderr
    for t in texts:
        assert t in p.stderr, p.stderr
    assert "Pattern verification failed" not in p.stderr


@pytest.mark.parametrize("used_len", [0, 1, 100, 0xffffffff], ids=["0", "1", "100", "huge"])
def test_used_len_ignored_by_default(hostile, vdisk_io, used_len):
    """
    Data and status served, the used length wrong (qemu-storage-daemon 6.0-7.1
    reports leftover memory there): by default the length is ignored, as
    Linux's virtio-blk does, and the I/O succeeds with the right data.
    """
    b = hostile(Scenario(complete=length(lambda r: used_len)))
    p = io_run(vdisk_io, b, READ, "write -P 1 0 4k", "flush")
    assert p.returncode == 0, p.stdout + p.stderr


def test_spurious_call_signals(hostile, vdisk_io):
    """The call eventfd fires with nothing new (hundreds of times): requests still complete, correctly."""
    def hook(c, vq, req):
        for _ in range(300):
            c.signal(vq)
            time.sleep(0.0002)
        c.finish(vq, req)

    b = hostile(Scenario(complete=hook))
    p = io_run(vdisk_io, b, READ, "write -P 9 8k 4k", "read -P 9 8k 4k", f"aio-read -P {FILL:#x} 64k 4k 4")
    assert p.returncode == 0, p.stderr


def test_scribbled_descriptor_table_is_not_trusted(hostile, vdisk_io):
    """The rings region is shared: a back-end that scribbles over the descriptor table and the request headers
    after every completion must not steer the driver (it keeps its own chain state and rewrites what it
    publishes)."""
    def hook(c, vq, req):
        first = c.read(vq.desc + 16 * req.head, "<Q")[0]  # the indirect table, or the request header
        n = serve(c, req)
        # Only what this request used (before it is handed back and reused): the back end itself still
        # parses the requests behind it.
        c.write(vq.desc + 16 * req.head, "<QIHH", 0xffffffffffffffff, 0xffffffff, 0xffff, 0xffff)
        m, off = c.translate(first, 16)
        m[off:off + 16] = b"\xff" * 16
        c.push(vq, req.head, n)

    for extra in ([], ["--set", "indirect-desc=false"]):
        b = hostile(Scenario(complete=hook))
        p = io_run(vdisk_io, b, READ, "write -v -P 6 0 12k", "read -v -P 6 0 12k", f"aio-read -P {FILL:#x} 64k 4k 16",
                   "discard 1m 1m", "flush", extra=extra)
        assert p.returncode == 0, p.stderr


def test_write_with_zero_used_len_is_accepted(hostile, vdisk_io):
    """Some back-ends do not count the status byte: a len that covers the data is enough."""
    def hook(c, vq, req):
        st, n = c.serve(req)
        c.set_status(req, st)
        c.push(vq, req.head, 0 if req.type != 0 else n - 1)

    b = hostile(Scenario(complete=hook))
    p = io_run(vdisk_io, b, "write -P 3 0 4k", "flush", "read -P 3 0 4k")
    assert p.returncode == 0, p.stderr


def test_requests_never_completed_bound_destroy(hostile, vu_client):
    """A back-end that takes requests and never completes them: destroy waits one reply-timeout, not forever."""
    b = hostile(Scenario(complete=lambda c, vq, req: None))
    p = run([vu_client, "--path", b.path, "--set", "reply-timeout=1", "destroy-inflight"], timeout=TIMEOUT, check=0)
    ms = int(p.stdout.split("destroy took ")[1].split()[0])
    assert 900 <= ms < 5000, p.stdout


def test_hostile_poll_queue(hostile, vu_client):
    """A poll queue spins on the used ring: a bad entry there must end the spin with an error."""
    def hook(c, vq, req):
        n = serve(c, req)
        c.push(vq, vq.num + 7 if vq.index == 1 else req.head, n)

    b = hostile(Scenario(complete=hook))
    p = run([vu_client, "--path", b.path, "--queues", "1", "--poll-queues", "1", "multiq", "1"], timeout=TIMEOUT)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "bad used ring entry on queue 1" in p.stdout + p.stderr


@pytest.fixture(scope="session")
def hostile_client(tmp_path_factory):
    return compile_client(Path(__file__).with_name("vu-hostile-client.c"),
                          tmp_path_factory.mktemp("bin") / "vu-hostile-client")


def good_then_bad(c, vq, req):
    """A valid completion, then at once (no signal) an entry with an impossible id."""
    c.finish(vq, req)
    c.push(vq, 0xffff, 1, signal=False)


@pytest.mark.parametrize("mode,rounds,event_idx", [("evloop", 10, False), ("spin", 40, False), ("spin", 40, True)],
                         ids=["evloop", "spin", "spin-event-idx"])
def test_bad_entry_in_event_driven_queue(hostile, hostile_client, mode, rounds, event_idx):
    """Completion fd on: do_io(min=0) re-enables notifications and loops while entries are pending.  A bad
    entry that arrives inside that loop was never consumed, so the loop spun forever (spin: ~1 in 5 rounds)."""
    b = hostile(Scenario(complete=good_then_bad, features=DEFAULT_FEATURES | event_idx << F_EVENT_IDX))
    p = run([hostile_client, "--path", b.path, mode, str(rounds), "4"], timeout=TIMEOUT, check=0)
    ok, failed = (int(x) for x in re.match(r"ok=(\d+) failed=(\d+)", p.stdout).groups())
    assert ok >= rounds and ok + failed == 4 * rounds, p.stdout
    assert failed == 0 or "bad used ring entry" in p.stdout
    assert b.connections == rounds
