# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd's vhost-user-blk export against a front end that shrinks its shared memory after SET_MEM_TABLE: the
daemon's next touch of the missing pages (ring, descriptor, status byte, or a block driver filling a buffer) would
be SIGBUS.  The daemon must survive it, reset the device, and serve the next front end.  The test process never
touches the truncated pages itself (that would be its own SIGBUS)."""
import os
import struct

import pytest

import vhu
from conftest import MiB


def still_serves(d):
    assert d.alive
    f = vhu.Frontend(d.sock)
    f.start()
    st, data, _ = f.request(vhu.T_IN, 0, in_len=4096)
    assert st == vhu.S_OK
    f.close()


def expect_reset(d, f):
    assert f.hung_up(), "the daemon did not reset the device"
    f.close()
    d.wait_log("shared memory shrank under us")
    still_serves(d)


@pytest.fixture(params=["file", "null"])
def exp(request, vdiskd, image):
    """A file node (io_uring: the kernel copies, EFAULT) or a null node (reads memset the buffer in the daemon)."""
    if request.param == "null":
        return vdiskd(null=True, size=16 * MiB)
    return vdiskd(image(16 * MiB))


def test_rings_truncated(exp):
    f = vhu.Frontend(exp.sock)
    f.start()
    assert f.request(vhu.T_IN, 0, in_len=4096)[0] == vhu.S_OK
    f.prepare(vhu.T_IN, 0, in_len=4096, head=0)
    q = f.queues[0]
    struct.pack_into("<H", f.mem, q["avail"] + 4 + 2 * (q["avail_idx"] % q["num"]), 0)
    struct.pack_into("<H", f.mem, q["avail"] + 2, q["avail_idx"] + 1)
    os.ftruncate(f.memfd, 0)  # rings, descriptors and buffers gone
    os.eventfd_write(q["kick"], 1)
    expect_reset(exp, f)


def test_buffers_truncated(exp):
    """Rings intact, the request's data buffer and status byte beyond the new end of the file."""
    f = vhu.Frontend(exp.sock)
    f.start()
    f.brk = 2 * MiB
    f.prepare(vhu.T_IN, 0, in_len=64 * 1024, head=0)
    q = f.queues[0]
    struct.pack_into("<H", f.mem, q["avail"] + 4, 0)
    struct.pack_into("<H", f.mem, q["avail"] + 2, 1)
    os.ftruncate(f.memfd, MiB)
    os.eventfd_write(q["kick"], 1)
    expect_reset(exp, f)


def test_truncated_while_requests_wait(vdiskd):
    """Requests in flight in a slow node when the memory goes: they finish into the replaced pages."""
    d = vdiskd(null=True, size=16 * MiB, blockdev_opts="latency-ns=300000000")
    f = vhu.Frontend(d.sock)
    f.start()
    f.brk = 2 * MiB
    for head in (0, 3, 6):
        f.prepare(vhu.T_IN, head, in_len=4096, head=head)
        f.post(head)
    os.ftruncate(f.memfd, 0)
    # The completions (status bytes, used ring) hit the missing pages once the node answers.
    expect_reset(d, f)


def test_write_from_truncated_buffer_fails(vdiskd, image):
    """An O_DIRECT node bounces a misaligned write buffer: the daemon's own copy faults on the truncated pages
    (a second memory region), memguard gives it zeroes, and the request must complete with an I/O error, never as
    a successful write of zeroes."""
    d = vdiskd(image(16 * MiB), blockdev_opts="cache.direct=on")
    f = vhu.Frontend(d.sock)
    f.negotiate()
    second = os.memfd_create("second")
    os.ftruncate(second, 4 * MiB)
    f.mem_table([(0, f.size, vhu.UVA, 0), (64 * MiB, 4 * MiB, vhu.UVA + 64 * MiB, 0)], [f.memfd, second])
    f.setup_queue(0)
    hdr = f.alloc(16)
    struct.pack_into("<IIQ", f.mem, hdr, vhu.T_OUT, 0, 0)
    st = f.alloc(1, 1)
    f.mem[st] = 0xff
    bufs = [(hdr, 16, 0), (64 * MiB + 1, 4096, 0), (st, 1, vhu.D_WRITE)]  # misaligned: bounced
    q = f.queues[0]
    for i, (a, n, fl) in enumerate(bufs):
        f.write_desc(q["desc"], i, a, n, fl | (vhu.D_NEXT if i + 1 < len(bufs) else 0), i + 1)
    os.ftruncate(second, 0)
    f.post(0)
    u = f.used(timeout=5)
    assert u is not None and u[0] == 0, d.log.read_text(errors="replace")
    assert f.mem[st] == vhu.S_IOERR
    os.close(second)
    expect_reset(d, f)
