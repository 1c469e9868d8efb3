# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd's vhost-user-blk export with an iothread list: virtqueue i is served by iothread i mod n (kick handler,
request coroutines, node calls in that thread).  Data written through several queues at once by our client driver
is checked by the client, by qemu-img compare against a reference, and the iothreads must have done the work."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import MiB, pattern, run
from test_export import Control

IOTHREADS = ["--object", "iothread,id=io0", "--object", "iothread,id=io1"]


def thread_runtime_ns(pid):
    """{thread name: CPU time in ns} of a process (schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[name] = out.get(name, 0) + int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return out


def reference(path, size, mb, queues):
    """What vu-client multiq leaves: queue i's pattern (seed 100 + i) at i * mb MiB, zeroes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(queues):
            f.seek(i * mb * MiB)
            f.write(pattern(i * mb * MiB, mb * MiB, 100 + i))


@pytest.mark.parametrize("fmt,queues,opts", [("raw", 2, ""), ("raw", 3, ",poll-us=50"), ("qcow2", 2, "")])
def test_queues_on_iothreads(vdiskd, image, client, tmp_path, fmt, queues, opts):
    if fmt == "qcow2" and not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    size = 32 * MiB
    if fmt == "qcow2":
        img = tmp_path / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size)], check=0)
    else:
        img = image(size)
    ctl = tmp_path / "ctl.sock"
    d = vdiskd(img, fmt=fmt, opts=f"num-queues={queues},iothread.0=io0,iothread.1=io1{opts}",
               extra=[*IOTHREADS, "--control", f"unix:{ctl}"])
    c = Control(ctl)
    e = c.cmd("query-block-exports")[0]
    assert e.get("iothreads", e.get("iothread")) in (["io0", "io1"], "io0"), e
    c.close()
    before = thread_runtime_ns(d.proc.pid)
    mb = 8
    client(d, "--queues", str(queues), "multiq", str(mb))
    after = thread_runtime_ns(d.proc.pid)
    for t in ("vdd-io0", "vdd-io1"):
        # Each iothread served a queue: it ran the kick handlers and requests (an idle one wakes a few times).
        assert after[t] - before[t] > 2_000_000, (t, before, after)
    d.stop()
    ref = tmp_path / "ref.raw"
    reference(ref, size, mb, queues)
    p = run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(img), str(ref)], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_iothreads_hammer_and_reconnect(vdiskd, image, vu_client, client):
    """Two iothreads, two queues: a client killed mid-I/O, then a new one; the daemon stops cleanly."""
    img = image(32 * MiB)
    d = vdiskd(img, opts="num-queues=2,iothread.0=io0,iothread.1=io1", extra=IOTHREADS)
    p = subprocess.Popen([vu_client, "--path", d.sock, "--queues", "2", "hammer", "20"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        time.sleep(1)
    finally:
        p.kill()
        p.wait(timeout=10)
    d.wait_log("disconnected")
    client(d, "--queues", "2", "pattern", "7", "0", "4", "32")
    client(d, "--queues", "2", "multiq", "2")
    assert d.alive


def test_iothread_list_unknown_thread(vdiskd, image):
    with pytest.raises(RuntimeError, match="io9"):
        vdiskd(image(MiB), opts="num-queues=2,iothread.0=io0,iothread.1=io9", extra=IOTHREADS[:2])


def export_stats(ctl):
    c = Control(ctl)
    (e,) = c.cmd("query-stats", target="export")["exports"]
    c.close()
    return e["vhost-user-blk"]


@pytest.mark.parametrize("threads", [0, 2])
def test_adaptive_polling(vdiskd, vdisk_tool, client, image, tmp_path, threads):
    """poll-max-us (QEMU's 32 us): kicks are turned off and on as the window adapts; no request may be missed at
    a hand-over (a miss hangs the client) and data stays intact.  Without polling every request is kicked."""
    for max_us in (0, 32):
        ctl = tmp_path / f"ctl{max_us}.sock"
        opts = f"num-queues=2,poll-max-us={max_us}" + (",iothread.0=io0,iothread.1=io1" if threads else "")
        d = vdiskd(image(16 * MiB, name=f"d{max_us}.raw"), opts=opts,
                   extra=[*(IOTHREADS if threads else []), "--control", f"unix:{ctl}"])
        for qd in (1, 8):
            p = run([vdisk_tool, "bench", "--driver=virtio-blk-vhost-user", f"--path={d.sock}", "--rw=randread",
                     f"--iodepth={qd}", "--numjobs=2", "--runtime=300ms", "--output=json"], check=0, timeout=30)
            assert json.loads(p.stdout)["ios"] > 0
            st = export_stats(ctl)
            if max_us == 0 and qd == 1:
                assert st["kicks"] == st["requests"], st  # QD1 without polling: one kick per request
        client(d, "--queues", "2", "multiq", "2", timeout=60)
        d.stop()
