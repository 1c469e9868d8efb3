# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd's vhost-user-blk export against a raw front end (vhu.py): request types and status codes, malformed
messages and descriptor chains.  The daemon must answer with IOERR/UNSUPP or reset the device, keep serving the next
front end, and never crash (sanitizer builds: no report)."""
import os
import struct
import time

import pytest

import vhu
from conftest import MiB
from vdtest import cpu_seconds

SECTORS = 16 * MiB // 512


@pytest.fixture
def exp(vdiskd, image):
    """A writable 16 MiB export whose file starts with 0x5a bytes (first MiB)."""
    img = image(16 * MiB)
    with open(img, "r+b") as f:
        f.write(b"\x5a" * MiB)
    d = vdiskd(img, opts="serial=vdisk-serial-0123456789")
    d.image = img
    return d


def front(d, **kw):
    f = vhu.Frontend(d.sock)
    f.start(**kw)
    return f


def still_serves(d):
    """A new front end can connect and read (the device was reset, the daemon lives)."""
    assert d.alive
    f = front(d)
    st, data, _ = f.request(vhu.T_IN, 0, in_len=4096)
    assert st == vhu.S_OK and data == b"\x5a" * 4096
    f.close()


def test_requests_and_status_codes(exp):
    f = front(exp)
    st, data, n = f.request(vhu.T_IN, 8, in_len=4096)
    assert (st, data, n) == (vhu.S_OK, b"\x5a" * 4096, 4097)
    assert f.request(vhu.T_OUT, 2048, data=b"\x11" * 8192)[0] == vhu.S_OK
    assert f.request(vhu.T_FLUSH)[0] == vhu.S_OK
    st, data, n = f.request(vhu.T_GET_ID, in_len=20)
    assert st == vhu.S_OK and data == b"vdisk-serial-0123456" and n == 21
    # Beyond the end, straddling it, misaligned length: IOERR.
    assert f.request(vhu.T_IN, SECTORS, in_len=512)[0] == vhu.S_IOERR
    assert f.request(vhu.T_IN, SECTORS - 1, in_len=1024)[0] == vhu.S_IOERR
    assert f.request(vhu.T_IN, 1 << 62, in_len=512)[0] == vhu.S_IOERR
    assert f.request(vhu.T_OUT, 0, data=b"x" * 100)[0] == vhu.S_IOERR
    # Unknown type: UNSUPP.
    assert f.request(77, 0, in_len=512)[0] == vhu.S_UNSUPP
    # Discard / write-zeroes: one 16-byte segment; flags checked; range checked.
    seg = lambda sector, n, flags=0: struct.pack("<QII", sector, n, flags)
    assert f.request(vhu.T_WRITE_ZEROES, data=seg(0, 8, 1))[0] == vhu.S_OK
    assert f.request(vhu.T_DISCARD, data=seg(8, 8))[0] == vhu.S_OK
    assert f.request(vhu.T_DISCARD, data=seg(8, 8, 1))[0] == vhu.S_UNSUPP      # unmap flag on discard
    assert f.request(vhu.T_WRITE_ZEROES, data=seg(0, 8, 6))[0] == vhu.S_UNSUPP  # unknown flags
    assert f.request(vhu.T_DISCARD, data=seg(0, 8) * 2)[0] == vhu.S_UNSUPP      # more segments than max_discard_seg
    assert f.request(vhu.T_DISCARD, data=b"short")[0] == vhu.S_UNSUPP
    assert f.request(vhu.T_WRITE_ZEROES, data=seg(SECTORS - 4, 8))[0] == vhu.S_IOERR
    # Indirect descriptors.
    st, data, _ = f.request(vhu.T_IN, 2048, in_len=8192, indirect=True)
    assert st == vhu.S_OK and data == b"\x11" * 8192
    f.close()
    exp.stop()
    with open(exp.image, "rb") as img:
        blob = img.read(2 * MiB)
    assert blob[:4096] == bytes(4096) and blob[8192:MiB] == b"\x5a" * (MiB - 8192)
    assert blob[MiB:MiB + 8192] == b"\x11" * 8192


def test_read_only_export_refuses_writes(vdiskd, image):
    d = vdiskd(image(8 * MiB), writable=False)
    f = vhu.Frontend(d.sock)
    offered = f.negotiate()
    assert offered & (1 << vhu.F_RO)
    assert not offered & ((1 << vhu.F_DISCARD) | (1 << vhu.F_WRITE_ZEROES))
    f.mem_table()
    f.setup_queue()
    assert f.request(vhu.T_OUT, 0, data=b"w" * 512)[0] == vhu.S_IOERR
    assert f.request(vhu.T_DISCARD, data=struct.pack("<QII", 0, 8, 0))[0] == vhu.S_UNSUPP
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK
    f.close()


def test_config_space_and_features(vdiskd, image):
    d = vdiskd(image(8 * MiB), opts="num-queues=4,queue-size=512,logical-block-size=4096")
    f = vhu.Frontend(d.sock)
    offered = f.negotiate()
    for bit in (vhu.F_VERSION_1, vhu.F_PROTOCOL, vhu.F_MQ, vhu.F_FLUSH, vhu.F_DISCARD, vhu.F_WRITE_ZEROES,
                vhu.F_INDIRECT, vhu.F_EVENT_IDX, vhu.F_BLK_SIZE):
        assert offered & (1 << bit), bit
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 4
    assert f.config() == dict(capacity=8 * MiB // 512, seg_max=510, blk_size=4096, num_queues=4)
    f.config(size=96)  # a front end with a larger config struct gets zeroes after ours
    # SET_CONFIG: nothing is writable.  Unknown requests are refused, the connection stays.
    f.send(vhu.SET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(4), flags=vhu.FLAG_VERSION | vhu.FLAG_NEED_REPLY)
    assert struct.unpack("<Q", f.recv(vhu.SET_CONFIG))[0] != 0
    f.send(99, b"", flags=vhu.FLAG_VERSION | vhu.FLAG_NEED_REPLY)
    assert struct.unpack("<Q", f.recv(99))[0] != 0
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 4
    f.close()


# Malformed messages: each ends the connection; the next front end is served.
def bad_version(f):
    f.send(vhu.GET_FEATURES, flags=2)


def oversized(f):
    f.send(vhu.SET_MEM_TABLE, b"", size=1 << 20)


def short_payload(f):
    f.send(vhu.SET_VRING_NUM, b"\x00\x00")


def ring_index(f):
    f.send(vhu.SET_VRING_NUM, struct.pack("<II", 200, 16))


def kick_without_fd(f):
    f.send(vhu.SET_VRING_KICK, struct.pack("<Q", 0))


def mem_table_without_fds(f):
    f.send(vhu.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, f.size, vhu.UVA, 0))


def mem_table_too_many(f):
    f.send(vhu.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 8))


def mem_table_wrapping(f):
    f.send(vhu.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 2**64 - 4096, 1 << 20, vhu.UVA, 0),
           [f.memfd])


def misaligned_ring(f):
    f.mem_table()
    f.send(vhu.SET_VRING_NUM, struct.pack("<II", 0, 16))
    f.send(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, vhu.UVA + 3, vhu.UVA + 4096, vhu.UVA + 512, 0))


def garbage(f):
    f.sock.sendall(os.urandom(4096))


@pytest.mark.parametrize("attack", [bad_version, oversized, short_payload, ring_index, kick_without_fd,
                                    mem_table_without_fds, mem_table_too_many, mem_table_wrapping, misaligned_ring,
                                    garbage])
def test_malformed_message_resets_device(exp, attack):
    f = vhu.Frontend(exp.sock)
    f.negotiate()
    attack(f)
    assert f.hung_up(), "the back end kept a connection that sent a malformed message"
    f.close()
    exp.wait_log("resetting the device")
    still_serves(exp)


def test_rings_outside_memory_refused(exp):
    f = vhu.Frontend(exp.sock)
    f.negotiate()
    f.mem_table()
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, 16)) == 0
    far = vhu.UVA + f.size - 8
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, far & ~15, vhu.UVA + 4096, vhu.UVA + 512, 0)) != 0
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, 3)) != 0  # not a power of two
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, 4096)) != 0  # beyond queue-size
    f.close()
    still_serves(exp)


# Bad descriptor chains.  Buffers outside shared memory: IOERR.  Unusable chains: the queue stops (logged), the
# other queue and the control channel go on, and a reconnect resets everything.

def test_buffer_outside_memory_is_ioerr(exp):
    f = front(exp)
    hdr, st = f.alloc(16), f.alloc(1, 1)
    struct.pack_into("<IIQ", f.mem, hdr, vhu.T_IN, 0, 0)
    for addr, length in [(f.size - 100, 512), (1 << 40, 512), (2**64 - 256, 512), (f.size, 1)]:
        f.mem[st] = 0xff
        r = f.submit_chain([(hdr, 16, 0), (addr, length, vhu.D_WRITE), (st, 1, vhu.D_WRITE)], status=st)
        assert r is not None and r[0] == vhu.S_IOERR, (addr, length, r)
    # A header outside memory: IOERR too.
    f.mem[st] = 0xff
    r = f.submit_chain([(1 << 40, 16, 0), (st, 1, vhu.D_WRITE)], status=st)
    assert r[0] == vhu.S_IOERR
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK  # the queue still works
    f.close()


def chain_loop(f):
    q = f.queues[0]
    hdr = f.alloc(16)
    f.write_desc(q["desc"], 0, hdr, 16, vhu.D_NEXT, 1)
    f.write_desc(q["desc"], 1, hdr, 16, vhu.D_NEXT, 0)
    f.post(0)


def head_out_of_range(f):
    f.post(500)


def next_out_of_range(f):
    q = f.queues[0]
    f.write_desc(q["desc"], 0, f.alloc(16), 16, vhu.D_NEXT, 999)
    f.post(0)


def no_status(f):
    q = f.queues[0]
    f.write_desc(q["desc"], 0, f.alloc(16), 16, 0)
    f.post(0)


def readable_after_writable(f):
    q = f.queues[0]
    f.write_desc(q["desc"], 0, f.alloc(16), 16, vhu.D_WRITE | vhu.D_NEXT, 1)
    f.write_desc(q["desc"], 1, f.alloc(16), 16, vhu.D_NEXT, 2)
    f.write_desc(q["desc"], 2, f.alloc(1), 1, vhu.D_WRITE)
    f.post(0)


def indirect_outside_memory(f):
    f.write_desc(f.queues[0]["desc"], 0, 1 << 40, 64, vhu.D_INDIRECT)
    f.post(0)


def indirect_nested(f):
    table = f.alloc(64)
    f.write_desc(table, 0, table, 64, vhu.D_INDIRECT)
    f.write_desc(f.queues[0]["desc"], 0, table, 64, vhu.D_INDIRECT)
    f.post(0)


def indirect_bad_length(f):
    f.write_desc(f.queues[0]["desc"], 0, f.alloc(64), 63, vhu.D_INDIRECT)
    f.post(0)


def avail_jump(f):
    q = f.queues[0]
    struct.pack_into("<H", f.mem, q["avail"] + 2, 1000)
    os.eventfd_write(q["kick"], 1)


@pytest.mark.parametrize("attack", [chain_loop, head_out_of_range, next_out_of_range, no_status,
                                    readable_after_writable, indirect_outside_memory, indirect_nested,
                                    indirect_bad_length, avail_jump])
def test_bad_chain_stops_queue(vdiskd, image, attack):
    img = image(8 * MiB)
    with open(img, "r+b") as fh:
        fh.write(b"\x5a" * MiB)
    d = vdiskd(img, opts="num-queues=2")
    f = front(d, queues=2)
    attack(f)
    d.wait_log("queue stopped until the front end resets it")
    assert f.used(0, timeout=0.2) is None
    st, data, _ = f.request(vhu.T_IN, 0, in_len=512, qi=1)  # the other queue is unaffected
    assert st == vhu.S_OK and data == b"\x5a" * 512
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 2  # so is the control channel
    f.close()
    still_serves(d)


def test_disconnect_with_requests_in_flight(vdiskd):
    # A slow node (null-co with latency): hang up while 8 requests are in flight; the daemon finishes them
    # before unmapping, and the next front end is served.
    d = vdiskd(null=True, size=64 * MiB, blockdev_opts="latency-ns=200000000")
    f = front(d, num=32)
    q = f.queues[0]
    for i in range(8):
        hdr, buf, st = f.alloc(16), f.alloc(4096, 512), f.alloc(1, 1)
        struct.pack_into("<IIQ", f.mem, hdr, vhu.T_IN, 0, i * 8)
        f.write_desc(q["desc"], 3 * i, hdr, 16, vhu.D_NEXT, 3 * i + 1)
        f.write_desc(q["desc"], 3 * i + 1, buf, 4096, vhu.D_WRITE | vhu.D_NEXT, 3 * i + 2)
        f.write_desc(q["desc"], 3 * i + 2, st, 1, vhu.D_WRITE)
        f.post(3 * i)
    f.sock.close()
    d.wait_log("front end 1 disconnected")
    f2 = front(d)
    assert f2.request(vhu.T_IN, 0, in_len=512, timeout=5)[0] == vhu.S_OK
    f2.close()
    f.close()


# Regressions from the security review of the export.

def test_region_beyond_its_file_refused(exp):
    # A region larger than its memfd (or whose mmap_offset pushes it past the end) would map fine and then kill
    # the daemon with SIGBUS on the first access beyond the file; it is refused instead.
    f = vhu.Frontend(exp.sock)
    f.negotiate()
    assert f.mem_table([(0, 64 * MiB, vhu.UVA, 0)]) != 0
    assert f.mem_table([(0, f.size, vhu.UVA, 4096)]) != 0
    assert f.mem_table() == 0
    f.close()
    still_serves(exp)


def test_misaligned_region_offset_refused(exp):
    # The ring addresses are aligned in the front end's address space, but an odd mmap_offset misaligns them in
    # ours (atomic loads of descriptors and indexes at odd addresses): the rings are refused.
    f = vhu.Frontend(exp.sock)
    f.negotiate()
    assert f.mem_table([(0, f.size - 4096, vhu.UVA, 1)]) == 0
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, 16)) == 0
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, vhu.UVA, vhu.UVA + 16 * 4096, vhu.UVA + 256, 0)) != 0
    f.close()
    still_serves(exp)


def _post_slow_reads(f, n):
    q = f.queues[0]
    for i in range(n):
        hdr, buf, st = f.alloc(16), f.alloc(4096, 512), f.alloc(1, 1)
        struct.pack_into("<IIQ", f.mem, hdr, vhu.T_IN, 0, i * 8)
        f.mem[st] = 0xff
        f.write_desc(q["desc"], 3 * i, hdr, 16, vhu.D_NEXT, 3 * i + 1)
        f.write_desc(q["desc"], 3 * i + 1, buf, 4096, vhu.D_WRITE | vhu.D_NEXT, 3 * i + 2)
        f.write_desc(q["desc"], 3 * i + 2, st, 1, vhu.D_WRITE)
        f.post(3 * i)
    # With EVENT_IDX the daemon publishes how far it has taken requests (avail_event, after the used ring).
    end = time.monotonic() + 10
    while struct.unpack_from("<H", f.mem, q["used"] + 4 + 8 * q["num"])[0] != n:
        assert time.monotonic() < end, "the daemon never took the requests"
        time.sleep(0.001)


def rings_moved_away(f):
    # New ring addresses outside shared memory while requests are in flight: their completions must not go to
    # a ring that no longer translates (a NULL used ring).
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 1 << 40, 1 << 40, 1 << 40, 0)) != 0


def ring_regrown(f):
    # Stop the kick, grow the ring, restart it: the request slots are reallocated, and must not be while
    # requests in flight still use them.
    q = f.queues[0]
    assert f.msg(vhu.SET_VRING_KICK, struct.pack("<Q", 1 << 8)) != 0
    assert f.msg(vhu.SET_VRING_NUM, struct.pack("<II", 0, 64)) == 0
    assert f.msg(vhu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, vhu.UVA + q["desc"], vhu.UVA + q["used"],
                                                 vhu.UVA + q["avail"], 0)) == 0
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    assert f.msg(vhu.SET_VRING_KICK, struct.pack("<Q", 0), [kick]) == 0
    os.close(q["kick"])
    q["kick"] = kick


@pytest.mark.parametrize("change", [rings_moved_away, ring_regrown])
def test_ring_changes_wait_for_requests_in_flight(vdiskd, change):
    d = vdiskd(null=True, size=64 * MiB, blockdev_opts="latency-ns=200000000")
    f = front(d, num=32, features=(1 << vhu.F_VERSION_1) | (1 << vhu.F_PROTOCOL) | (1 << vhu.F_EVENT_IDX))
    _post_slow_reads(f, 8)
    change(f)
    # Every request finished (into the old ring) before the change took effect.
    done = [f.used(timeout=0.5) for _ in range(8)]
    assert None not in done and sorted(h for h, _ in done) == [3 * i for i in range(8)]
    assert d.alive
    f.close()
    d.wait_log("front end 1 disconnected")
    f2 = front(d)
    assert f2.request(vhu.T_IN, 0, in_len=512, timeout=5)[0] == vhu.S_OK
    f2.close()


def test_kick_fd_that_hangs_up(exp):
    # A pipe as the kick fd, its writer closed: poll reports POLLHUP for ever.  The daemon must stop the queue,
    # not spin on it.
    f = front(exp)
    r, w = os.pipe()
    assert f.msg(vhu.SET_VRING_KICK, struct.pack("<Q", 0), [r]) == 0
    os.close(w)
    os.close(r)
    exp.wait_log("the kick fd hung up")
    before = cpu_seconds(exp.proc.pid)
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 1
    time.sleep(0.5)
    assert cpu_seconds(exp.proc.pid) - before < 0.25, "the daemon spins on a hung-up kick fd"
    f.close()
    still_serves(exp)


def test_saturated_call_eventfd_does_not_block(exp):
    # A blocking call eventfd whose counter the front end set to its maximum: a blocking write(1) would sleep
    # for ever in the export's thread.
    f = front(exp)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    assert f.msg(vhu.SET_VRING_CALL, struct.pack("<Q", 0), [call]) == 0
    os.eventfd_write(call, 0xfffffffffffffffe)
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK
    assert f.get_u64(vhu.GET_QUEUE_NUM) == 1  # the control channel still answers
    assert f.request(vhu.T_IN, 8, in_len=512)[0] == vhu.S_OK
    os.close(call)
    f.close()
    still_serves(exp)


def _daemon_fds(d):
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def _daemon_maps(d):
    with open(f"/proc/{d.proc.pid}/maps") as m:
        return sum(1 for line in m if "vhu-test" in line)


def test_no_fd_or_mapping_leaks(exp):
    # Fds on messages that take none, too many fds, replaced call/kick fds, replaced memory tables, refused
    # tables: once the front end is gone the daemon holds exactly what it held before.
    base = _daemon_fds(exp)
    f = front(exp)
    extra = [os.eventfd(0) for _ in range(3)]
    f.send(vhu.GET_FEATURES, fds=extra)
    f.recv(vhu.GET_FEATURES)
    assert f.msg(99, b"", extra) != 0
    assert f.msg(vhu.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << vhu.PF_REPLY_ACK), extra) == 0
    for _ in range(3):
        assert f.msg(vhu.SET_VRING_CALL, struct.pack("<Q", 0), extra[:1]) == 0
        assert f.msg(vhu.SET_VRING_ERR, struct.pack("<Q", 0), extra[:1]) == 0
        assert f.mem_table() == 0
        assert f.mem_table([(0, 64 * MiB, vhu.UVA, 0)]) != 0
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK
    assert _daemon_maps(exp) == 1
    f.send(vhu.SET_VRING_CALL, struct.pack("<Q", 0), fds=extra)  # more than one fd: hang up
    assert f.hung_up()
    f.close()
    exp.wait_log("front end 1 disconnected")
    assert _daemon_fds(exp) == base and _daemon_maps(exp) == 0
    for fd in extra:
        os.close(fd)
    still_serves(exp)
    exp.wait_log("front end 2 disconnected")
    assert _daemon_fds(exp) == base
