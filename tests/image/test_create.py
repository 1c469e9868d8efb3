# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk create: images that qemu-img checks clean and describes the same way."""
import os

import pytest


@pytest.mark.parametrize("size,expected", [("1M", 1 << 20), ("64k", 64 << 10), ("1G", 1 << 30),
                                           ("1.5M", 3 << 19), ("4096", 4096), ("2T", 2 << 40)])
def test_create_raw_sizes(vdisk, qinfo, tmp_path, size, expected):
    r = vdisk("create", "-f", "raw", "a.raw", size, check=0)
    assert r.out == "Formatting 'a.raw', fmt=raw size=%d\n" % expected
    info = qinfo(tmp_path / "a.raw")
    assert info["format"] == "raw"
    assert info["virtual-size"] == expected
    assert os.path.getsize(tmp_path / "a.raw") == expected


def test_create_default_format_is_raw(vdisk, qinfo, tmp_path):
    vdisk("create", "-q", "x.img", "1M", check=0)
    assert qinfo(tmp_path / "x.img")["format"] == "raw"


def test_create_quiet(vdisk):
    r = vdisk("create", "-q", "-f", "raw", "q.raw", "1M", check=0)
    assert r.out == ""


def test_create_raw_preallocation_full(vdisk, tmp_path):
    vdisk("create", "-q", "-f", "raw", "-o", "preallocation=full", "p.raw", "1M", check=0)
    assert os.stat(tmp_path / "p.raw").st_blocks * 512 >= 1 << 20


def test_create_qcow2_default(vdisk, qemu_img, qinfo, tmp_path, qcow2_write):
    r = vdisk("create", "-f", "qcow2", "a.qcow2", "64M", check=0)
    assert r.out == ("Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off "
                     "compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16\n")
    qemu_img("check", "a.qcow2")
    info = qinfo(tmp_path / "a.qcow2")
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 << 20
    assert info["cluster-size"] == 65536
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1"
    assert data["lazy-refcounts"] is False
    assert data["refcount-bits"] == 16
    assert data["compression-type"] == "zlib"
    assert data["extended-l2"] is False
    assert "backing-filename" not in info


QCOW2_OPTION_CASES = [
    ("cluster_size=4096", {"cluster-size": 4096}),
    ("cluster_size=2M", {"cluster-size": 2 << 20}),
    ("cluster_size=512", {"cluster-size": 512}),
    ("lazy_refcounts=on", {"lazy-refcounts": True}),
    ("refcount_bits=1", {"refcount-bits": 1}),
    ("refcount_bits=8", {"refcount-bits": 8}),
    ("refcount_bits=64", {"refcount-bits": 64}),
    ("compression_type=zstd", {"compression-type": "zstd"}),
    ("extended_l2=on", {"extended-l2": True}),
    ("extended_l2=on,cluster_size=128k", {"extended-l2": True, "cluster-size": 128 << 10}),
    ("compat=0.10", {"compat": "0.10"}),
    ("compat=1.1", {"compat": "1.1"}),
    ("preallocation=metadata", {}),
    ("preallocation=falloc", {}),
    ("preallocation=full", {}),
]


@pytest.mark.parametrize("opts,expect", QCOW2_OPTION_CASES, ids=[c[0] for c in QCOW2_OPTION_CASES])
def test_create_qcow2_options(vdisk, qemu_img, qinfo, tmp_path, qcow2_write, opts, expect):
    vdisk("create", "-q", "-f", "qcow2", "-o", opts, "o.qcow2", "16M", check=0)
    qemu_img("check", "o.qcow2")
    info = qinfo(tmp_path / "o.qcow2")
    assert info["virtual-size"] == 16 << 20
    for key, value in expect.items():
        if key == "cluster-size":
            assert info["cluster-size"] == value
        else:
            assert info["format-specific"]["data"][key] == value
    if opts.startswith("preallocation=full") or opts.startswith("preallocation=falloc"):
        assert os.path.getsize(tmp_path / "o.qcow2") >= 16 << 20


def test_create_qcow2_preallocation_metadata_maps_everything(vdisk, qemu_img, tmp_path, qcow2_write):
    vdisk("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "m.qcow2", "4M", check=0)
    entries = qemu_img("map", "--output=json", "m.qcow2").json()
    assert all("offset" in e for e in entries)


def test_create_qcow2_backing(vdisk, qemu_img, qinfo, tmp_path, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "32M")
    r = vdisk("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", check=0)
    assert "backing_file=base.qcow2 backing_fmt=qcow2" in r.out
    qemu_img("check", "top.qcow2")
    info = qinfo("top.qcow2")
    assert info["virtual-size"] == 32 << 20  # the backing file's size
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["full-backing-filename"] == "base.qcow2"


def test_create_qcow2_backing_format_probed(vdisk, qemu_img, qinfo, tmp_path, qcow2_write):
    qemu_img("create", "-q", "-f", "raw", "base.raw", "8M")
    vdisk("create", "-q", "-f", "qcow2", "-b", "base.raw", "top.qcow2", check=0)
    info = qinfo(tmp_path / "top.qcow2")
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 8 << 20


def test_create_qcow2_backing_via_o_and_explicit_size(vdisk, qemu_img, qinfo, tmp_path, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    vdisk("create", "-q", "-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2", "16M",
          check=0)
    qemu_img("check", "top.qcow2")
    info = qinfo(tmp_path / "top.qcow2")
    assert info["virtual-size"] == 16 << 20
    assert info["backing-filename"] == "base.qcow2"


def test_create_backing_in_subdir_is_relative_to_image(vdisk, qemu_img, qinfo, tmp_path, qcow2_write):
    (tmp_path / "d").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "d/base.qcow2", "8M")
    vdisk("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "d/top.qcow2", check=0)
    info = qinfo(tmp_path / "d" / "top.qcow2")
    assert info["backing-filename"] == "base.qcow2"
    assert info["virtual-size"] == 8 << 20


def test_create_unsafe_needs_size(vdisk, tmp_path, qcow2_write):
    r = vdisk("create", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", "top.qcow2")
    assert r.rc == 1
    assert "needs a size" in r.err
    vdisk("create", "-q", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", "top.qcow2", "1M", check=0)


def test_create_missing_backing_file(vdisk, tmp_path, qcow2_write):
    r = vdisk("create", "-f", "qcow2", "-b", "nowhere.qcow2", "-F", "qcow2", "top.qcow2")
    assert r.rc == 1
    assert r.err.startswith("vdisk create: ")
    assert "nowhere.qcow2" in r.err


def test_create_raw_has_no_backing(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "base.raw", "1M")
    r = vdisk("create", "-f", "raw", "-b", "base.raw", "x.raw")
    assert r.rc == 1
    assert "Backing file not supported" in r.err


def test_create_option_help(vdisk):
    r = vdisk("create", "-f", "qcow2", "-o", "help", check=0)
    for opt in ("cluster_size", "backing_file", "backing_fmt", "compression_type", "lazy_refcounts",
                "extended_l2", "preallocation", "refcount_bits", "compat"):
        assert opt in r.out
    r = vdisk("create", "-f", "raw", "-o", "?", check=0)
    assert "preallocation" in r.out


@pytest.mark.parametrize("opts,msg", [
    ("bogus=1", "Invalid parameter 'bogus'"),
    ("cluster_size=1000", "Cluster size must be a power of two"),
    ("refcount_bits=3", "Refcount width"),
    ("lazy_refcounts=maybe", "expects 'on' or 'off'"),
    ("preallocation=sometimes", "does not accept value 'sometimes'"),
    ("compression_type=lz4", "does not accept value 'lz4'"),
    ("compat=2.0", "does not accept value '2.0'"),
])
def test_create_bad_options(vdisk, tmp_path, opts, msg, qcow2_write):
    r = vdisk("create", "-f", "qcow2", "-o", opts, "bad.qcow2", "1M")
    assert r.rc == 1, r
    assert r.err.startswith("vdisk create: ")
    assert msg in r.err
    assert not (tmp_path / "bad.qcow2").exists()


def test_create_unknown_format(vdisk, tmp_path):
    r = vdisk("create", "-f", "vmdk9", "x", "1M")
    assert r.rc == 1
    assert "Unknown file format 'vmdk9'" in r.err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", ["1Q", "abc", "1.2.3M", "12X"])
def test_create_bad_size(vdisk, size):
    r = vdisk("create", "-f", "raw", "x.raw", size)
    assert r.rc == 2, r
    assert "Invalid image size" in r.err


def test_create_needs_size(vdisk):
    r = vdisk("create", "-f", "raw", "x.raw")
    assert r.rc == 1
    assert "needs a size" in r.err


def test_create_no_filename(vdisk):
    r = vdisk("create")
    assert r.rc == 2
    assert "Expecting image file name" in r.err
