# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk map prints the same ranges as qemu-img map (7.2), JSON and human."""
import subprocess

import pytest


def both(vdisk, qemu_img, *args):
    ours = vdisk("map", *args, check=0)
    theirs = qemu_img("map", *args)
    return ours, theirs


def test_map_raw_sparse(vdisk, qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "8M")
    qemu_io("a.raw", "write -P 1 1M 64k", "write -P 2 3M 4k", "write -P 3 7M 1M", fmt="raw")
    ours, theirs = both(vdisk, qemu_img, "--output=json", "a.raw")
    assert ours.json() == theirs.json()
    ours, theirs = both(vdisk, qemu_img, "a.raw")
    assert ours.out == theirs.out


def test_map_raw_fully_allocated(vdisk, qemu_img):
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=full", "f.raw", "2M")
    ours, theirs = both(vdisk, qemu_img, "--output=json", "f.raw")
    assert ours.json() == theirs.json()


@pytest.fixture
def chain(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    qemu_io("base.qcow2", "write -P 0xaa 0 1M", "write -z 2M 1M", "write -P 0xab 40M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    qemu_io("mid.qcow2", "write -P 0xbb 512k 1M", "write -z 8M 64k", "write -P 0xbc 20M 192k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "80M")
    qemu_io("top.qcow2", "write -P 0xcc 20M 64k", "write -P 0xcd 70M 64k", "write -z 1M 64k")


@pytest.mark.parametrize("image", ["base.qcow2", "mid.qcow2", "top.qcow2"])
def test_map_qcow2_chain_json(vdisk, qemu_img, chain, qcow2_read, image):
    ours, theirs = both(vdisk, qemu_img, "--output=json", image)
    assert ours.json() == theirs.json()


@pytest.mark.parametrize("image", ["base.qcow2", "mid.qcow2", "top.qcow2"])
def test_map_qcow2_chain_human(vdisk, qemu_img, chain, qcow2_read, image):
    ours, theirs = both(vdisk, qemu_img, image)
    assert ours.out == theirs.out


@pytest.mark.parametrize("args", [["--start-offset=1M"], ["--max-length=3M"], ["-s", "512k", "-l", "21M"],
                                  ["--start-offset=90M"]])
def test_map_range(vdisk, qemu_img, chain, qcow2_read, args):
    ours, theirs = both(vdisk, qemu_img, "--output=json", *args, "top.qcow2")
    assert ours.json() == theirs.json()


def test_map_qcow2_fresh(vdisk, qemu_img, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "e.qcow2", "1G")
    ours, theirs = both(vdisk, qemu_img, "--output=json", "e.qcow2")
    assert ours.json() == theirs.json() == [
        {"start": 0, "length": 1 << 30, "depth": 0, "present": False, "zero": True, "data": False}]


def test_map_qcow2_small_clusters(vdisk, qemu_img, qemu_io, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "s.qcow2", "4M")
    qemu_io("s.qcow2", "write -P 1 0 12k", "write -P 2 16k 4k", "write -z 64k 8k")
    ours, theirs = both(vdisk, qemu_img, "--output=json", "s.qcow2")
    assert ours.json() == theirs.json()


def test_map_qcow2_data_over_file_hole(vdisk, qemu_img, qemu_io, qcow2_read, tmp_path):
    """Part of a data cluster that is a hole in the host file is data and zero, as qemu-img map reports it."""
    qemu_img("create", "-q", "-f", "qcow2", "h.qcow2", "4M")
    qemu_io("h.qcow2", "write -P 1 1M 64k", "write -P 2 2M 64k")
    host = next(e["offset"] for e in qemu_img("map", "--output=json", "h.qcow2").json() if e["start"] == 1 << 20)
    subprocess.run(["fallocate", "-p", "-o", str(host + 4096), "-l", "16384", str(tmp_path / "h.qcow2")], check=True)
    ours, theirs = both(vdisk, qemu_img, "--output=json", "h.qcow2")
    assert ours.json() == theirs.json()
    assert any(e["data"] and e["zero"] and e["length"] == 16384 for e in ours.json())


def test_map_missing_file(vdisk):
    r = vdisk("map", "nope.qcow2")
    assert r.rc == 1
    assert r.err.startswith("vdisk map: Could not open 'nope.qcow2'")
