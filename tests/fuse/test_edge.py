# SPDX-License-Identifier: GPL-2.0-or-later
"""The FUSE export on unusual requests: offsets near 2^63, zero lengths,
seeks at and past the end, resizes to absurd sizes, requests interrupted or
still in flight when the export goes away."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from conftest import MiB, QMPError, is_mounted, make_qcow2, make_raw, requires, wait_for
from test_io import fallocate, pread

BIG = (1 << 63) - 8192


@pytest.fixture
def raw(tmp_path):
    return make_raw(tmp_path / "disk.raw", size=4 * MiB)


def expect_errno(err, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, e.value


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_offsets_near_2_63_growable(fuse, tmp_path, fmt):
    """Writes, resizes and allocations that would take the image to 2^63 fail with EFBIG; nothing changes."""
    if fmt == "raw":
        image = make_raw(tmp_path / "disk.raw", size=4 * MiB)
    else:
        image = make_qcow2(tmp_path / "disk.qcow2", size="4M")
    size0 = os.stat(image).st_size
    d, mnt = fuse.start(image, fmt=fmt, export="writable=on,growable=on")
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, BIG) == b""
        assert os.pread(fd, 1, (1 << 63) - 2) == b""
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x" * 4096, BIG)
        expect_errno(errno.EFBIG, os.truncate, mnt, BIG)
        expect_errno(errno.EFBIG, fallocate, mnt, 0, BIG, 4096)
        assert os.pwrite(fd, b"", BIG) == 0
        assert os.fstat(fd).st_size == 4 * MiB
    finally:
        os.close(fd)
    assert os.stat(image).st_size == size0
    assert pread(mnt, 0, MiB) == (pread(image, 0, MiB) if fmt == "raw" else bytes(MiB))


def test_seek_at_and_past_end(fuse, raw):
    """SEEK_DATA/SEEK_HOLE as lseek(2) says: ENXIO at or past the end; the end is a hole."""
    d, mnt = fuse.start(raw, export="writable=off")
    size = 4 * MiB
    fd = os.open(mnt, os.O_RDONLY)
    try:
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            for off in (size, size + 1, BIG):
                expect_errno(errno.ENXIO, os.lseek, fd, off, whence)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB       # make_raw: data in the first MiB only
        expect_errno(errno.ENXIO, os.lseek, fd, MiB, os.SEEK_DATA)  # only a hole follows
        assert os.lseek(fd, size - 1, os.SEEK_HOLE) == size - 1
    finally:
        os.close(fd)


def test_zero_length_and_fsync_read_only(fuse, raw):
    d, mnt = fuse.start(raw, export="writable=off")
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert os.pread(fd, 0, 0) == b"" and os.pread(fd, 0, 8 * MiB) == b""
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def test_zero_length_write_past_end_fixed(fuse, raw):
    d, mnt = fuse.start(raw)
    fd = os.open(mnt, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"", 8 * MiB) == 0
        assert os.pwrite(fd, b"", 4 * MiB) == 0
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(mnt).st_size == 4 * MiB


READER = r"""
import os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
while True:
    try:
        data = os.pread(fd, 65536, int(sys.argv[2]))
    except OSError as e:
        print("error", e.errno, flush=True)
        break
    print("read", len(data), data.count(0), flush=True)
"""


def slow_export(fuse, latency_ms=300, export="writable=on"):
    mnt = fuse.mountpoint()
    d = fuse.factory(["--blockdev", f"driver=null-co,node-name=n0,size={16 * MiB},latency-ns={latency_ms * 1000000}",
                      "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={mnt},{export}"], nbd=False)
    fuse.daemons.append(d)
    assert is_mounted(mnt), d.output()
    return d, mnt


def readers(mnt, n):
    ps = [subprocess.Popen([sys.executable, "-c", READER, str(mnt), str(i * 65536)], stdout=subprocess.PIPE,
                           text=True) for i in range(n)]
    for p in ps:
        assert p.stdout.readline() == "open\n"
    return ps


def in_flight(d):
    return d.qmp("query-stats", target="export")["exports"][0]["in-flight"]


def test_interrupted_requests(fuse):
    """Signals and kills while requests are in flight: the kernel interrupts or abandons them; the export
    answers them anyway (into the void for the killed ones) and goes on serving."""
    d, mnt = slow_export(fuse)
    ps = readers(mnt, 4)
    try:
        wait_for(lambda: in_flight(d) >= 4, what="4 requests in flight")
        for p in ps[:2]:
            p.send_signal(signal.SIGUSR1)  # FUSE_INTERRUPT; the request still completes
        for p in ps[2:]:
            p.kill()
        for p in ps[:2]:
            assert p.stdout.readline() == "read 65536 65536\n"
    finally:
        for p in ps:
            p.kill()
            p.wait()
    wait_for(lambda: in_flight(d) == 0, what="no request in flight")
    assert pread(mnt, 0, 4096) == bytes(4096)


@pytest.mark.parametrize("how", ["export-del", "quit"])
def test_shutdown_with_requests_in_flight(fuse, how):
    """block-export-del and daemon exit while requests are in flight: they finish, the file is unmounted,
    the readers see an error (never a hang), the daemon stays sane (ASan checks the log)."""
    d, mnt = slow_export(fuse)
    ps = readers(mnt, 6)
    try:
        wait_for(lambda: in_flight(d) >= 6, what="6 requests in flight")
        if how == "export-del":
            d.qmp("block-export-del", id="e0")
            wait_for(lambda: not is_mounted(mnt), what="the unmount")
            assert d.qmp("query-block-exports") == []
        else:
            d.stop()
            assert not is_mounted(mnt)
        for p in ps:
            out = p.communicate(timeout=20)[0]
            assert "error" in out.splitlines()[-1], out
    finally:
        for p in ps:
            p.kill()
            p.wait()


def test_same_mountpoint_spelled_differently(fuse, raw, tmp_path):
    """A second export on a file we already show, named another way (./, //, a symlinked directory, a
    symlink): refused with a clear error; looking at the file must not hang the daemon on its own mount."""
    d, mnt = fuse.start(raw)
    (tmp_path / "dirlink").symlink_to(tmp_path)
    (tmp_path / "filelink").symlink_to(mnt)
    for spelling in (f"{tmp_path}/./mnt", f"{tmp_path}//mnt", f"{tmp_path}/dirlink/mnt", f"{tmp_path}/filelink"):
        with pytest.raises(QMPError) as e:
            d.qmp("block-export-add", type="fuse", id="e1", node_name="n0", mountpoint=spelling)
        assert "already used by FUSE export 'e0'" in str(e.value), spelling
    for spelling in (f"{mnt}/", f"{mnt}/x", f"{tmp_path}/filelink/x"):  # our file as a directory
        with pytest.raises(QMPError) as e:
            d.qmp("block-export-add", type="fuse", id="e1", node_name="n0", mountpoint=spelling)
        assert "Not a directory" in str(e.value), spelling
    assert pread(mnt, 0, 4096) == pread(raw, 0, 4096)
