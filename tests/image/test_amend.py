# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk amend, cross-checked with qemu-img info / check."""
import pytest


def fs(qemu_img, path):
    return qemu_img("info", "--output=json", path).json()["format-specific"]["data"]


def test_amend_lazy_refcounts(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "8M")
    qemu_io("a.qcow2", "write -P 1 0 1M")
    vdisk("amend", "-o", "lazy_refcounts=on", "a.qcow2", check=0)
    assert fs(qemu_img, "a.qcow2")["lazy-refcounts"] is True
    qemu_img("check", "a.qcow2")
    vdisk("amend", "-f", "qcow2", "-o", "lazy_refcounts=off", "a.qcow2", check=0)
    assert fs(qemu_img, "a.qcow2")["lazy-refcounts"] is False
    qemu_io("a.qcow2", "read -P 1 0 1M")


def test_amend_compat_downgrade_upgrade(vdisk, qemu_img, qemu_io, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "8M")
    qemu_io("a.qcow2", "write -P 1 0 1M", "write -z 2M 64k")
    vdisk("amend", "-o", "compat=0.10", "a.qcow2", check=0)
    assert fs(qemu_img, "a.qcow2")["compat"] == "0.10"
    qemu_img("check", "a.qcow2")
    qemu_io("a.qcow2", "read -P 1 0 1M", "read -P 0 2M 64k")
    vdisk("amend", "-o", "compat=1.1", "a.qcow2", check=0)
    assert fs(qemu_img, "a.qcow2")["compat"] == "1.1"
    qemu_img("check", "a.qcow2")


def test_amend_size(vdisk, qemu_img, qcow2_write):
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "8M")
    vdisk("amend", "-o", "size=16M", "a.qcow2", check=0)
    assert qemu_img("info", "--output=json", "a.qcow2").json()["virtual-size"] == 16 << 20
    qemu_img("check", "a.qcow2")


def test_amend_help(vdisk):
    r = vdisk("amend", "-f", "qcow2", "-o", "help", check=0)
    assert "lazy_refcounts" in r.out and "cluster_size" not in r.out


@pytest.mark.parametrize("opts,msg", [
    ("cluster_size=4k", "only supported for image creation"),
    ("bogus=1", "Invalid parameter 'bogus'"),
    ("lazy_refcounts=perhaps", "expects 'on' or 'off'"),
])
def test_amend_bad_options(vdisk, qemu_img, opts, msg, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "8M")
    r = vdisk("amend", "-o", opts, "a.qcow2")
    assert r.rc == 1, r
    assert msg in r.err
    qemu_img("check", "a.qcow2")


def test_amend_errors(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "r.raw", "1M")
    r = vdisk("amend", "-o", "size=2M", "r.raw")
    assert r.rc == 1 and "does not support option amendment" in r.err
    r = vdisk("amend", "r.raw")
    assert r.rc == 2 and "Must specify options" in r.err
    r = vdisk("amend", "-o", "lazy_refcounts=on", "missing.qcow2")
    assert r.rc == 1 and "Could not open 'missing.qcow2'" in r.err
