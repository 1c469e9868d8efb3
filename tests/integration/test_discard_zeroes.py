# SPDX-License-Identifier: LGPL-2.1-or-later
"""Discard punches a hole (SEEK_HOLE/SEEK_DATA see it) that reads as zeroes;
write-zeroes reads as zeroes, and with NO_UNMAP the blocks stay allocated."""
import os

import pytest

from conftest import CONFIGS, CONFIG_IDS, MiB, qemu_io, vio

cfg = pytest.mark.parametrize("driver,direct", CONFIGS, ids=CONFIG_IDS)


def seek(path, off, whence):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, off, whence)
    except OSError:  # ENXIO: no data at or after off
        return None
    finally:
        os.close(fd)


def allocated(path):
    return os.stat(path).st_blocks * 512


def fill(img, driver, direct):
    """4 MiB of 0xaa, on stable storage and allocated."""
    vio(driver, img, "write -P 0xaa 0 4m", "flush", direct=direct)
    assert seek(img, 1 * MiB, os.SEEK_DATA) == 1 * MiB
    assert seek(img, 0, os.SEEK_HOLE) >= 4 * MiB


@cfg
def test_discard_makes_a_hole_that_reads_zero(img, driver, direct):
    fill(img, driver, direct)
    before = allocated(img)
    r = vio(driver, img, "discard 1m 1m", direct=direct)
    assert "discarded 1048576 bytes at offset 1048576" in r.text
    assert seek(img, 0, os.SEEK_HOLE) == 1 * MiB
    assert seek(img, 1 * MiB, os.SEEK_DATA) == 2 * MiB
    assert allocated(img) <= before - 1 * MiB
    vio(driver, img, "read -P 0 1m 1m", "read -P 0xaa 0 1m", "read -P 0xaa 2m 2m", direct=direct)
    qemu_io(img, "read -P 0 1m 1m", "read -P 0xaa 0 1m", "read -P 0xaa 2m 2m")
    assert os.path.getsize(img) == 8 * MiB


@cfg
def test_write_zeroes_reads_zero(img, driver, direct):
    fill(img, driver, direct)
    r = vio(driver, img, "zero 1m 1m", "zero -n 3m 512k", direct=direct)
    assert "zeroed 1048576 bytes at offset 1048576" in r.text
    vio(driver, img, "read -P 0 1m 1m", "read -P 0 3m 512k", "read -P 0xaa 0 1m", "read -P 0xaa 2m 1m",
        "read -P 0xaa 3584k 512k", direct=direct)
    qemu_io(img, "read -P 0 1m 1m", "read -P 0 3m 512k", "read -P 0xaa 0 1m", "read -P 0xaa 2m 1m")
    assert os.path.getsize(img) == 8 * MiB


@cfg
def test_write_zeroes_no_unmap_keeps_blocks_allocated(img, driver, direct):
    fill(img, driver, direct)
    # One MiB per flag combination, each checked on its own.
    for i, flags in enumerate(["-u", "-u -n", "-u -F"]):
        off = i * MiB
        before = allocated(img)
        vio(driver, img, f"zero {flags} {off} 1m", "flush", direct=direct)
        after = allocated(img)
        # Punching the range would free 1 MiB; allow a little metadata churn.
        assert after >= before - 128 * 1024, f"zero {flags} deallocated: {before} -> {after} bytes"
        vio(driver, img, f"read -P 0 {off} 1m", direct=direct)
    vio(driver, img, "read -P 0xaa 3m 1m", direct=direct)
    qemu_io(img, "read -P 0 0 3m", "read -P 0xaa 3m 1m")
