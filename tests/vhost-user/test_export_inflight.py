# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd's vhost-user-blk export: inflight I/O tracking (INFLIGHT_SHMFD).  A raw front end (vhu.py) takes the
area with GET_INFLIGHT_FD, the daemon dies (SIGKILL) with requests in flight, and a new daemon handed the same
area, guest memory and rings resubmits exactly those requests, oldest first, and continues after them.  Malformed
inflight messages reset the device or are refused; the daemon never crashes."""
import fcntl
import mmap
import os
import struct
import time

import pytest

import vhu
from conftest import MiB

QS = 16  # queue size of the area and the ring
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 1, 2, 4
F_GET_SEALS = 1034
PF_ALL = (1 << vhu.PF_MQ) | (1 << vhu.PF_REPLY_ACK) | (1 << vhu.PF_CONFIG) | (1 << vhu.PF_INFLIGHT)


class Area:
    """A view of one queue's region of the inflight area."""

    def __init__(self, fd, size, offset=0):
        self.map = mmap.mmap(fd, size)
        self.off = offset

    def header(self):
        _, version, desc_num, last_batch_head, used_idx = struct.unpack_from("<QHHHH", self.map, self.off)
        return dict(version=version, desc_num=desc_num, last_batch_head=last_batch_head, used_idx=used_idx)

    def desc(self, i):
        inflight, nxt, counter = struct.unpack_from("<B5xHQ", self.map, self.off + 16 + 16 * i)
        return inflight, nxt, counter

    def set_desc(self, i, inflight, nxt=0, counter=0):
        struct.pack_into("<B5xHQ", self.map, self.off + 16 + 16 * i, inflight, nxt, counter)

    def set_header(self, version, desc_num, last_batch_head, used_idx):
        struct.pack_into("<QHHHH", self.map, self.off, 0, version, desc_num, last_batch_head, used_idx)

    def inflight_heads(self):
        return sorted((self.desc(i)[2], i) for i in range(QS) if self.desc(i)[0])


def connect(d, memfd=None, inflight=None, num=QS):
    """A front end with inflight tracking; inflight=(fd, size) reuses an area, else it asks for a new one."""
    f = vhu.Frontend(d.sock, memfd=memfd)
    f.negotiate(proto=PF_ALL)
    if inflight is None:
        size, off, fd = f.get_inflight(1, QS)
        assert fd is not None and off == 0 and size >= 16 + 16 * QS
        inflight = (fd, size)
        Area(fd, size).map[:] = bytes(size)  # the front end zeroes a new area, as QEMU does
    assert f.set_inflight(inflight[0], inflight[1], 1, QS) == 0
    f.mem_table()
    return f, inflight


def used_entries(f, n, timeout=10):
    out = []
    for _ in range(n):
        e = f.used(timeout=timeout)
        assert e is not None, f"only {len(out)} of {n} requests completed"
        out.append(e[0])
    return out


def wait_for(cond, timeout=10):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_area_from_get_inflight_fd_is_sealed_and_sized(vdiskd):
    d = vdiskd(null=True, opts="num-queues=4")
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, off, fd = f.get_inflight(4, 256)
    assert off == 0 and size == 4 * 4160  # per queue: header + 256 descriptors (4112), rounded up to 64
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    assert seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
    assert os.fstat(fd).st_size == size
    with pytest.raises(OSError):
        os.ftruncate(fd, 0)
    size2, _, fd2 = f.get_inflight(1, 3)
    assert size2 == 64  # 16 + 3 * 16 rounded up to 64
    os.close(fd2)
    f.close()
    os.close(fd)


def test_resubmit_after_daemon_killed(vdiskd, image):
    """Requests stuck in a slow node when the daemon dies are resubmitted by the next daemon, with their data."""
    slow = vdiskd(null=True, size=16 * MiB, blockdev_opts="latency-ns=60000000000")
    f, area_fd = connect(slow)
    f.setup_queue(0, QS)
    area = Area(*area_fd)
    w1 = os.urandom(4096)
    w2 = os.urandom(8192)
    st1, _, _ = f.prepare(vhu.T_OUT, 0, data=w1, head=0)
    st2, inb, in_len = f.prepare(vhu.T_IN, 2048, in_len=4096, head=3)
    st3, _, _ = f.prepare(vhu.T_OUT, 8, data=w2, head=6)
    for head in (0, 3, 6):
        f.post(head)
    # The daemon took all three (they sleep in the node): flagged in flight, counters in the order taken.
    wait_for(lambda: len(area.inflight_heads()) == 3)
    assert [h for _, h in area.inflight_heads()] == [0, 3, 6]
    assert area.header() == dict(version=1, desc_num=QS, last_batch_head=0, used_idx=0)
    slow.kill()
    f.hang_up()

    img = image(16 * MiB)
    expect_read = os.urandom(4096)
    with open(img, "r+b") as fh:
        fh.seek(2048 * 512)
        fh.write(expect_read)
    d = vdiskd(img)
    g, _ = connect(d, memfd=f.memfd, inflight=area_fd)
    g.brk = f.brk
    g.setup_queue(0, QS)  # vring base 0: what a front end whose back end died knows
    g.queues[0]["avail_idx"] = 3
    assert sorted(used_entries(g, 3)) == [0, 3, 6]
    assert [g.mem[st1], g.mem[st2], g.mem[st3]] == [vhu.S_OK] * 3
    assert bytes(g.mem[inb:inb + in_len]) == expect_read
    assert area.inflight_heads() == [] and area.header()["used_idx"] == 3
    d.wait_log("resubmitting 3 requests")
    # New requests continue after the resubmitted ones (avail entry 3).
    st, data, _ = g.request(vhu.T_IN, 0, in_len=4096, head=9)
    assert st == vhu.S_OK and data == w1
    g.close()
    f.close()
    d.stop()
    with open(img, "rb") as fh:
        assert fh.read(4096) == w1
        fh.seek(8 * 512)
        assert fh.read(8192) == w2


def test_last_batch_and_resubmit_order(vdiskd):
    """A back end that died after publishing a completion but before clearing its flag: that head is done; the
    others are resubmitted in counter order (a null node completes them in submission order)."""
    d = vdiskd(null=True)
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(1, QS)
    area = Area(fd, size)
    q = dict(desc=0, avail=16 * QS, used=16 * 4096)
    # State left by the dead back end: heads 6, 3, 0 taken (avail idx 3); 6 completed (used idx 1) but its flag
    # still set and used_idx not advanced; 3 taken before 0.
    f.queues[0] = dict(num=QS, **q)
    sts = {h: f.prepare(vhu.T_IN, h, in_len=512, head=h)[0] for h in (0, 3, 6)}
    del f.queues[0]
    for i, h in enumerate((6, 3, 0)):
        struct.pack_into("<H", f.mem, q["avail"] + 4 + 2 * i, h)
    struct.pack_into("<H", f.mem, q["avail"] + 2, 3)
    struct.pack_into("<II", f.mem, q["used"] + 4, 6, 513)
    struct.pack_into("<H", f.mem, q["used"] + 2, 1)
    area.set_header(1, QS, 6, 0)
    area.set_desc(6, 1, 0, 7)
    area.set_desc(3, 1, 0, 8)
    area.set_desc(0, 1, 0, 9)
    assert f.set_inflight(fd, size) == 0
    f.mem_table()
    f.setup_queue(0, QS)
    f.queues[0].update(avail_idx=3, used_seen=1)
    assert used_entries(f, 2) == [3, 0]
    assert f.used(timeout=0.5) is None  # head 6 was not run again
    assert f.mem[sts[3]] == vhu.S_OK and f.mem[sts[0]] == vhu.S_OK and f.mem[sts[6]] == 0xff
    assert area.inflight_heads() == [] and area.header()["used_idx"] == 3
    d.wait_log("resubmitting 2 requests")
    st, _, _ = f.request(vhu.T_FLUSH, head=9)
    assert st == vhu.S_OK
    f.close()
    os.close(fd)


def test_clean_restart_resubmits_nothing(vdiskd, image):
    """A front end that stops the rings (GET_VRING_BASE) and reconnects to the same daemon: nothing in flight."""
    d = vdiskd(image(8 * MiB))
    f, area_fd = connect(d)
    f.setup_queue(0, QS)
    for i in range(5):
        assert f.request(vhu.T_OUT, i * 8, data=bytes([i]) * 4096, head=0)[0] == vhu.S_OK
    f.send(vhu.GET_VRING_BASE, struct.pack("<II", 0, 0))
    assert struct.unpack("<II", f.recv(vhu.GET_VRING_BASE)) == (0, 5)
    area = Area(*area_fd)
    assert area.inflight_heads() == [] and area.header()["used_idx"] == 5
    f.hang_up()
    g, _ = connect(d, memfd=f.memfd, inflight=area_fd)
    g.brk = f.brk
    g.setup_queue(0, QS)
    g.queues[0].update(avail_idx=5, used_seen=5)
    st, data, _ = g.request(vhu.T_IN, 32, in_len=4096, head=0)
    assert st == vhu.S_OK and data == bytes([4]) * 4096
    time.sleep(0.2)
    assert struct.unpack_from("<H", g.mem, g.queues[0]["used"] + 2)[0] == 6  # nothing old ran again
    assert "resubmitting" not in d.output()
    g.close()
    f.close()


def still_serves(d):
    assert d.alive
    f = vhu.Frontend(d.sock)
    f.start()
    assert f.request(vhu.T_FLUSH)[0] == vhu.S_OK
    f.close()


def inflight_payload(size, nq, qs, offset=0):
    return struct.pack("<QQHHI", size, offset, nq, qs, 0)


@pytest.mark.parametrize("case", ["too-small", "huge-queue-count", "zero-queue-size", "huge-queue-size", "no-fd",
                                  "two-fds", "short-payload", "offset-overflow"])
def test_malformed_set_inflight_resets_device(vdiskd, case):
    d = vdiskd(null=True, opts="num-queues=2")
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(2, QS)
    payload, fds = {
        "too-small": (inflight_payload(size - 64, 2, QS), [fd]),
        "huge-queue-count": (inflight_payload(size, 65535, QS), [fd]),
        "zero-queue-size": (inflight_payload(size, 2, 0), [fd]),
        "huge-queue-size": (inflight_payload(1 << 40, 2, 65535), [fd]),
        "no-fd": (inflight_payload(size, 2, QS), []),
        "two-fds": (inflight_payload(size, 2, QS), [fd, fd]),
        "short-payload": (b"\0" * 12, [fd]),
        "offset-overflow": (inflight_payload(size, 2, QS, offset=(1 << 64) - 64), [fd]),
    }[case]
    f.send(vhu.SET_INFLIGHT_FD, payload, fds)
    assert f.hung_up()
    f.close()
    os.close(fd)
    d.wait_log("resetting the device")
    still_serves(d)


def test_refused_inflight_requests_keep_the_connection(vdiskd):
    d = vdiskd(null=True, opts="num-queues=2")
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    # Geometry we cannot serve: no area (mmap_size 0, no fd), the front end goes on without tracking.
    for nq, qs in ((3, QS), (0, QS), (1, 0), (1, 4096)):
        size, _, fd = f.get_inflight(nq, qs)
        assert (size, fd) == (0, None)
    # A file smaller than the area it claims to hold: refused (ack != 0).
    small = os.memfd_create("small")
    os.ftruncate(small, 64)
    assert f.set_inflight(small, 2 * 320, 2, QS) != 0  # two regions of 16 + 16 * 16 bytes, rounded up to 64
    os.close(small)
    # Not a regular file.
    r, w = os.pipe()
    assert f.set_inflight(r, 2 * 320, 2, QS) != 0  # two regions of 16 + 16 * 16 bytes, rounded up to 64
    os.close(r)
    os.close(w)
    # A ring larger than the area's queue size fails (needs reset); the connection lives.
    size, _, fd = f.get_inflight(1, 8)
    assert f.set_inflight(fd, size, 1, 8) == 0
    f.mem_table()
    f.setup_queue(0, QS)
    assert f.request(vhu.T_FLUSH, timeout=1) is None
    d.wait_log("ring larger than the inflight area")
    # SET_INFLIGHT_FD while a ring runs: refused.
    f.setup_queue(1, 8)
    assert f.set_inflight(fd, size, 1, 8) != 0
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 2
    f.close()
    os.close(fd)
    still_serves(d)


def test_inflight_messages_need_the_protocol_feature(vdiskd):
    d = vdiskd(null=True)
    f = vhu.Frontend(d.sock)
    f.negotiate()  # without PF_INFLIGHT
    # SET_INFLIGHT_FD has no reply of its own: an ack says it failed.
    area = os.memfd_create("area")
    os.ftruncate(area, 4096)
    assert f.set_inflight(area, 4096) != 0
    os.close(area)
    # GET_INFLIGHT_FD's reply is an inflight description, never an ack: a front end sending it unnegotiated (even
    # with NEED_REPLY) is hung up on, never answered with a u64 it would misread.
    f.send(vhu.GET_INFLIGHT_FD, inflight_payload(0, 1, QS), flags=vhu.FLAG_VERSION | vhu.FLAG_NEED_REPLY)
    assert f.hung_up(), "answered GET_INFLIGHT_FD without INFLIGHT_SHMFD"
    f.close()
    d.wait_log("GET_INFLIGHT_FD without INFLIGHT_SHMFD")
    still_serves(d)


def crashed_state(f, heads, used=(), used_idx=None):
    """Rings as a dead back end left them: heads taken (avail idx len(heads)), used the used ring's entries."""
    q = dict(desc=0, avail=16 * QS, used=16 * 4096)
    f.queues[0] = dict(num=QS, **q)
    sts = {h: f.prepare(vhu.T_IN, h, in_len=512, head=h)[0] for h in heads}
    del f.queues[0]
    for i, h in enumerate(heads):
        struct.pack_into("<H", f.mem, q["avail"] + 4 + 2 * i, h)
    struct.pack_into("<H", f.mem, q["avail"] + 2, len(heads))
    for i, h in enumerate(used):
        struct.pack_into("<II", f.mem, q["used"] + 4 + 8 * i, h, 513)
    struct.pack_into("<H", f.mem, q["used"] + 2, len(used) if used_idx is None else used_idx)
    return q, sts


def test_recovery_clears_only_the_last_batch(vdiskd):
    """used->idx two ahead of the area's used_idx: only last_batch_head is known done.  Its next link (a chain
    from an earlier batch) must not clear head 3, still in flight."""
    d = vdiskd(null=True)
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(1, QS)
    area = Area(fd, size)
    crashed_state(f, (5, 6, 3, 0), used=(5, 6))
    area.set_header(1, QS, 6, 0)
    area.set_desc(6, 1, 3, 8)
    area.set_desc(3, 1, 0, 9)
    area.set_desc(0, 1, 0, 10)
    assert f.set_inflight(fd, size) == 0
    f.mem_table()
    f.setup_queue(0, QS)
    f.queues[0].update(avail_idx=4, used_seen=2)
    assert used_entries(f, 2) == [3, 0]
    assert f.used(timeout=0.3) is None
    assert area.inflight_heads() == []
    f.close()
    os.close(fd)
    still_serves(d)


def test_huge_counter_from_the_area_keeps_the_order(vdiskd):
    """A counter of UINT64_MAX in the area: the heads we take afterwards are still newer than those in flight."""
    d = vdiskd(null=True, blockdev_opts="latency-ns=500000000")
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(1, QS)
    area = Area(fd, size)
    crashed_state(f, (3, 0))
    area.set_header(1, QS, 0, 0)
    area.set_desc(3, 1, 0, (1 << 64) - 1)
    area.set_desc(0, 1, 0, 5)
    assert f.set_inflight(fd, size) == 0
    f.mem_table()
    f.setup_queue(0, QS)
    f.queues[0].update(avail_idx=2)
    f.prepare(vhu.T_IN, 0, in_len=512, head=9)
    f.post(9)
    wait_for(lambda: area.desc(9)[0] == 1)
    old = max(area.desc(3)[2], area.desc(0)[2])
    assert area.desc(9)[2] > old, (area.desc(9), area.desc(3), area.desc(0))
    assert sorted(used_entries(f, 3)) == [0, 3, 9]
    assert area.inflight_heads() == []
    f.close()
    os.close(fd)
    still_serves(d)


def test_get_vring_base_before_resubmission_ran(vdiskd):
    """A ring started (kick fd) but never enabled holds heads to resubmit: GET_VRING_BASE completes them (with an
    error) before answering, so the base it returns counts no head the front end will never see used."""
    d = vdiskd(null=True)
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(1, QS)
    area = Area(fd, size)
    q, sts = crashed_state(f, (3, 0))
    area.set_header(1, QS, 0, 0)
    area.set_desc(3, 1, 0, 1)
    area.set_desc(0, 1, 0, 2)
    assert f.set_inflight(fd, size) == 0
    f.mem_table()
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, QS)) == 0
    assert f.msg(vhu.SET_VRING_BASE, struct.pack("<II", 0, 0)) == 0
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, vhu.UVA + q["desc"], vhu.UVA + q["used"],
                                                 vhu.UVA + q["avail"], 0)) == 0
    call = os.eventfd(0, os.EFD_NONBLOCK)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    assert f.msg(vhu.SET_VRING_CALL, struct.pack("<Q", 0), [call]) == 0
    assert f.msg(vhu.SET_VRING_KICK, struct.pack("<Q", 0), [kick]) == 0
    d.wait_log("resubmitting 2 requests")
    f.send(vhu.GET_VRING_BASE, struct.pack("<II", 0, 0))
    _, base = struct.unpack("<II", f.recv(vhu.GET_VRING_BASE))
    used_idx = struct.unpack_from("<H", f.mem, q["used"] + 2)[0]
    assert (base, used_idx) == (2, 2)
    assert f.mem[sts[3]] == vhu.S_IOERR and f.mem[sts[0]] == vhu.S_IOERR
    assert area.inflight_heads() == []
    f.close()
    os.close(call)
    os.close(kick)
    os.close(fd)
    still_serves(d)


def test_set_inflight_while_a_stopped_ring_has_requests_in_flight(vdiskd):
    """The kick fd (a pipe) hangs up while a request waits in a slow node: the ring stops but the request still
    completes into the inflight area.  A new SET_INFLIGHT_FD waits for it before unmapping the old area."""
    d = vdiskd(null=True, size=16 * MiB, blockdev_opts="latency-ns=1000000000")
    f = vhu.Frontend(d.sock)
    f.negotiate(proto=PF_ALL)
    size, _, fd = f.get_inflight(1, QS)
    assert f.set_inflight(fd, size) == 0
    f.mem_table()
    desc, avail, used = 0, 16 * QS, 16 * 4096
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, QS)) == 0
    assert f.msg(vhu.SET_VRING_BASE, struct.pack("<II", 0, 0)) == 0
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, vhu.UVA + desc, vhu.UVA + used,
                                                 vhu.UVA + avail, 0)) == 0
    call = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    assert f.msg(vhu.SET_VRING_CALL, struct.pack("<Q", 0), [call]) == 0
    assert f.msg(vhu.SET_VRING_KICK, struct.pack("<Q", 0), [r]) == 0
    os.close(r)
    assert f.msg(vhu.SET_VRING_ENABLE, struct.pack("<II", 0, 1)) == 0
    f.queues[0] = dict(num=QS, desc=desc, avail=avail, used=used, kick=call, call=os.dup(call), avail_idx=0,
                       used_seen=0)
    st, _, _ = f.prepare(vhu.T_IN, 0, in_len=4096, head=0)
    struct.pack_into("<H", f.mem, avail + 4, 0)
    struct.pack_into("<H", f.mem, avail + 2, 1)
    os.write(w, b"x")  # the request goes into the slow node
    time.sleep(0.3)
    os.close(w)  # the ring stops, the request is still in flight
    d.wait_log("kick fd hung up")
    size2, _, fd2 = f.get_inflight(1, QS)
    assert f.set_inflight(fd2, size2) == 0
    assert d.alive
    assert f.used(timeout=5) == (0, 4097)
    assert f.mem[st] == vhu.S_OK
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 1
    f.close()
    os.close(fd)
    os.close(fd2)
    still_serves(d)
