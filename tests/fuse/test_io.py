# SPDX-License-Identifier: GPL-2.0-or-later
"""The FUSE export's data path, driven by real tools through the kernel's FUSE:
dd, cp, fio, python's os calls, and checked against the image with cmp,
qemu-img and `vdisk map`."""
import ctypes
import errno
import filecmp
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import MiB, VDISK, have, is_mounted, make_qcow2, make_raw, requires, run, wait_for

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(path, mode, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def pread(path, off, length):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)


def pwrite(path, off, data, sync=True):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def same_content(a, b, chunk=4 * MiB):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def seek_map(path):
    """Data extents [(offset, length)] found with SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off, out = os.fstat(fd).st_size, 0, []
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert hole > data
            out.append((data, hole - data))
            off = hole
        return out
    finally:
        os.close(fd)


def vdisk_map(image, fmt):
    """Data extents from `vdisk map --output=json`, adjacent ones merged."""
    out = []
    for e in json.loads(run([VDISK, "map", "-f", fmt, "--output=json", image]).stdout):
        if not e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


@pytest.fixture
def raw(tmp_path):
    return make_raw(tmp_path / "disk.raw")


def test_read_matches_image_and_stat(fuse, raw):
    d, mnt = fuse.start(raw)
    st, img = os.stat(mnt), os.stat(raw)
    assert st.st_size == 64 * MiB
    assert st.st_blocks == img.st_blocks  # what the image occupies on its host
    assert same_content(mnt, raw)


def test_dd_write_and_read(fuse, raw, tmp_path):
    d, mnt = fuse.start(raw)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 4096))
    run(["dd", f"if={src}", f"of={mnt}", "bs=1M", "seek=5", "conv=notrunc,fsync", "status=none"])
    # Unaligned small writes too, through a different block size.
    run(["dd", f"if={src}", f"of={mnt}", "bs=777", "count=3", "seek=100001", "oflag=seek_bytes", "conv=notrunc",
         "status=none"])
    out = tmp_path / "out"
    run(["dd", f"if={mnt}", f"of={out}", "bs=1M", "skip=5", "count=4", "status=none"])
    assert out.read_bytes()[:src.stat().st_size] == src.read_bytes()
    assert pread(raw, 100001, 3 * 777) == src.read_bytes()[:3 * 777]
    assert same_content(mnt, raw)


def test_cp_sparse(fuse, raw, tmp_path):
    d, mnt = fuse.start(raw)
    out = tmp_path / "copy"
    run(["cp", "--sparse=always", mnt, out])
    assert filecmp.cmp(mnt, out, shallow=False) and filecmp.cmp(raw, out, shallow=False)
    # Only the data (1 MiB + 256 KiB) takes space in the copy.
    assert os.stat(out).st_blocks * 512 <= 2 * MiB


@requires("fio")
@pytest.mark.parametrize("engine", ["psync", "io_uring"])
def test_fio_verify(fuse, raw, engine):
    d, mnt = fuse.start(raw)
    depth = "1" if engine == "psync" else "16"
    p = run(["fio", "--name=v", f"--filename={mnt}", f"--ioengine={engine}", f"--iodepth={depth}",
             "--rw=randwrite", "--bsrange=4k-256k", "--size=16M", "--offset=8M", "--direct=1",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0", "--output-format=json"],
            timeout=120)
    job = json.loads(p.stdout)["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 16 * MiB
    assert same_content(mnt, raw)
    stats = d.qmp("query-stats", target="export")["exports"][0]
    assert stats["ops"]["write"]["ops"] > 0 and stats["ops"]["write"]["errors"] == 0


@requires("qemu-img", "qemu-io")
def test_qcow2_with_backing(fuse, tmp_path):
    base = make_raw(tmp_path / "base.raw")
    top = make_qcow2(tmp_path / "top.qcow2", backing=base)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 64k", top])
    d, mnt = fuse.start(top, fmt="qcow2")
    # The backing file's data shows through; the top layer's on top of it.
    assert pread(mnt, 0, MiB) == pread(base, 0, MiB)
    assert pread(mnt, 2 * MiB, 64 * 1024) == b"\x33" * 65536
    src = os.urandom(MiB)
    pwrite(mnt, 512 * 1024, src)           # over backing data: copy-on-write
    pwrite(mnt, 40 * MiB + 12345, src[:5000])  # into a hole, unaligned
    ref = tmp_path / "ref.raw"
    run(["cp", mnt, ref])
    d.qmp("block-export-del", id="e0")
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, ref])
    run(["qemu-img", "check", "-f", "qcow2", top])
    assert pread(ref, 512 * 1024, MiB) == src


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_seek_hole_map_matches_vdisk_map(fuse, tmp_path, fmt):
    if fmt == "raw":
        image = make_raw(tmp_path / "disk.raw")
    else:
        if not have("qemu-io"):
            pytest.skip("needs qemu-io")
        image = make_qcow2(tmp_path / "disk.qcow2")
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 8M 192k",
             "-c", "write -z 20M 1M", "-c", "write -P 3 63M 1M", image])
    d, mnt = fuse.start(image, fmt=fmt, export="writable=off")
    got = seek_map(mnt)
    assert got, "no data found"
    assert got == vdisk_map(image, fmt)
    with open(mnt, "rb") as f:
        with pytest.raises(OSError) as e:
            os.lseek(f.fileno(), 64 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO


def test_fallocate_punch_zero_allocate(fuse, raw):
    d, mnt = fuse.start(raw)
    blocks0 = os.stat(mnt).st_blocks
    fallocate(mnt, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * 1024, 512 * 1024)
    assert pread(mnt, 256 * 1024, 512 * 1024) == bytes(512 * 1024)
    assert os.stat(mnt).st_blocks < blocks0  # deallocated in the image
    assert (256 * 1024, 512 * 1024) not in seek_map(mnt)
    assert pread(raw, 256 * 1024, 512 * 1024) == bytes(512 * 1024)
    fallocate(mnt, FALLOC_FL_ZERO_RANGE, 16 * MiB + 4096, 8192)
    assert pread(mnt, 16 * MiB, 16384) == b"\xa5" * 4096 + bytes(8192) + b"\xa5" * 4096
    # Plain allocation of a hole: still reads zeroes, now takes space.
    blocks1 = os.stat(raw).st_blocks
    fallocate(mnt, 0, 30 * MiB, MiB)
    assert pread(mnt, 30 * MiB, MiB) == bytes(MiB)
    assert os.stat(raw).st_blocks >= blocks1 + MiB // 512
    assert os.stat(mnt).st_size == 64 * MiB
    # Past the end of a fixed-size export: refused.
    with pytest.raises(OSError) as e:
        fallocate(mnt, 0, 64 * MiB - 4096, 8192)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        fallocate(mnt, 0x08, 0, 4096)  # FALLOC_FL_COLLAPSE_RANGE
    assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    assert same_content(mnt, raw)


def test_read_only_refuses_writes(fuse, raw):
    d, mnt = fuse.start(raw, export="writable=off")
    before = pread(raw, 0, MiB)
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(mnt, flags)
        assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.truncate(mnt, MiB)
    assert e.value.errno == errno.EROFS
    assert os.stat(mnt).st_mode & 0o222 == 0
    assert pread(mnt, 0, MiB) == before


def test_growable_grows_and_truncates(fuse, tmp_path):
    image = make_raw(tmp_path / "disk.raw", size=4 * MiB)
    d, mnt = fuse.start(image, export="writable=on,growable=on")
    data = os.urandom(100000)
    pwrite(mnt, 6 * MiB + 3, data)
    assert os.stat(mnt).st_size == 6 * MiB + 3 + len(data)
    assert os.stat(image).st_size == 6 * MiB + 3 + len(data)
    assert pread(mnt, 4 * MiB, 2 * MiB + 3) == bytes(2 * MiB + 3)  # the gap reads as zeroes
    assert pread(image, 6 * MiB + 3, len(data)) == data
    os.truncate(mnt, 2 * MiB)
    assert os.stat(mnt).st_size == 2 * MiB and os.stat(image).st_size == 2 * MiB
    with open(mnt, "ab") as f:  # appending grows it too
        f.write(b"tail")
    assert os.stat(mnt).st_size == 2 * MiB + 4
    fallocate(mnt, 0, 3 * MiB, MiB)  # allocating past the end grows it
    assert os.stat(mnt).st_size == 4 * MiB
    assert same_content(mnt, image)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_mounted_over_its_own_image_file(fuse, tmp_path, fmt):
    """QEMU's usual set-up: the mountpoint is the image file itself.  Growing it
    (a raw write past the end; qcow2 allocating clusters) must not reopen the
    file by its name, which now leads into our own mount."""
    if fmt == "raw":
        image = make_raw(tmp_path / "disk.img", size=4 * MiB)
        export = "writable=on,growable=on"
    else:
        image = tmp_path / "disk.img"
        run(["qemu-img", "create", "-f", "qcow2", image, str(8 * MiB)])
        export = "writable=on"
    d, mnt = fuse.start(image, fmt=fmt, export=export, name="disk.img")
    assert mnt == image
    data = os.urandom(3 * MiB + 5)
    pwrite(mnt, 5 * MiB if fmt == "raw" else MiB, data)
    assert pread(mnt, 5 * MiB if fmt == "raw" else MiB, len(data)) == data
    d.stop()
    assert not is_mounted(image)
    if fmt == "raw":
        assert os.path.getsize(image) == 8 * MiB + 5
        assert pread(image, 5 * MiB, len(data)) == data
    else:
        run(["qemu-img", "check", image])
        out = tmp_path / "out.raw"
        run(["qemu-img", "convert", "-O", "raw", image, out])
        assert pread(out, MiB, len(data)) == data


def test_fixed_size_refuses_resize(fuse, raw):
    d, mnt = fuse.start(raw)
    with pytest.raises(OSError) as e:
        os.truncate(mnt, 32 * MiB)
    assert e.value.errno == errno.EPERM
    os.truncate(mnt, 64 * MiB)  # to its own size: nothing to refuse
    fd = os.open(mnt, os.O_WRONLY)
    try:
        # A write across the end is cut short; one past the end gets ENOSPC, as on a block device.
        assert os.pwrite(fd, b"x" * 8192, 64 * MiB - 4096) == 4096
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, 64 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(mnt).st_size == 64 * MiB and os.stat(raw).st_size == 64 * MiB


WRITER = r"""
import os, sys
path, chunk = sys.argv[1], 256 * 1024
fd = os.open(path, os.O_WRONLY)
i = 0
while True:
    os.pwrite(fd, bytes([i % 251 + 1]) * chunk, (8 << 20) + i * chunk)
    os.fsync(fd)
    print(i, flush=True)          # chunk i is durable
    os.pwrite(fd, b"\xee" * chunk, (8 << 20) + (i + 1) * chunk)  # in flight when killed, maybe
    i += 1
"""


def test_killed_writer_loses_nothing_fsynced(fuse, raw):
    d, mnt = fuse.start(raw)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(24):
            line = p.stdout.readline()
            assert line, "writer died"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=20)
        done = int(line)
        for rest in p.stdout:  # chunks reported before the kill landed
            done = max(done, int(rest))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    chunk = 256 * 1024
    for i in range(done + 1):
        assert pread(raw, 8 * MiB + i * chunk, chunk) == bytes([i % 251 + 1]) * chunk, i
    # The export still serves, and the image matches what it shows.
    assert same_content(mnt, raw)
    d.stop()
    for i in range(done + 1):
        assert pread(raw, 8 * MiB + i * chunk, 16) == bytes([i % 251 + 1]) * 16


def test_parallel_requests(fuse, raw):
    """Many requests are in flight at once: a QD32 reader sees the export's in-flight high-water mark rise."""
    if not have("fio"):
        pytest.skip("needs fio")
    d, mnt = fuse.start(raw, extra=["--object", "iothread,id=io0"], export="writable=on,iothread=io0")
    run(["fio", "--name=q", f"--filename={mnt}", "--ioengine=io_uring", "--iodepth=32", "--rw=randread",
         "--bs=4k", "--size=8M", "--direct=1", "--io_size=16M", "--output-format=json"])
    stats = d.qmp("query-stats", target="export")["exports"][0]
    assert stats["ops"]["read"]["ops"] >= 4096 and stats["ops"]["read"]["errors"] == 0
    assert stats["max-in-flight"] > 1, stats
