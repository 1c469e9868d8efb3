# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk check: qemu-img's JSON keys and exit statuses (0 / 2 corrupt / 3 leaks / 63 / 1)."""
import qcow2util

KEYS = ["image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
        "compressed-clusters", "check-errors", "leaks", "corruptions", "leaks-fixed", "corruptions-fixed",
        "filename", "format"]


def assert_same(ours, theirs):
    for key in KEYS:
        assert ours.get(key) == theirs.get(key), "key %s: vdisk %r, qemu-img %r" % (key, ours.get(key),
                                                                                   theirs.get(key))


def test_check_raw_not_supported(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "1M")
    r = vdisk("check", "a.raw")
    assert r.rc == 63
    assert "vdisk check: This image format does not support checks" in r.err


def test_check_clean_qcow2(vdisk, qemu_img, qemu_io, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "c.qcow2", "64M")
    qemu_io("c.qcow2", "write -P 1 0 1M", "write -P 2 10M 64k", "write -z 20M 64k")
    r = vdisk("check", "--output=json", "c.qcow2", check=0)
    assert_same(r.json(), qemu_img("check", "--output=json", "c.qcow2").json())
    r = vdisk("check", "c.qcow2", check=0)
    assert r.out == qemu_img("check", "c.qcow2").out


def test_check_compressed_counts(vdisk, qemu_img, qemu_io, qcow2_read):
    qemu_img("create", "-q", "-f", "raw", "src.raw", "4M")
    qemu_io("src.raw", "write -P 0x5a 0 2M", fmt="raw")
    qemu_img("convert", "-c", "-O", "qcow2", "src.raw", "z.qcow2")
    ours = vdisk("check", "--output=json", "z.qcow2", check=0).json()
    theirs = qemu_img("check", "--output=json", "z.qcow2").json()
    assert_same(ours, theirs)
    assert ours["compressed-clusters"] > 0


def make_leak(qemu_img, qemu_io, path):
    """Data cluster whose L2 entry is cleared: still refcounted, referenced by nothing."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    qemu_io(str(path), "write -P 7 0 64k", "write -P 8 1M 64k")
    qcow2util.write_u64(path, qcow2util.l2_entry_addr(path, 1 << 20), 0)


def test_check_leaks(vdisk, qemu_img, qemu_io, tmp_path, qcow2_read):
    make_leak(qemu_img, qemu_io, tmp_path / "l.qcow2")
    theirs = qemu_img("check", "--output=json", "l.qcow2", check=3).json()
    r = vdisk("check", "--output=json", "l.qcow2")
    assert r.rc == 3, r
    assert_same(r.json(), theirs)
    assert r.json()["leaks"] == 1
    r = vdisk("check", "l.qcow2")
    assert r.rc == 3
    assert "1 leaked clusters were found on the image." in r.out


def test_check_repair_leaks(vdisk, qemu_img, qemu_io, tmp_path, qcow2_write):
    make_leak(qemu_img, qemu_io, tmp_path / "l.qcow2")
    r = vdisk("check", "-r", "leaks", "l.qcow2")
    assert r.rc == 0, r
    assert "The following inconsistencies were found and repaired" in r.out
    assert "1 leaked clusters" in r.out
    qemu_img("check", "l.qcow2")
    make_leak(qemu_img, qemu_io, tmp_path / "l2.qcow2")
    r = vdisk("check", "-r", "all", "--output=json", "l2.qcow2")
    assert r.rc == 0, r
    assert r.json()["leaks-fixed"] == 1
    qemu_img("check", "l2.qcow2")


def make_corruption(qemu_img, qemu_io, path):
    """Two L2 entries pointing at the same data cluster (refcount 1): a corruption."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    qemu_io(str(path), "write -P 7 0 64k", "write -P 8 1M 64k")
    e0 = qcow2util.read_u64(path, qcow2util.l2_entry_addr(path, 0))
    qcow2util.write_u64(path, qcow2util.l2_entry_addr(path, 1 << 20), e0)


def test_check_corruption(vdisk, qemu_img, qemu_io, tmp_path, qcow2_read):
    make_corruption(qemu_img, qemu_io, tmp_path / "c.qcow2")
    theirs = qemu_img("check", "--output=json", "c.qcow2", check=2).json()
    r = vdisk("check", "--output=json", "c.qcow2")
    assert r.rc == 2, r
    ours = r.json()
    assert ours["corruptions"] >= 1
    assert ours["corruptions"] == theirs["corruptions"]
    r = vdisk("check", "c.qcow2")
    assert r.rc == 2
    assert "errors were found on the image" in r.out


def test_check_bad_repair_mode(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "1M")
    r = vdisk("check", "-r", "some", "a.raw")
    assert r.rc == 2
    assert "'leaks' or 'all'" in r.err


def test_check_missing_file(vdisk):
    r = vdisk("check", "nope.qcow2")
    assert r.rc == 1
    assert r.err.startswith("vdisk check: Could not open 'nope.qcow2'")


def test_check_corrupt_header(vdisk, qemu_img, tmp_path, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "h.qcow2", "1M")
    qcow2util.write_u32(tmp_path / "h.qcow2", 20, 99)  # cluster_bits
    r = vdisk("check", "-f", "qcow2", "h.qcow2")
    assert r.rc == 1, r
    assert r.err.startswith("vdisk check: ")
