# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk resize: grow / shrink, absolute and relative, cross-checked with qemu-img."""
import pytest


def vsize(qemu_img, path):
    return qemu_img("info", "--output=json", path).json()["virtual-size"]


def test_resize_raw(vdisk, qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "4M")
    qemu_io("a.raw", "write -P 5 0 1M", fmt="raw")
    r = vdisk("resize", "a.raw", "8M", check=0)
    assert r.out == "Image resized.\n"
    assert vsize(qemu_img, "a.raw") == 8 << 20
    vdisk("resize", "a.raw", "+1M", check=0)
    assert vsize(qemu_img, "a.raw") == 9 << 20
    r = vdisk("resize", "a.raw", "2M")
    assert r.rc == 1
    assert "--shrink" in r.err
    assert vsize(qemu_img, "a.raw") == 9 << 20
    vdisk("resize", "--shrink", "a.raw", "-7M", check=0)
    assert vsize(qemu_img, "a.raw") == 2 << 20
    qemu_io("a.raw", "read -P 5 0 1M", fmt="raw")


def test_resize_qcow2_grow_shrink(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "q.qcow2", "16M")
    qemu_io("q.qcow2", "write -P 6 0 1M", "write -P 7 15M 1M")
    vdisk("resize", "-f", "qcow2", "q.qcow2", "+48M", check=0)
    qemu_img("check", "q.qcow2")
    assert vsize(qemu_img, "q.qcow2") == 64 << 20
    qemu_io("q.qcow2", "read -P 6 0 1M", "read -P 7 15M 1M", "read -P 0 16M 48M")
    vdisk("resize", "--shrink", "q.qcow2", "8M", check=0)
    qemu_img("check", "q.qcow2")
    assert vsize(qemu_img, "q.qcow2") == 8 << 20
    qemu_io("q.qcow2", "read -P 6 0 1M")


def test_resize_qcow2_preallocation(vdisk, qemu_img, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "p.qcow2", "1M")
    vdisk("resize", "--preallocation=metadata", "p.qcow2", "4M", check=0)
    qemu_img("check", "p.qcow2")
    assert vsize(qemu_img, "p.qcow2") == 4 << 20
    r = vdisk("resize", "--preallocation=full", "p.qcow2", "2M")
    assert r.rc == 1 and "only be used for growing" in r.err


@pytest.mark.parametrize("args,msg,rc", [
    (["a.raw"], "Expecting image file name and size", 2),
    (["a.raw", "1Q"], "Invalid image size", 2),
    (["--shrink", "a.raw", "-4M"], "must be positive", 1),
    (["--preallocation=bogus", "a.raw", "8M"], "Invalid preallocation mode", 2),
    (["missing.raw", "8M"], "Could not open 'missing.raw'", 1),
])
def test_resize_errors(vdisk, qemu_img, args, msg, rc):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "4M")
    r = vdisk("resize", *args)
    assert r.rc == rc, r
    assert r.err.startswith("vdisk resize: ")
    assert msg in r.err
