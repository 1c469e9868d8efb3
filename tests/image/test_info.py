# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk info agrees with qemu-img info on images qemu-img made."""
import pytest

COMMON_KEYS = ["virtual-size", "filename", "format", "actual-size", "dirty-flag", "cluster-size",
               "backing-filename", "full-backing-filename", "backing-filename-format", "format-specific",
               "snapshots"]


def assert_same_info(ours, theirs):
    for key in COMMON_KEYS:
        assert ours.get(key) == theirs.get(key), "key %s: vdisk %r, qemu-img %r" % (key, ours.get(key),
                                                                                   theirs.get(key))


@pytest.fixture
def chain(qemu_img, qemu_io, tmp_path):
    """base.qcow2 (data + zero clusters) <- top.qcow2 (data, zeroes, a snapshot)."""
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    qemu_io("base.qcow2", "write -P 0xaa 0 1M", "write -z 2M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xbb 512k 1M", "write -z 8M 64k")
    qemu_img("snapshot", "-c", "snap1", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xcc 16M 128k")
    qemu_img("snapshot", "-c", "snap2", "top.qcow2")
    return tmp_path


def test_info_raw_json(vdisk, qemu_img, qemu_io, qinfo, tmp_path):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "4M")
    qemu_io("a.raw", "write -P 1 1M 64k", fmt="raw")
    ours = vdisk("info", "--output=json", "a.raw", check=0).json()
    assert_same_info(ours, qinfo("a.raw"))


def test_info_raw_human_identical(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "3G")
    assert vdisk("info", "a.raw", check=0).out == qemu_img("info", "a.raw").out


def test_info_forced_format(vdisk, qemu_img, qinfo):
    qemu_img("create", "-q", "-f", "raw", "a.img", "1M")
    ours = vdisk("info", "-f", "raw", "--output=json", "a.img", check=0).json()
    assert_same_info(ours, qinfo("a.img"))


def test_info_qcow2_json(vdisk, qinfo, chain, qcow2_read):
    for name in ("base.qcow2", "top.qcow2"):
        ours = vdisk("info", "--output=json", name, check=0).json()
        assert_same_info(ours, qinfo(name))
    ours = vdisk("info", "--output=json", "top.qcow2", check=0).json()
    assert [s["name"] for s in ours["snapshots"]] == ["snap1", "snap2"]


def test_info_qcow2_human_identical(vdisk, qemu_img, chain, qcow2_read):
    for name in ("base.qcow2", "top.qcow2"):
        assert vdisk("info", name, check=0).out == qemu_img("info", name).out


def test_info_backing_chain(vdisk, qemu_img, qinfo, chain, qcow2_read):
    ours = vdisk("info", "--backing-chain", "--output=json", "top.qcow2", check=0).json()
    theirs = qinfo("top.qcow2", "--backing-chain")
    assert isinstance(ours, list) and len(ours) == len(theirs) == 2
    for o, t in zip(ours, theirs):
        assert_same_info(o, t)
    assert vdisk("info", "--backing-chain", "top.qcow2", check=0).out == \
        qemu_img("info", "--backing-chain", "top.qcow2").out


def test_info_qcow2_options(vdisk, qemu_img, qinfo, tmp_path, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "cluster_size=4k,lazy_refcounts=on,refcount_bits=8,compression_type=zstd", "o.qcow2", "10M")
    assert_same_info(vdisk("info", "--output=json", "o.qcow2", check=0).json(), qinfo("o.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "e.qcow2", "10M")
    assert_same_info(vdisk("info", "--output=json", "e.qcow2", check=0).json(), qinfo("e.qcow2"))


def test_info_qcow2_v2(vdisk, qemu_img, qinfo, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M")
    ours = vdisk("info", "--output=json", "v2.qcow2", check=0).json()
    theirs = qinfo("v2.qcow2")
    for key in ("virtual-size", "format", "cluster-size", "actual-size", "dirty-flag"):
        assert ours[key] == theirs[key]
    assert ours["format-specific"]["data"]["compat"] == "0.10"


def test_info_backing_in_subdir(vdisk, qemu_img, qinfo, tmp_path, qcow2_read):
    (tmp_path / "d").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "d/base.qcow2", "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "d/top.qcow2")
    ours = vdisk("info", "--output=json", "d/top.qcow2", check=0).json()
    assert_same_info(ours, qinfo("d/top.qcow2"))
    assert ours["full-backing-filename"] == "d/base.qcow2"


def test_info_missing_backing_file_is_fine(vdisk, qemu_img, qinfo, tmp_path, qcow2_read):
    """info does not open the backing file (as qemu-img)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "t.qcow2", "1M")
    ours = vdisk("info", "--output=json", "t.qcow2", check=0).json()
    assert ours["backing-filename"] == "gone.qcow2"


def test_info_missing_file(vdisk):
    r = vdisk("info", "nonexistent.img")
    assert r.rc == 1
    assert r.err.startswith("vdisk info: Could not open 'nonexistent.img'")


def test_info_bad_output(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "1M")
    assert vdisk("info", "--output=xml", "a.raw").rc == 2


def test_info_vdisk_made_images_match_qemu(vdisk, qemu_img, qemu_io, qcow2_write):
    vdisk("create", "-q", "-f", "qcow2", "-o", "cluster_size=32k,lazy_refcounts=on", "b.qcow2", "48M", check=0)
    vdisk("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", check=0)
    qemu_io("t.qcow2", "write -P 1 0 1M")
    vdisk("snapshot", "-c", "s1", "t.qcow2", check=0)
    assert vdisk("info", "--backing-chain", "t.qcow2", check=0).out == \
        qemu_img("info", "--backing-chain", "t.qcow2").out
    ours = vdisk("info", "--backing-chain", "--output=json", "t.qcow2", check=0).json()
    theirs = qemu_img("info", "--backing-chain", "--output=json", "t.qcow2").json()
    for o, t in zip(ours, theirs):
        assert_same_info(o, t)
