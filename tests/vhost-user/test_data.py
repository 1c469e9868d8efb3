# SPDX-License-Identifier: LGPL-2.1-or-later
"""Data integrity against qemu-storage-daemon, cross-checked with the file itself and qemu-io."""
import shutil

import pytest

from conftest import MiB, allocated, pattern, run


def test_pattern_qd32_matches_file(qsd, image, client):
    img = image(64 * MiB)
    b = qsd(img)
    p = client(b, "pattern", "11", "8", "32", "32")
    assert "32 MiB at QD32 verified" in p.stdout
    assert b.stop() == ""
    data = img.read_bytes()
    assert data[8 * MiB:40 * MiB] == pattern(8 * MiB, 32 * MiB, 11)
    assert data[:8 * MiB] == bytes(8 * MiB) and data[40 * MiB:] == bytes(24 * MiB)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="missing qemu-io")
def test_qemu_io_writes_we_read_and_vice_versa(qsd, image, io):
    img = image(32 * MiB)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x6b 1M 3M", "-c", "write -P 0x11 7M 64k", str(img)], check=0)
    b = qsd(img)
    io(b, "read -P 0x6b 1m 3m", "read -v -P 0x11 7m 64k", "read -P 0 0 1m",
       "write -P 0x3c 16m 2m", "write -v -P 0x4d 20m 96k", "flush")
    b.stop()
    p = run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 16M 2M", "-c", "read -P 0x4d 20M 96k",
             "-c", "read -P 0x6b 1M 3M", str(img)], check=0)
    assert "Pattern verification failed" not in p.stdout


def test_vectored_and_fua(qsd, image, io):
    img = image(16 * MiB)
    b = qsd(img)
    io(b, "write -v -P 0x21 0 12k", "write -v -F -P 0x22 64k 1m", "write -F -P 0x23 4m 4k",
       "read -v -P 0x21 0 12k", "read -v -P 0x22 64k 1m", "read -P 0x23 4m 4k", "flush")
    b.stop()
    data = img.read_bytes()
    assert data[:12288] == b"\x21" * 12288
    assert data[65536:65536 + MiB] == b"\x22" * MiB
    assert data[4 * MiB:4 * MiB + 4096] == b"\x23" * 4096


def test_many_requests_in_flight(qsd, image, io):
    b = qsd(image(16 * MiB))
    io(b, "aio-write -P 0x77 0 4k 1000", "aio-read -P 0x77 0 4k 1000", extra=["--iodepth", "64"])


def test_discard_punches_holes(qsd, image, io):
    img = image(64 * MiB)
    b = qsd(img, blockdev_opts="discard=unmap")
    # 40 MiB: more than QEMU's max_discard_sectors, so the driver splits it.
    io(b, "write -P 1 0 48m", "discard 4m 40m", "read -P 1 0 4m", "read -P 0 4m 40m", "read -P 1 44m 4m")
    b.stop()
    assert allocated(img, 4 * MiB, 40 * MiB) == 0
    assert allocated(img, 0, 4 * MiB) == 4 * MiB


def test_unaligned_discard_shrinks(qsd, image, io):
    img = image(8 * MiB)
    b = qsd(img, blockdev_opts="discard=unmap")
    io(b, "write -P 1 0 2m",
       "discard 100 400", "read -P 1 0 4k",                        # no whole sector inside: nothing
       "discard 1 4095", "read -P 1 0 512", "read -P 0 512 3584")  # only [512, 4096) goes


def test_write_zeroes_unmap_and_no_unmap(qsd, image, io):
    img = image(64 * MiB)
    b = qsd(img, blockdev_opts="discard=unmap")
    io(b, "write -P 9 0 64m",
       "zero 0 40m",        # may unmap: split in pieces, reads back zeroes
       "zero -u 40m 8m",    # NO_UNMAP: stays allocated
       "zero -n -F 48m 8m",  # NO_FALLBACK + FUA: the back-end zeroes natively
       "read -P 0 0 56m", "read -P 9 56m 8m")
    b.stop()
    assert allocated(img, 0, 40 * MiB) == 0
    assert allocated(img, 40 * MiB, 8 * MiB) == 8 * MiB
    assert img.read_bytes()[:56 * MiB] == bytes(56 * MiB)


def test_write_zeroes_misaligned(qsd, image, io):
    b = qsd(image(8 * MiB))
    p = io(b, "zero 100 4096", check=1)
    assert "request-alignment" in p.stderr


def test_flush_and_read_only_instance(qsd, image, io):
    b = qsd(image(8 * MiB))
    io(b, "flush", "write -P 5 0 4k", "flush")
    io(b, "read -P 5 0 4k", "flush", extra=["--read-only"], check=1)  # flush is a write: -EBADF
    io(b, "read -P 5 0 4k", extra=["--read-only"])


def test_two_queues_two_threads(qsd, image, client):
    img = image(64 * MiB)
    b = qsd(img, num_queues=2)
    p = client(b, "--queues", "2", "multiq", "16")
    assert "2 queues verified" in p.stdout
    b.stop()
    data = img.read_bytes()
    assert data[:16 * MiB] == pattern(0, 16 * MiB, 100)
    assert data[16 * MiB:32 * MiB] == pattern(16 * MiB, 16 * MiB, 101)


def test_poll_queues(qsd, image, client):
    b = qsd(image(64 * MiB), num_queues=4)
    p = client(b, "--queues", "2", "--poll-queues", "2", "multiq", "8")
    assert "4 queues verified" in p.stdout


def test_null_backend(qsd, client, io):
    b = qsd(null=True, size=1 << 30, num_queues=2)
    io(b, "aio-read -P 0 0 4k 500", "aio-write -P 1 1m 64k 100", "zero 0 1g", "discard 0 1g")
    p = client(b, "pattern", "1", "0", "1", "4", check=1)  # null-co drops writes: the check sees zeroes
    assert "mismatch" in p.stderr


def test_regions_mapped_before_start(qsd, image, client):
    b = qsd(image(16 * MiB))
    p = client(b, "--map-before-start", "pattern", "3", "0", "4", "16")
    assert "mapped a region before start" in p.stdout and "verified" in p.stdout


def test_set_mem_table_fallback(qsd, image, io, client, vdisk_tool):
    """mem-slots=false: every map/unmap re-sends the whole table (SET_MEM_TABLE, 8 regions)."""
    img = image(64 * MiB)
    b = qsd(img, num_queues=2)
    sets = ("--set", "mem-slots=false")
    i = dict(l.split("=", 1) for l in io(b, "info", extra=sets).stdout.splitlines() if "=" in l)
    assert i["max-mem-regions"] == "7" and i["mem-slots"] == "false"
    io(b, "write -P 1 0 1m", "write -v -P 2 2m 12k", "zero 4m 1m", "read -P 1 0 1m", "read -v -P 2 2m 12k",
       "read -P 0 4m 1m", extra=sets)
    p = client(b, *sets, "regions")
    assert "region 8:" in p.stdout and "remapped after unmapping all" in p.stdout
    p = client(b, *sets, "--queues", "2", "--map-before-start", "multiq", "8")
    assert "2 queues verified" in p.stdout
    run([vdisk_tool, "bench", "--driver=virtio-blk-vhost-user", f"--path={b.sock}", "--set", "mem-slots=false",
         "--iodepth=8", "--runtime=200ms"], check=0)


@pytest.mark.parametrize("indirect", ["true", "false"])
def test_write_zeroes_fallback_without_the_feature(qsd, image, io, indirect):
    """write-zeroes=false: zeroes are written from the shared zero buffer (allocated, even without NO_UNMAP)."""
    img = image(64 * MiB)
    b = qsd(img, blockdev_opts="discard=unmap")
    sets = ("--set", "write-zeroes=false", "--set", f"indirect-desc={indirect}")
    i = dict(l.split("=", 1) for l in io(b, "info", extra=sets).stdout.splitlines() if "=" in l)
    assert i["can-write-zeroes"] == "false"
    io(b, "write -P 3 0 8m", "zero 512 3m", "zero -F 4m 1536", "read -P 3 0 512", "read -P 0 512 3m",
       f"read -P 3 {3 * MiB + 512} {MiB - 512}", "read -P 0 4m 1536", f"read -P 3 {4 * MiB + 1536} 4096",
       extra=sets)
    p = io(b, "zero -n 0 4k", extra=sets, check=1)
    assert "NO_FALLBACK" in p.stderr
    b.stop()
    assert allocated(img, 0, 8 * MiB) == 8 * MiB
    assert img.read_bytes()[512:512 + 3 * MiB] == bytes(3 * MiB)


def test_discard_switched_off(qsd, image, io):
    b = qsd(image(16 * MiB))
    p = io(b, "discard 0 1m", extra=("--set", "discard=false"), check=1)
    assert "VIRTIO_BLK_F_DISCARD" in p.stderr


def test_waiting_client_sleeps(qsd, vdisk_tool):
    """A client waiting for slow completions sleeps: the back-end sets O_NONBLOCK on the call eventfd
    it shares with us, so a reap that slept in read() would spin on EAGAIN at 100% CPU."""
    b = qsd(null=True, blockdev_opts="latency-ns=2000000")
    p = run([vdisk_tool, "bench", "--driver=virtio-blk-vhost-user", f"--path={b.sock}", "--rw=randread",
             "--iodepth=1", "--runtime=1s"], check=0)
    cpu = float(next(l for l in p.stdout.splitlines() if l.strip().startswith("cpu")).split(":")[1].split("%")[0])
    assert cpu < 30, p.stdout
