# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk rebase (safe and -u), cross-checked with qemu-img compare / info / check."""
import pytest


@pytest.fixture
def images(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "qcow2", "old.qcow2", "8M")
    qemu_io("old.qcow2", "write -P 0x0a 0 2M", "write -P 0x0b 6M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "new.qcow2", "8M")
    qemu_io("new.qcow2", "write -P 0x0a 0 1M", "write -P 0x0c 4M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0x0d 512k 64k", "write -P 0x0e 6M 64k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "expected.raw")


def backing(qemu_img, path):
    info = qemu_img("info", "--output=json", path).json()
    return info.get("backing-filename"), info.get("backing-filename-format")


def test_rebase_safe(vdisk, qemu_img, images, qcow2_write):
    r = vdisk("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")
    assert r.rc == 0, r
    assert backing(qemu_img, "top.qcow2") == ("new.qcow2", "qcow2")
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_rebase_safe_probes_format(vdisk, qemu_img, images, qcow2_write):
    vdisk("rebase", "-b", "new.qcow2", "top.qcow2", check=0)
    assert backing(qemu_img, "top.qcow2") == ("new.qcow2", "qcow2")
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_rebase_onto_raw_and_smaller(vdisk, qemu_img, qemu_io, images, qcow2_write):
    qemu_img("create", "-q", "-f", "raw", "small.raw", "3M")
    qemu_io("small.raw", "write -P 0x0a 0 3M", fmt="raw")
    vdisk("rebase", "-b", "small.raw", "-F", "raw", "top.qcow2", check=0)
    assert backing(qemu_img, "top.qcow2") == ("small.raw", "raw")
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_rebase_remove_backing(vdisk, qemu_img, images, qcow2_write):
    vdisk("rebase", "-b", "", "top.qcow2", check=0)
    assert backing(qemu_img, "top.qcow2") == (None, None)
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_rebase_unsafe_only_rewrites_header(vdisk, qemu_img, images, tmp_path, qcow2_write):
    before = qemu_img("map", "--output=json", "top.qcow2").json()
    vdisk("rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", check=0)
    assert backing(qemu_img, "top.qcow2") == ("new.qcow2", "qcow2")
    qemu_img("check", "top.qcow2")
    after = qemu_img("map", "--output=json", "top.qcow2").json()
    assert [e for e in after if e["depth"] == 0] == [e for e in before if e["depth"] == 0]
    # the content now comes from new.qcow2: it differs from before
    assert qemu_img("compare", "top.qcow2", "expected.raw", check=None).rc == 1


def test_rebase_unsafe_fixes_moved_backing(vdisk, qemu_img, images, tmp_path, qcow2_write):
    (tmp_path / "old.qcow2").rename(tmp_path / "moved.qcow2")
    vdisk("rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", "top.qcow2", check=0)
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_rebase_errors(vdisk, qemu_img, images, qcow2_read):
    r = vdisk("rebase", "top.qcow2")
    assert r.rc == 2 and "Must specify backing file" in r.err
    r = vdisk("rebase", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2")
    assert r.rc == 1 and r.err.startswith("vdisk rebase: ")
    assert backing(qemu_img, "top.qcow2") == ("old.qcow2", "qcow2")  # unchanged
    r = vdisk("rebase", "-b", "new.qcow2", "-F", "nosuch", "top.qcow2")
    assert r.rc == 1 and "nosuch" in r.err
    r = vdisk("rebase", "-u", "-b", "missing.qcow2", "top.qcow2")
    assert r.rc == 1 and "backing format must be specified" in r.err
