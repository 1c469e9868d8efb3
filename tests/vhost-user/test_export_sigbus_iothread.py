# SPDX-License-Identifier: GPL-2.0-or-later
"""
The shrunk-guest-memory guard in an iothread: iothreads block every signal
but the faults they raise themselves (a blocked SIGBUS would kill vdiskd
whatever its handler).  One lane on an iothread, and two lanes on two.
"""
import os
import struct
import time

import pytest

import vhu
from conftest import MiB

IOT = ("--object", "iothread,id=io0", "--object", "iothread,id=io1")


@pytest.mark.parametrize("opts", ["iothread=io0", "num-queues=2,iothread.0=io0,iothread.1=io1"])
def test_guest_memory_shrunk_under_iothread(vdiskd, opts):
    d = vdiskd(null=True, size=16 * MiB, opts=opts, extra=IOT)
    f = vhu.Frontend(d.sock)
    f.start()
    assert f.request(vhu.T_IN, 0, in_len=4096)[0] == vhu.S_OK
    # A request whose buffer lies past what the memfd will still hold after the shrink.
    f.brk = 2 * MiB
    f.prepare(vhu.T_IN, 0, in_len=64 * 1024, head=0)
    q = f.queues[0]
    struct.pack_into("<H", f.mem, q["avail"] + 4 + 2 * (q["avail_idx"] % q["num"]), 0)
    struct.pack_into("<H", f.mem, q["avail"] + 2, q["avail_idx"] + 1)
    os.ftruncate(f.memfd, MiB)
    os.eventfd_write(q["kick"], 1)
    time.sleep(1.0)
    assert d.alive, f"vdiskd died ({d.proc.poll()}):\n{d.output()[-3000:]}"
    f.close()
    # The daemon still serves a new front end.
    g = vhu.Frontend(d.sock)
    g.start()
    assert g.request(vhu.T_IN, 0, in_len=4096)[0] == vhu.S_OK
    g.close()
