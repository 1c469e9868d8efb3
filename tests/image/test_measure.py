# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk measure gives qemu-img measure's numbers, byte for byte."""
import pytest

SIZE_CASES = [
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "--size", "100M", "-o", "preallocation=full"],
    ["-O", "qcow2", "--size", "100M", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "--size", "10G", "-o", "cluster_size=4k"],
    ["-O", "qcow2", "--size", "10G", "-o", "cluster_size=2M,refcount_bits=64"],
    ["-O", "qcow2", "--size", "5G", "-o", "extended_l2=on"],
    ["-O", "qcow2", "--size", "5G", "-o", "refcount_bits=1"],
    ["-O", "qcow2", "--size", "1000000"],
    ["-O", "qcow2", "--size", "0"],
    ["-O", "raw", "--size", "1G"],
    ["-O", "raw", "--size", "1000"],
    ["--size", "64M"],
]


@pytest.mark.parametrize("args", SIZE_CASES, ids=[" ".join(a) for a in SIZE_CASES])
def test_measure_size(vdisk, qemu_img, args):
    ours = vdisk("measure", "--output=json", *args, check=0).json()
    theirs = qemu_img("measure", "--output=json", *args).json()
    assert ours == theirs
    assert vdisk("measure", *args, check=0).out == qemu_img("measure", *args).out


@pytest.fixture
def images(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "20M")
    qemu_io("a.raw", "write -P 1 0 4k", "write -P 2 1M 3M", "write -P 3 19M 100k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    qemu_io("base.qcow2", "write -P 0xaa 0 1M", "write -z 2M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xbb 512k 1M", "write -P 0xbc 30M 70k")


IMAGE_CASES = [
    ["-O", "qcow2", "a.raw"],
    ["-O", "raw", "a.raw"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "a.raw"],
    ["-O", "qcow2", "-o", "backing_file=x.qcow2", "a.raw"],
    ["-O", "qcow2", "-o", "preallocation=falloc", "a.raw"],
]
QCOW2_IMAGE_CASES = [
    ["-O", "qcow2", "top.qcow2"],
    ["-O", "qcow2", "base.qcow2"],
    ["-O", "raw", "top.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512", "top.qcow2"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=1M", "top.qcow2"],
]


@pytest.mark.parametrize("args", IMAGE_CASES, ids=[" ".join(a) for a in IMAGE_CASES])
def test_measure_raw_image(vdisk, qemu_img, images, args):
    ours = vdisk("measure", "--output=json", *args, check=0).json()
    assert ours == qemu_img("measure", "--output=json", *args).json()


@pytest.mark.parametrize("args", QCOW2_IMAGE_CASES, ids=[" ".join(a) for a in QCOW2_IMAGE_CASES])
def test_measure_qcow2_image(vdisk, qemu_img, images, qcow2_read, args):
    ours = vdisk("measure", "--output=json", *args, check=0).json()
    assert ours == qemu_img("measure", "--output=json", *args).json()
    assert vdisk("measure", *args, check=0).out == qemu_img("measure", *args).out


def test_measure_errors(vdisk, qemu_img, images):
    r = vdisk("measure", "-O", "qcow2")
    assert r.rc == 2 and "Either --size N or one filename" in r.err
    r = vdisk("measure", "-O", "qcow2", "--size", "1G", "a.raw")
    assert r.rc == 2 and "cannot be used together" in r.err
    r = vdisk("measure", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G")
    assert r.rc == 1 and "Extended L2" in r.err
    r = vdisk("measure", "-O", "qcow2", "-o", "bogus=1", "--size", "1G")
    assert r.rc == 1 and "Invalid parameter 'bogus'" in r.err
    r = vdisk("measure", "-O", "qcow2", "missing.raw")
    assert r.rc == 1 and "Could not open 'missing.raw'" in r.err
