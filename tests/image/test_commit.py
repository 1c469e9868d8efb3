# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk commit, cross-checked with qemu-img compare / check / map."""
import pytest


@pytest.fixture
def chain(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "16M")
    qemu_io("base.qcow2", "write -P 0xaa 0 4M", "write -P 0xab 12M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xbb 1M 1M", "write -z 3M 64k", "write -P 0xbc 8M 200k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "expected.raw")


def top_allocated(qemu_img, path):
    return [e for e in qemu_img("map", "--output=json", path).json() if e["depth"] == 0 and e["present"]]


def test_commit_into_backing(vdisk, qemu_img, chain, qcow2_write):
    r = vdisk("commit", "top.qcow2", check=0)
    assert r.out == "Image committed.\n"
    qemu_img("check", "base.qcow2")
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "base.qcow2", "expected.raw")
    qemu_img("compare", "top.qcow2", "expected.raw")
    assert top_allocated(qemu_img, "top.qcow2") == []  # emptied


def test_commit_empties_top_keeping_snapshots(vdisk, qemu_img, chain, qcow2_write, tmp_path):
    # As qemu-img commit: the top is emptied by dropping its clusters, its
    # header, backing link and internal snapshots stay (no truncation).
    qemu_img("snapshot", "-c", "snap", "top.qcow2")
    vdisk("commit", "top.qcow2", check=0)
    qemu_img("check", "base.qcow2")
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "base.qcow2", "expected.raw")
    qemu_img("compare", "top.qcow2", "expected.raw")
    assert top_allocated(qemu_img, "top.qcow2") == []
    info = qemu_img("info", "--output=json", "top.qcow2").json()
    assert info["backing-filename"] == "base.qcow2" and info["full-backing-filename"].endswith("base.qcow2")
    assert [sn["name"] for sn in info["snapshots"]] == ["snap"]
    # The snapshot still holds the overlay's data: applied, the top reads as before.
    qemu_img("snapshot", "-a", "snap", "top.qcow2")
    qemu_img("check", "top.qcow2")
    qemu_img("compare", "top.qcow2", "expected.raw")


def test_commit_drop_keeps_top(vdisk, qemu_img, chain, qcow2_write):
    before = top_allocated(qemu_img, "top.qcow2")
    vdisk("commit", "-d", "top.qcow2", check=0)
    qemu_img("check", "base.qcow2")
    qemu_img("compare", "base.qcow2", "expected.raw")
    qemu_img("compare", "top.qcow2", "expected.raw")
    assert top_allocated(qemu_img, "top.qcow2") == before


def test_commit_grows_base(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    qemu_io("base.qcow2", "write -P 1 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "8M")
    qemu_io("top.qcow2", "write -P 2 6M 64k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "expected.raw")
    vdisk("commit", "top.qcow2", check=0)
    qemu_img("check", "base.qcow2")
    assert qemu_img("info", "--output=json", "base.qcow2").json()["virtual-size"] == 8 << 20
    qemu_img("compare", "base.qcow2", "expected.raw")


def test_commit_to_base_of_three(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    qemu_io("base.qcow2", "write -P 1 0 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    qemu_io("mid.qcow2", "write -P 2 1M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 3 1536k 1M", "write -z 5M 64k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "expected.raw")
    before = top_allocated(qemu_img, "top.qcow2")
    vdisk("commit", "-b", "base.qcow2", "top.qcow2", check=0)
    qemu_img("check", "base.qcow2")
    qemu_img("compare", "base.qcow2", "expected.raw")
    assert top_allocated(qemu_img, "top.qcow2") == before  # -b implies -d


def test_commit_errors(vdisk, qemu_img, chain, qcow2_read):
    r = vdisk("commit", "base.qcow2")
    assert r.rc == 1 and "does not have a backing file" in r.err
    r = vdisk("commit", "-b", "other.qcow2", "top.qcow2")
    assert r.rc == 1 and "Did not find 'other.qcow2'" in r.err
    r = vdisk("commit", "missing.qcow2")
    assert r.rc == 1 and r.err.startswith("vdisk commit: Could not open 'missing.qcow2'")
