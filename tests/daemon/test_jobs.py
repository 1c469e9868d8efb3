# SPDX-License-Identifier: GPL-2.0-or-later
"""
Block jobs over the control socket: block-stream (whole chain, down to a
base node, with the node exported and written to meanwhile), pause/resume,
speed, cancel, finalize/dismiss, the job queries and events, and the errors.
Every result is checked with qemu-img (info, check, compare against a raw
reference built by qemu-img itself).
"""
import json
import random
import signal
import threading
import time

import pytest

from conftest import MiB, QMPError, have, run

pytestmark = pytest.mark.skipif(not have("qemu-img") or not have("qemu-io"), reason="needs qemu-img and qemu-io")

SIZE = 32 * MiB


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(args + [str(path)])


def make_chain(tmp):
    """base <- mid <- top, data in each layer (mid has a zero run over base data)."""
    base, mid, top = tmp / "base.qcow2", tmp / "mid.qcow2", tmp / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 20M 3M")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid)])
    qemu_io(mid, "write -P 0x22 2M 4M", "write -z 21M 1M", "write -P 0x23 28M 64k")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top)])
    qemu_io(top, "write -P 0x33 5M 2M", "write -P 0x34 30M 4k")
    return base, mid, top


def reference(tmp, image, name="ref.raw"):
    ref = tmp / name
    run(["qemu-img", "convert", "-O", "raw", str(image), str(ref)])
    return ref


def info(path):
    return json.loads(run(["qemu-img", "info", "--output=json", "-U", str(path)]).stdout)


def assert_same(image, ref):
    run(["qemu-img", "check", str(image)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(ref)])


def statuses(ctl, job_id, until):
    """JOB_STATUS_CHANGE statuses of job_id up to (and including) `until`."""
    seen = []
    while not seen or seen[-1] != until:
        ev = ctl.wait_event("JOB_STATUS_CHANGE", timeout=60)
        if ev["data"]["id"] == job_id:
            seen.append(ev["data"]["status"])
    return seen


def chain_daemon(daemon_factory, top, extra=()):
    return daemon_factory(["--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={top}",
                           "--export", "type=nbd,id=e0,node-name=q0,writable=on", *extra])


def test_stream_whole_chain(daemon_factory, tmp_path):
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    c = d.ctl
    c.cmd("block-stream", job_id="s0", device="q0")
    assert statuses(c, "s0", "null") == ["created", "running", "waiting", "pending", "concluded", "null"]
    done = c.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert done["device"] == "s0" and done["type"] == "stream" and "error" not in done
    assert done["len"] == SIZE and done["offset"] == SIZE
    assert c.cmd("query-jobs") == []
    # The export keeps serving the streamed node.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri("q0"), str(ref)])
    d.stop()
    assert "backing-filename" not in info(top)
    assert_same(top, ref)


def test_stream_down_to_base_node(daemon_factory, tmp_path):
    base, mid, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = daemon_factory([
        "--blockdev", f"driver=file,node-name=fb,filename={base}",
        "--blockdev", "driver=qcow2,node-name=b0,file=fb,backing=",
        "--blockdev", f"driver=file,node-name=fm,filename={mid}",
        "--blockdev", "driver=qcow2,node-name=m0,file=fm,backing=b0",
        "--blockdev", f"driver=file,node-name=ft,filename={top}",
        "--blockdev", "driver=qcow2,node-name=q0,file=ft,backing=m0",
        "--export", "type=nbd,id=e0,node-name=q0,writable=on",
    ])
    c = d.ctl
    with pytest.raises(QMPError, match="in use"):
        c.cmd("blockdev-del", node_name="m0")
    c.cmd("block-stream", device="q0", base_node="b0")
    done = c.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert done["device"] == "q0" and "error" not in done
    # q0 no longer uses m0, but now uses b0 directly.
    c.cmd("blockdev-del", node_name="m0")
    c.cmd("blockdev-del", node_name="fm")
    with pytest.raises(QMPError, match="in use"):
        c.cmd("blockdev-del", node_name="b0")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri("q0"), str(ref)])
    d.stop()
    assert info(top)["backing-filename"] == "base.qcow2"
    assert info(top)["backing-filename-format"] == "qcow2"
    assert_same(top, ref)
    # Base itself was not touched; mid's data now lives in top.
    alloc = json.loads(run(["qemu-img", "map", "--output=json", str(top)]).stdout)
    top_depth0 = [m for m in alloc if m["depth"] == 0 and m["data"]]
    assert any(m["start"] <= 2 * MiB < m["start"] + m["length"] for m in top_depth0)
    assert not any(m["start"] <= 0 < m["start"] + m["length"] for m in top_depth0), "base data was copied"


def test_stream_while_guest_writes(daemon_factory, tmp_path):
    """Guest writes racing the copy into exactly the ranges being copied must all survive."""
    import nbd
    base, _, top = make_chain(tmp_path)
    qemu_io(base, "write -P 0x13 8M 8M")
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    c = d.ctl
    done = threading.Event()
    last = [dict() for _ in range(4)]  # per writer: offset -> byte, disjoint offsets

    def writer(k):
        h = nbd.NBD()
        h.connect_uri(d.uri("q0"))
        rnd = random.Random(k)
        blocks = [b for b in range(16 * MiB // 4096) if b % 4 == k]
        while not done.is_set():
            off = rnd.choice(blocks) * 4096
            v = rnd.randrange(1, 256)
            h.pwrite(bytes([v]) * 4096, off)
            last[k][off] = v
        h.shutdown()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)
        c.cmd("block-stream", job_id="s0", device="q0")
        ev = c.wait_event("BLOCK_JOB_COMPLETED", timeout=120)["data"]
    finally:
        done.set()
        for t in threads:
            t.join()
    assert "error" not in ev
    assert sum(len(x) for x in last) >= 4  # few on a loaded machine; a mutant without tracking fails with ~100
    d.stop()
    with open(ref, "r+b") as f:
        for per in last:
            for off, v in per.items():
                f.seek(off)
                f.write(bytes([v]) * 4096)
    assert "backing-filename" not in info(top)
    assert_same(top, ref)


def test_pause_resume_speed_and_queries(daemon_factory, tmp_path):
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    c = d.ctl
    c.cmd("block-stream", job_id="s0", device="q0", speed=2 * MiB, auto_finalize=False, auto_dismiss=False)
    time.sleep(0.5)
    c.cmd("job-pause", id="s0")
    time.sleep(0.3)
    j1 = c.cmd("query-jobs")[0]
    time.sleep(0.5)
    j2 = c.cmd("query-jobs")[0]
    assert j1["status"] == "paused" and j1["type"] == "stream"
    assert j2["current-progress"] == j1["current-progress"] < j1["total-progress"] == SIZE
    bj = c.cmd("query-block-jobs")[0]
    assert bj["device"] == "s0" and bj["paused"] and bj["speed"] == 2 * MiB and bj["len"] == SIZE
    with pytest.raises(QMPError, match="cannot accept"):
        c.cmd("job-pause", id="s0")
    c.cmd("job-resume", id="s0")
    c.cmd("block-job-set-speed", device="s0", speed=0)
    assert statuses(c, "s0", "pending")[-2:] == ["waiting", "pending"]
    with pytest.raises(QMPError, match="cannot accept"):
        c.cmd("job-dismiss", id="s0")
    c.cmd("job-finalize", id="s0")
    assert statuses(c, "s0", "concluded")[-1] == "concluded"
    assert c.cmd("query-jobs")[0]["status"] == "concluded"
    c.cmd("job-dismiss", id="s0")
    assert c.cmd("query-jobs") == []
    d.stop()
    assert "backing-filename" not in info(top)
    assert_same(top, ref)


def test_cancel_keeps_chain(daemon_factory, tmp_path):
    _, mid, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    c = d.ctl
    c.cmd("block-stream", job_id="s0", device="q0", speed=1 * MiB)
    time.sleep(0.3)
    c.cmd("job-cancel", id="s0")
    ev = c.wait_event("BLOCK_JOB_CANCELLED")["data"]
    assert ev["device"] == "s0" and ev["offset"] < SIZE
    assert statuses(c, "s0", "null")[-3:] == ["aborting", "concluded", "null"]
    with pytest.raises(QMPError, match="not found"):
        c.cmd("job-cancel", id="s0")
    d.stop()
    assert info(top)["backing-filename"] == "mid.qcow2"
    assert_same(top, ref)


def test_shutdown_during_stream(daemon_factory, tmp_path):
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    d.ctl.cmd("block-stream", device="q0", speed=1 * MiB)
    time.sleep(0.3)
    d.stop()
    assert info(top)["backing-filename"] == "mid.qcow2"
    assert not info(top)["format-specific"]["data"].get("corrupt")
    assert_same(top, ref)


def test_stream_without_backing_completes(daemon_factory, tmp_path):
    img = tmp_path / "solo.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"])
    qemu_io(img, "write -P 0x5a 1M 1M")
    d = chain_daemon(daemon_factory, img)
    d.ctl.cmd("block-stream", device="q0")
    assert "error" not in d.ctl.wait_event("BLOCK_JOB_COMPLETED")["data"]
    d.stop()
    run(["qemu-img", "check", str(img)])


def test_job_errors(daemon_factory, tmp_path):
    base, mid, top = make_chain(tmp_path)
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\0" * MiB)
    d = daemon_factory([
        "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={top}",
        "--blockdev", f"driver=file,node-name=f1,filename={raw}",
        "--blockdev", "driver=raw,node-name=r1,file=f1",
        "--blockdev", f"driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={mid},"
                      "file.read-only=on",
    ])
    c = d.ctl
    cases = [
        (dict(device="nope"), "Cannot find"),
        (dict(device="q0", base_node="nope"), "Cannot find node"),
        (dict(device="q0", base_node="r1"), "not in the backing chain"),
        (dict(device="q0", base="/no/such.qcow2"), "not in the backing chain"),
        (dict(device="q0", base="x", base_node="r1"), "at the same time"),
        (dict(device="q0", job_id="9bad"), "Invalid job ID"),
        (dict(device="q0", on_error="ignore"), "not supported"),
        (dict(device="q0", bogus=1), "invalid parameter"),
        (dict(device="r1"), "cannot have its backing chain streamed"),
        (dict(device="ro"), "read-only"),
        (dict(device="q0", speed="fast"), ""),
    ]
    for args, msg in cases:
        with pytest.raises(QMPError, match=msg):
            c.cmd("block-stream", **args)
    assert c.cmd("query-jobs") == []
    c.cmd("block-stream", job_id="s0", device="q0", speed=512 * 1024)
    with pytest.raises(QMPError, match="already in use"):
        c.cmd("block-stream", job_id="s0", device="r1")
    with pytest.raises(QMPError, match="busy"):
        c.cmd("block-stream", job_id="s1", device="q0")
    with pytest.raises(QMPError, match="block job"):
        c.cmd("blockdev-del", node_name="q0")
    for cmd in ("job-finalize", "job-dismiss"):
        with pytest.raises(QMPError, match="cannot accept"):
            c.cmd(cmd, id="s0")
    with pytest.raises(QMPError, match="not found"):
        c.cmd("job-pause", id="nope")
    c.cmd("block-job-cancel", device="s0")
    c.wait_event("BLOCK_JOB_CANCELLED")
    # A second client's quit in the middle of a new job is clean too.
    c.cmd("block-stream", job_id="s2", device="q0", speed=512 * 1024)
    c.cmd("quit")
    d.stop()
    run(["qemu-img", "check", str(top)])
    assert info(top)["backing-filename"] == "mid.qcow2"


def test_stream_concurrent_with_two_clients_reading(daemon_factory, tmp_path):
    """Reads through the export see the same bytes before, during and after the stream."""
    import nbd
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top).read_bytes()
    d = chain_daemon(daemon_factory, top)
    errors = []
    stop = threading.Event()

    def reader(seed):
        h = nbd.NBD()
        h.connect_uri(d.uri("q0"))
        rnd = random.Random(seed)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE // 65536) * 65536
            if h.pread(65536, off) != ref[off:off + 65536]:
                errors.append(off)
        h.shutdown()

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    try:
        d.ctl.cmd("block-stream", device="q0", speed=16 * MiB)
        d.ctl.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, f"reads differed at {errors[:5]}"
    d.stop()


def test_killed_during_stream_leaves_valid_image(daemon_factory, tmp_path):
    """A crash mid-copy: the image still has its backing file and reads the same (leaks allowed)."""
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top)
    d = chain_daemon(daemon_factory, top)
    d.ctl.cmd("block-stream", device="q0", speed=4 * MiB)
    time.sleep(0.6)
    assert d.ctl.cmd("query-jobs")[0]["current-progress"] > 0
    d.stop(sig=signal.SIGKILL, expect_rc=None)
    assert info(top)["backing-filename"] == "mid.qcow2"
    r = run(["qemu-img", "check", "--output=json", str(top)], check=False)
    assert r.returncode in (0, 3), r.stderr  # 3: leaked clusters only
    assert json.loads(r.stdout).get("corruptions", 0) == 0
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(ref)])


def test_stream_under_block_status_from_iothreads(daemon_factory, tmp_path):
    """Clients on two iothreads walk the chain (block status, sparse reads) while the stream switches it."""
    import nbd
    _, _, top = make_chain(tmp_path)
    ref = reference(tmp_path, top).read_bytes()
    d = daemon_factory(["--object", "iothread,id=io0", "--object", "iothread,id=io1",
                        "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={top}",
                        "--export", "type=nbd,id=e0,node-name=q0,iothread.0=io0,iothread.1=io1"])
    errors, calls = [], [0]
    stop = threading.Event()

    def walker(seed):
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.add_meta_context("qemu:allocation-depth")
        h.connect_uri(d.uri("q0"))
        rnd = random.Random(seed)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE // MiB) * MiB
            h.block_status(4 * MiB if off + 4 * MiB <= SIZE else SIZE - off, off, lambda *a: 0)
            if h.pread(MiB, off) != ref[off:off + MiB]:
                errors.append(off)
            calls[0] += 1
        h.shutdown()

    threads = [threading.Thread(target=walker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    try:
        for i in range(3):  # stream, then stream again (nothing left: the chain is already cut)
            d.ctl.cmd("block-stream", job_id=f"s{i}", device="q0")
            assert "error" not in d.ctl.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and calls[0] > 0
    d.stop()
    assert "backing-filename" not in info(top)
