# SPDX-License-Identifier: GPL-2.0-or-later
"""
An NBD export served from several iothreads (iothread=[io0, io1], QEMU's
spelling; iothread.0=io0,iothread.1=io1 on the command line): connections are
dealt to the threads round-robin and call the node from there -- raw over
file in the calling thread (one libvdisk queue per thread), qcow2 forwarded
to the node's home thread.  Data is checked with qemu-img compare and by
reading back; lifecycle commands and signals run with requests in flight
from both threads.
"""
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import KiB, MiB, have, make_qcow2, make_raw, nbd_handle, requires, run, wait_for

nbd = pytest.importorskip("nbd")

SIZE = 64 * MiB
THREADS = ["--object", "iothread,id=io0", "--object", "iothread,id=io1"]


def start(daemon_factory, image, fmt, extra_export="", cache=None):
    cache_opt = f",cache.direct={'on' if cache == 'none' else 'off'}" if cache else ""
    return daemon_factory(THREADS + [
        "--blockdev", f"driver=file,node-name=f0,filename={image}{cache_opt}",
        "--blockdev", f"driver={fmt},node-name=d0,file=f0",
        "--export", f"type=nbd,id=e0,node-name=d0,writable=on,multi-conn=on,"
                    f"iothread.0=io0,iothread.1=io1{extra_export}",
    ])


def image(tmp_path, fmt):
    if fmt == "raw":
        return make_raw(tmp_path / "disk.raw", SIZE, pattern=False)
    if not have("qemu-img"):
        pytest.skip("needs qemu-img")
    return make_qcow2(tmp_path / "disk.qcow2", "64M")


def lane_threads(d):
    """The threads the daemon says served each connection (from its log)."""
    return re.findall(r"connected to export 'e0' in thread '([^']+)'", d.output())


@requires("nbdcopy", "qemu-img")
@pytest.mark.parametrize("fmt,cache", [("raw", "writeback"), ("raw", "none"), ("qcow2", "writeback")])
def test_nbdcopy_four_connections_two_iothreads(daemon_factory, tmp_path, fmt, cache):
    img = image(tmp_path, fmt)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 4 * MiB):  # data and holes
            f.seek(off)
            f.write(os.urandom(MiB + 4096 + 17))
    d = start(daemon_factory, img, fmt, cache=cache)
    # nbdcopy opens at most --threads connections (default: the number of CPUs).
    run(["nbdcopy", "--threads=4", "--connections=4", "--requests=16", src, d.uri("d0")], timeout=120)
    wait_for(lambda: len(lane_threads(d)) >= 4, what="the log of 4 connections")
    served = lane_threads(d)
    assert len(served) == 4 and served.count("io0") == 2 and served.count("io1") == 2, served
    # Read back over 4 connections too, into a plain file.
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--threads=4", "--connections=4", d.uri("d0"), out], timeout=120)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, out])
    d.stop()
    run(["qemu-img", "compare", "-f", "raw", "-F", fmt, src, img])
    if fmt == "qcow2":
        run(["qemu-img", "check", img])


def _writer(uri, region, chunk, pattern, errors):
    try:
        h = nbd_handle(uri)
        off = region[0]
        cookies = []
        while off < region[1]:
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([pattern]) * chunk), off))
            off += chunk
            while h.aio_in_flight() >= 16:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)
        h.flush()
        h.shutdown()
    except Exception as e:  # reported by the main thread
        errors.append(e)


@requires("qemu-img")
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_concurrent_writers_different_regions(daemon_factory, tmp_path, fmt):
    """Four libnbd handles write their own region at once; every byte lands where it should."""
    img = image(tmp_path, fmt)
    d = start(daemon_factory, img, fmt)
    region = 8 * MiB
    chunk = 64 * KiB
    errors = []
    ts = [threading.Thread(target=_writer, args=(d.uri("d0"), (i * region, (i + 1) * region), chunk, 0x41 + i, errors))
          for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    wait_for(lambda: len(lane_threads(d)) == 4, what="4 connections served")
    assert sorted(lane_threads(d)) == ["io0", "io0", "io1", "io1"]
    stats = {e["id"]: e for e in d.qmp("query-stats")["exports"]}
    assert stats["e0"]["ops"]["write"]["ops"] == 4 * region // chunk
    assert stats["e0"]["ops"]["flush"]["ops"] == 4
    assert stats["e0"]["connections-total"] == 4
    node = {n["node-name"]: n for n in d.qmp("query-stats")["nodes"]}["d0"]
    assert node["block-layer"]["wr_operations"] == 4 * region // chunk
    h = nbd_handle(d.uri("d0"))
    for i in range(4):
        assert h.pread(region, i * region) == bytes([0x41 + i]) * region
    assert h.pread(MiB, 4 * region) == bytes(MiB)
    h.shutdown()
    d.stop()
    expected = tmp_path / "expected.raw"
    with open(expected, "wb") as f:
        for i in range(4):
            f.write(bytes([0x41 + i]) * region)
        f.truncate(SIZE)
    run(["qemu-img", "compare", "-f", "raw", "-F", fmt, expected, img])
    if fmt == "qcow2":
        run(["qemu-img", "check", img])


def test_query_iothreads_and_exports(daemon_factory, tmp_path):
    d = start(daemon_factory, image(tmp_path, "raw"), "raw")
    threads = {t["id"]: t for t in d.qmp("query-iothreads")}
    assert threads["io0"]["exports"] == ["e0"] and threads["io1"]["exports"] == ["e0"]
    assert threads["main"]["nodes"] == ["f0", "d0"] or set(threads["main"]["nodes"]) == {"f0", "d0"}
    (e,) = d.qmp("query-block-exports")
    assert e["iothreads"] == ["io0", "io1"]
    assert e["iothread"] == "main"  # the node stays in its home


def test_json_list_and_default(daemon_factory, tmp_path):
    """block-export-add with a JSON list; without one a single thread serves (the node's home)."""
    img = image(tmp_path, "raw")
    d = daemon_factory(THREADS + [
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
    ])
    d.qmp("block-export-add", type="nbd", id="e0", node_name="d0", writable=True, iothread=["io1", "io0"])
    d.qmp("block-export-add", type="nbd", id="e1", node_name="d0", name="single")
    hs = [nbd_handle(d.uri("d0")) for _ in range(3)]
    wait_for(lambda: len(lane_threads(d)) == 3, what="3 connections served")
    # Dealt round-robin (io1, io0, io1); each thread logs its own, so the log order may differ.
    assert sorted(lane_threads(d)) == ["io0", "io1", "io1"]
    for h in hs:
        h.shutdown()
    h = nbd_handle(d.uri("single"))
    h.pread(4096, 0)
    assert re.search(r"connected to export 'e1' in thread 'main'", d.output())  # after a reply: served
    h.shutdown()


@pytest.mark.parametrize("value,msg", [
    (["io0", "nope"], "iothread 'nope' does not exist"),
    (["io0", "io0"], "twice"),
    ([], "1 to 64"),
    ([1], "element 0 is not a string"),
    (7, "thread name or a list"),
])
def test_bad_iothread_lists(daemon_factory, tmp_path, value, msg):
    img = image(tmp_path, "raw")
    d = daemon_factory(THREADS + [
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
    ])
    r = d.ctl.cmd_raw("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "iothread": value})
    assert "error" in r and msg in r["error"]["desc"], r
    assert d.qmp("query-block-exports") == []
    r = d.ctl.cmd_raw("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "iothread": ["io0"],
                                            "fixed-iothread": True})
    assert "error" in r and "fixed-iothread" in r["error"]["desc"], r


def test_bad_dotted_list_on_command_line(tmp_path):
    from conftest import VDISKD
    img = make_raw(tmp_path / "disk.raw", SIZE, pattern=False)
    p = run([VDISKD] + THREADS + [
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/n.sock",
        "--export", "type=nbd,id=e0,node-name=f0,iothread.0=io0,iothread.2=io1"], check=False, timeout=20)
    assert p.returncode != 0
    assert b"keys must be 0, 1" in p.stderr + p.stdout


# ---- lifecycle with requests in flight from both threads ------------------------------------------


def _hammer(uri, stop, errors, seed, done):
    """Random 4k-64k reads and writes until told to stop or the server goes."""
    import random
    rnd = random.Random(seed)
    try:
        h = nbd_handle(uri)
    except nbd.Error as e:
        errors.append(e)
        return
    try:
        while not stop.is_set():
            n = rnd.choice([4 * KiB, 64 * KiB])
            off = rnd.randrange(0, SIZE - n, 4096)
            if rnd.random() < 0.5:
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(16)) * (n // 16)), off)
            else:
                h.aio_pread(nbd.Buffer(n), off)
            while h.aio_in_flight() >= 8:
                h.poll(-1)
            for _ in range(8):
                c = h.aio_peek_command_completed()
                if not c:
                    break
                h.aio_command_completed(c)
                done[seed] += 1
    except nbd.Error:
        pass  # the server hung up: what these tests do to it
    except Exception as e:
        errors.append(e)


def hammer(d, n=4):
    stop = threading.Event()
    errors = []
    done = [0] * n
    ts = [threading.Thread(target=_hammer, args=(d.uri("d0"), stop, errors, i, done), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    wait_for(lambda: len(lane_threads(d)) == n, what="all clients connected")
    # Every client has had requests complete, and keeps 8 in flight: both lanes are busy.
    wait_for(lambda: min(done) >= 20 or errors, what="requests completing on every connection")
    assert not errors, errors
    return stop, ts, errors


def finish(stop, ts, errors):
    stop.set()
    for t in ts:
        t.join(30)
        assert not t.is_alive()
    assert not errors, errors


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_del_hard_then_blockdev_del_under_load(daemon_factory, tmp_path, fmt):
    img = image(tmp_path, fmt)
    d = start(daemon_factory, img, fmt)
    stop, ts, errors = hammer(d)
    d.qmp("block-export-del", id="e0", mode="hard")
    d.ctl.wait_event("BLOCK_EXPORT_DELETED")
    finish(stop, ts, errors)
    d.qmp("blockdev-del", node_name="d0")
    d.qmp("blockdev-del", node_name="f0")
    assert d.qmp("query-named-block-nodes") == []
    d.qmp("quit")
    d.stop()
    if fmt == "qcow2":
        run(["qemu-img", "check", img])


@pytest.mark.parametrize("how", ["quit", "sigterm"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_shutdown_under_load(daemon_factory, tmp_path, fmt, how):
    img = image(tmp_path, fmt)
    d = start(daemon_factory, img, fmt)
    stop, ts, errors = hammer(d)
    if how == "quit":
        d.ctl.cmd_raw("quit")
    else:
        d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(timeout=30)
    finish(stop, ts, errors)
    d.stop()  # exit status 0, no sanitizer report
    if fmt == "qcow2":
        run(["qemu-img", "check", img])


@requires("fio")
def test_fio_nbd_jobs_over_two_iothreads(daemon_factory, tmp_path):
    """fio's nbd engine, 4 jobs (4 connections), verified random writes on raw."""
    img = image(tmp_path, "raw")
    d = start(daemon_factory, img, "raw")
    p = run(["fio", "--name=mq", "--ioengine=nbd", f"--uri={d.uri('d0')}", "--rw=randwrite", "--bs=4k",
             "--iodepth=8", "--numjobs=4", "--size=4M", "--offset_increment=8M", "--verify=crc32c",
             "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--group_reporting"], timeout=180, check=False)
    if p.returncode != 0 and b"nbd" in p.stderr and b"engine" in p.stderr:
        pytest.skip("fio has no nbd engine")
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert sorted(set(lane_threads(d))) == ["io0", "io1"]
