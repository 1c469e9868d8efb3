# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk compare: qemu-img's messages and exit statuses (0 same, 1 differ, 2 error)."""
import pytest


@pytest.fixture
def pair(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "4M")
    qemu_io("a.raw", "write -P 0x11 0 64k", "write -P 0x22 2M 1M", fmt="raw")
    qemu_img("convert", "-O", "raw", "a.raw", "b.raw")


def test_compare_identical(vdisk, pair):
    r = vdisk("compare", "a.raw", "b.raw")
    assert r.rc == 0, r
    assert r.out == "Images are identical.\n"
    assert vdisk("compare", "-s", "-f", "raw", "-F", "raw", "a.raw", "b.raw").rc == 0


@pytest.mark.parametrize("write", ["write -P 0x99 3M 512", "write -P 0x99 2621440 1", "write -z 2M 4k",
                                   "write -P 0x99 3900k 4k"])
def test_compare_mismatch_offset_matches_qemu(vdisk, qemu_img, qemu_io, pair, write):
    qemu_io("b.raw", write, fmt="raw")
    r = vdisk("compare", "a.raw", "b.raw")
    theirs = qemu_img("compare", "a.raw", "b.raw", check=1)
    assert r.rc == 1, r
    assert r.out == theirs.out
    assert r.out.startswith("Content mismatch at offset ")


def test_compare_size_mismatch(vdisk, qemu_img, qemu_io, pair):
    qemu_img("create", "-q", "-f", "raw", "big.raw", "6M")
    qemu_img("convert", "-n", "-O", "raw", "a.raw", "big.raw")
    r = vdisk("compare", "a.raw", "big.raw")
    assert r.rc == 0, r
    assert r.out == "Warning: Image size mismatch!\nImages are identical.\n"
    r = vdisk("compare", "-s", "a.raw", "big.raw")
    assert r.rc == 1
    assert r.out == "Strict mode: Image size mismatch!\n"
    qemu_io("big.raw", "write -P 1 5M 512", fmt="raw")
    r = vdisk("compare", "a.raw", "big.raw")
    assert r.rc == 1
    assert r.out == qemu_img("compare", "a.raw", "big.raw", check=1).out


def test_compare_qcow2_vs_raw(vdisk, qemu_img, qemu_io, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    qemu_io("base.qcow2", "write -P 0xaa 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xbb 512k 64k", "write -z 768k 64k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "top.raw")
    r = vdisk("compare", "top.qcow2", "top.raw")
    assert r.rc == 0, r
    r = vdisk("compare", "base.qcow2", "top.qcow2")
    assert r.rc == 1
    assert r.out == qemu_img("compare", "base.qcow2", "top.qcow2", check=1).out


def test_compare_strict_allocation(vdisk, qemu_img, qemu_io, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "x.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "y.qcow2", "1M")
    qemu_io("y.qcow2", "write -P 0 0 64k")  # allocated zeroes: same content, different status
    assert vdisk("compare", "x.qcow2", "y.qcow2").rc == 0
    r = vdisk("compare", "-s", "x.qcow2", "y.qcow2")
    assert r.rc == 1
    assert "block status mismatch" in r.out


def test_compare_quiet_and_progress(vdisk, pair):
    r = vdisk("compare", "-q", "a.raw", "b.raw")
    assert r.rc == 0 and r.out == ""
    r = vdisk("compare", "-p", "a.raw", "b.raw")
    assert r.rc == 0 and "Images are identical." in r.out


def test_compare_errors(vdisk, pair):
    r = vdisk("compare", "a.raw", "missing.raw")
    assert r.rc == 2
    assert r.err.startswith("vdisk compare: Could not open 'missing.raw'")
    assert vdisk("compare", "a.raw").rc == 2
    assert vdisk("compare", "-f", "nosuch", "a.raw", "b.raw").rc == 2
