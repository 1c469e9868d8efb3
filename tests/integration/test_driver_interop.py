# SPDX-License-Identifier: LGPL-2.1-or-later
"""Every file driver, with and without O_DIRECT, agrees byte for byte with
another driver and with QEMU (qemu-io / qemu-img on the raw file)."""
import os
import shutil

import pytest

from conftest import (CONFIGS, CONFIG_IDS, KiB, MiB, file_bytes, other_driver, qemu_io, run, vio)

cfg = pytest.mark.parametrize("driver,direct", CONFIGS, ids=CONFIG_IDS)


def test_oracles_detect_a_mismatch(img):
    """The checks below mean something: both readers fail on wrong data."""
    vio("sync", img, "write -P 0xab 0 64k")
    r = vio("sync", img, "read -P 0xac 0 64k", expect_rc=1)
    assert "Pattern verification failed at offset 0" in r.err
    r = vio("sync", img, "read -P 0xab 0 68k", expect_rc=1)
    assert "Pattern verification failed at offset 65536" in r.err
    r = qemu_io(img, "read -P 0xac 0 64k", expect_rc=1)
    assert "Pattern verification failed" in r.text + r.err


@cfg
def test_written_data_verifies_through_other_driver_and_qemu(img, driver, direct):
    vio(driver, img, "write -P 0xab 0 64k", "write -F -P 0xcd 1m 128k", "write -P 0xef 8188k 4k",
        direct=direct)
    vio(other_driver(driver), img, "read -P 0xab 0 64k", "read -P 0xcd 1m 128k",
        "read -P 0 64k 960k", "read -P 0xef 8188k 4k")
    qemu_io(img, "read -P 0xab 0 64k", "read -P 0xcd 1m 128k", "read -P 0 64k 960k",
            "read -P 0 1152k 7036k", "read -P 0xef 8188k 4k")
    assert os.path.getsize(img) == 8 * MiB


@cfg
def test_qemu_written_data_verifies_through_driver(img, driver, direct):
    qemu_io(img, "write -P 0x5c 256k 192k", "write -P 0x3e 2m 4k")
    vio(driver, img, "read -P 0x5c 256k 192k", "read -P 0x3e 2m 4k", "read -P 0 0 256k",
        "read -P 0 448k 64k", direct=direct)
    # And a mismatch is caught through this driver too.
    r = vio(driver, img, "read -P 0x5c 256k 196k", direct=direct, expect_rc=1)
    assert "Pattern verification failed at offset 458752" in r.err


@cfg
@pytest.mark.parametrize("vectored", [False, True], ids=["single", "vectored"])
def test_random_data_round_trip(img, tmp_path, driver, direct, vectored):
    """Position-dependent data catches misplaced segments and offsets."""
    v = "-v " if vectored else ""
    src = tmp_path / "src.bin"
    data = os.urandom(192 * KiB)
    src.write_bytes(data)
    off = 1536 * KiB
    vio(driver, img, f"write {v}-s {src} {off} {len(data)}", direct=direct)
    assert file_bytes(img, off, len(data)) == data
    # Through this driver (vectored read into separate buffers), another driver, and qemu-img.
    vio(driver, img, f"read {v}-s {src} {off} {len(data)}", direct=direct)
    dump = vio(other_driver(driver), img, f"dump {v}{off} {len(data)}").out
    assert dump == data
    ref = tmp_path / "ref.img"
    with open(ref, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(off)
        f.write(data)
    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        run([qemu_img, "compare", "-q", "-f", "raw", "-F", "raw", ref, img], expect_rc=0)


@cfg
def test_qemu_written_random_data_reads_back(img, tmp_path, driver, direct):
    src = tmp_path / "src.bin"
    data = os.urandom(64 * KiB)
    src.write_bytes(data)
    qemu_io(img, f"write -s {src} 3m 64k")
    vio(driver, img, f"read -v -s {src} 3m 64k", "read -s " + str(src) + " 3m 64k", direct=direct)
    assert vio(driver, img, "dump 3m 64k", direct=direct).out == data
    assert vio(driver, img, "dump -v 3m 64k", direct=direct).out == data


@cfg
def test_flush_and_fua_succeed(img, driver, direct):
    r = vio(driver, img, "write -F -P 0x11 0 4k", "flush", "zero -F 4k 4k", "write -P 0x12 8k 4k", "flush",
            direct=direct)
    assert "flushed" in r.text
    qemu_io(img, "read -P 0x11 0 4k", "read -P 0 4k 4k", "read -P 0x12 8k 4k")


@cfg
def test_more_requests_than_queue_size(img, driver, direct):
    vio(driver, img, "aio-write -P 0x77 0 4k 300", "aio-read -P 0x77 0 4k 300", direct=direct,
        queue_size=4, iodepth=3)
    vio(other_driver(driver), img, "read -P 0x77 0 1200k", "read -P 0 1200k 64k")
    qemu_io(img, "read -P 0x77 0 1200k")


@cfg
def test_mapped_memory_regions(img, driver, direct):
    """--map: buffers are registered with vdisk_map_mem_region (io_uring fixed buffers)."""
    vio(driver, img, "write -P 0x66 64k 256k", "write -v -P 0x67 512k 96k", "read -P 0x66 64k 256k",
        "read -v -P 0x67 512k 96k", direct=direct, map_mem=True)
    qemu_io(img, "read -P 0x66 64k 256k", "read -P 0x67 512k 96k")


@cfg
def test_large_request(img, driver, direct):
    vio(driver, img, "write -P 0x21 0 8m", "read -P 0x21 0 8m", direct=direct)
    qemu_io(img, "read -P 0x21 0 8m")
