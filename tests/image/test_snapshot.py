# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk snapshot -c/-l/-a/-d, cross-checked with qemu-img snapshot -l."""


def names(qemu_img, path):
    out = qemu_img("snapshot", "-l", path).out.splitlines()
    return [line.split()[1] for line in out[2:]]


def test_snapshot_list_matches_qemu(vdisk, qemu_img, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "s.qcow2", "16M")
    assert vdisk("snapshot", "-l", "s.qcow2", check=0).out == ""
    qemu_img("snapshot", "-c", "first", "s.qcow2")
    qemu_img("snapshot", "-c", "second snap", "s.qcow2")
    assert vdisk("snapshot", "-l", "s.qcow2", check=0).out == qemu_img("snapshot", "-l", "s.qcow2").out
    assert vdisk("snapshot", "s.qcow2", check=0).out == qemu_img("snapshot", "-l", "s.qcow2").out


def test_snapshot_create_apply_delete(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "s.qcow2", "16M")
    qemu_io("s.qcow2", "write -P 0x11 0 1M")
    vdisk("snapshot", "-c", "before", "s.qcow2", check=0)
    qemu_img("check", "s.qcow2")
    assert names(qemu_img, "s.qcow2") == ["before"]
    assert vdisk("snapshot", "-l", "s.qcow2", check=0).out == qemu_img("snapshot", "-l", "s.qcow2").out

    qemu_io("s.qcow2", "write -P 0x22 0 512k", "write -P 0x33 8M 64k")
    vdisk("snapshot", "-c", "after", "s.qcow2", check=0)
    assert names(qemu_img, "s.qcow2") == ["before", "after"]

    vdisk("snapshot", "-a", "before", "s.qcow2", check=0)
    qemu_img("check", "s.qcow2")
    qemu_io("s.qcow2", "read -P 0x11 0 1M", "read -P 0 8M 64k")

    vdisk("snapshot", "-a", "after", "s.qcow2", check=0)
    qemu_io("s.qcow2", "read -P 0x22 0 512k", "read -P 0x11 512k 512k", "read -P 0x33 8M 64k")

    vdisk("snapshot", "-d", "before", "s.qcow2", check=0)
    qemu_img("check", "s.qcow2")
    assert names(qemu_img, "s.qcow2") == ["after"]
    qemu_io("s.qcow2", "read -P 0x22 0 512k")


def test_snapshot_qemu_made_applied_by_vdisk(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "s.qcow2", "4M")
    qemu_io("s.qcow2", "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "q", "s.qcow2")
    qemu_io("s.qcow2", "write -P 2 0 64k")
    vdisk("snapshot", "-a", "q", "s.qcow2", check=0)
    qemu_img("check", "s.qcow2")
    qemu_io("s.qcow2", "read -P 1 0 64k")
    vdisk("snapshot", "-d", "1", "s.qcow2", check=0)  # by id
    assert names(qemu_img, "s.qcow2") == []


def test_snapshot_errors(vdisk, qemu_img, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "s.qcow2", "4M")
    r = vdisk("snapshot", "-d", "nope", "s.qcow2")
    assert r.rc == 1 and "Could not delete snapshot 'nope': snapshot not found" in r.err
    r = vdisk("snapshot", "-a", "nope", "s.qcow2")
    assert r.rc == 1 and "Could not apply snapshot 'nope'" in r.err
    r = vdisk("snapshot", "-c", "x", "-d", "y", "s.qcow2")
    assert r.rc == 2 and "Cannot mix" in r.err
    qemu_img("create", "-q", "-f", "raw", "r.raw", "1M")
    r = vdisk("snapshot", "-c", "x", "r.raw")
    assert r.rc == 1 and r.err.startswith("vdisk snapshot: Could not create snapshot 'x'")
    r = vdisk("snapshot", "-l", "missing.qcow2")
    assert r.rc == 1
