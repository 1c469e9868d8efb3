# SPDX-License-Identifier: LGPL-2.1-or-later
"""Data integrity in both directions, checked by real peers (qemu-io, nbdcopy, the image file)."""
import os
import subprocess

from conftest import check_sanitizers, on, requires, run


def qemu_io(server, *cmds, check=0):
    args = ["qemu-io", "-f", "raw", server.uri]
    for c in cmds:
        args += ["-c", c]
    p = run(args, check=check)
    assert "verification failed" not in p.stdout, p.stdout
    return p


@requires("qemu-nbd", "qemu-io")
def test_our_writes_read_by_qemu_io_and_in_file(tmp_path, qemu_nbd, io):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 << 20))
    s = qemu_nbd(img)
    io(on(s), "write -P 0xab 0 64k", "write -v -P 0xcd 1m 192k", "write -F -P 0xef 2m 4k", "flush")
    qemu_io(s, "read -P 0xab 0 64k", "read -P 0xcd 1m 192k", "read -P 0xef 2m 4k", "read -P 0 64k 960k")
    data = img.read_bytes()
    assert data[:65536] == b"\xab" * 65536
    assert data[1 << 20:(1 << 20) + 196608] == b"\xcd" * 196608


@requires("qemu-nbd", "qemu-io")
def test_qemu_io_writes_read_by_us(tmp_path, qemu_nbd, io):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 << 20))
    s = qemu_nbd(img)
    qemu_io(s, "write -P 0x3c 512k 256k", "write -P 0x77 3m 4k")
    io(on(s), "read -P 0x3c 512k 256k", "read -v -P 0x3c 512k 96k", "read -P 0x77 3m 4k", "read -P 0 0 512k")


def dump(vdisk_io, server, offset, length, iovecs=False):
    """Bytes read by us (vdisk-io dump), as bytes."""
    cmd = f"dump {'-v ' if iovecs else ''}{offset} {length}"
    p = subprocess.run([str(vdisk_io), "--driver=nbd", "--path", server.sock, "-c", cmd],
                       capture_output=True, timeout=60)
    check_sanitizers("vdisk-io dump", p.stderr.decode(errors="replace"))
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout


@requires("nbdcopy")
def test_random_data_round_trip(tmp_path, nbdkit, vdisk_io):
    """Random bytes: nbdcopy writes, we read; we write (-s file, also as iovecs), nbdcopy reads."""
    a = os.urandom(8 << 20)
    b = os.urandom(8 << 20)
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    s = nbdkit("memory", "16M")
    run(["nbdcopy", tmp_path / "a.bin", s.uri], check=0)
    assert dump(vdisk_io, s, 0, "8m") == a
    assert dump(vdisk_io, s, "1m", "3m", iovecs=True) == a[1 << 20:4 << 20]
    run([vdisk_io, "--driver=nbd", "--path", s.sock, "-c", f"write -s {tmp_path / 'b.bin'} 8m 8m",
         "-c", f"write -v -s {tmp_path / 'b.bin'} 0 3m"], check=0)
    run(["nbdcopy", s.uri, tmp_path / "back.bin"], check=0)
    back = (tmp_path / "back.bin").read_bytes()
    assert back[8 << 20:] == b
    assert back[:3 << 20] == b[:3 << 20]
    assert back[3 << 20:8 << 20] == a[3 << 20:8 << 20]


def test_iovec_bounce_read_and_write(nbdkit, io):
    """Several iovecs go through a bounce buffer; vdisk-io checks nothing outside them is touched."""
    s = nbdkit("memory", "8M")
    io(on(s), "write -v -P 0x21 0 96k", "read -P 0x21 0 96k", "write -P 0x22 1m 1m", "read -v -P 0x22 1m 1m",
       "read -v -P 0x21 0 96k")


def test_many_requests_in_flight(nbdkit, io):
    s = nbdkit("memory", "64M")
    io(on(s), "aio-write -P 0x61 0 64k 256", "aio-read -P 0x61 0 64k 256", extra=["--iodepth", "64"])
    io(on(s), "aio-write -P 0x62 0 4k 1000", "aio-read -P 0x62 0 4k 1000", extra=["--queue-size", "16"])


def test_max_size_transfers(nbdkit, io):
    s = nbdkit("memory", "64M")
    io(on(s), "write -P 0x33 0 32m", "read -P 0x33 0 32m", "write -v -P 0x34 32m 32m", "read -v -P 0x34 32m 32m")


def test_zero_length_requests_succeed(nbdkit, io):
    s = nbdkit("memory", "1M")
    io(on(s), "write -P 1 0 0", "read -P 1 0 0", "discard 0 0", "zero 0 0")
