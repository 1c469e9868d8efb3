# SPDX-License-Identifier: LGPL-2.1-or-later
"""Images written by qemu-img / qemu-io read back identically through our block layer."""
import os

import pytest

from conftest import (assert_same, our_dump, qimg, qio, random_ops, to_raw, vio)

SIZE = 8 << 20


def fill_with_qemu(img, rng, size, n=40, gran=512):
    cmds = []
    for op, off, length, pat in random_ops(rng, size, n, granularity=gran):
        if op == "zero":
            cmds.append("write -z %d %d" % (off, length))
        else:
            cmds.append("write -P %d %d %d" % (pat, off, length))
    # qemu-io takes many -c at once; keep command lines reasonable
    for i in range(0, len(cmds), 20):
        qio(img, *cmds[i:i + 20])


def compare_with_qemu(tmp, img, size, extra=()):
    want = to_raw(img, os.path.join(tmp, "want.raw"), extra=extra)
    got = our_dump(img, size, os.path.join(tmp, "got.raw"))
    assert_same(got, want)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_cluster_sizes(tmp, rng, cluster_size, compat):
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=%d,compat=%s" % (cluster_size, compat), img, SIZE)
    fill_with_qemu(img, rng, SIZE)
    compare_with_qemu(tmp, img, SIZE)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(tmp, rng, refcount_bits):
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", "-o", "refcount_bits=%d,cluster_size=4096" % refcount_bits, img, SIZE)
    fill_with_qemu(img, rng, SIZE)
    compare_with_qemu(tmp, img, SIZE)
    # and our check agrees with qemu's: clean
    out = vio(img, "check", opts=["-r"]).stdout
    assert '"corruptions": 0' in out and '"leaks": 0' in out, out


@pytest.mark.parametrize("cluster_size", [16384, 65536, 2 << 20])
def test_extended_l2(tmp, rng, cluster_size):
    img = os.path.join(tmp, "a.qcow2")
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x11 0 %d" % SIZE)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base,
         "-o", "extended_l2=on,cluster_size=%d" % cluster_size, img, SIZE)
    # subcluster-sized writes and zeroes over a backing file
    fill_with_qemu(img, rng, SIZE, n=60, gran=cluster_size // 32)
    compare_with_qemu(tmp, img, SIZE)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 << 20])
def test_compressed(tmp, rng, ctype, cluster_size):
    raw = os.path.join(tmp, "src.raw")
    img = os.path.join(tmp, "c.qcow2")
    data = bytearray()
    while len(data) < SIZE:
        kind = rng.random()
        chunk = rng.randrange(1000, 300000)
        if kind < 0.4:
            data += bytes([rng.randrange(256)]) * chunk
        elif kind < 0.6:
            data += bytes(chunk)
        elif kind < 0.8:
            data += os.urandom(chunk)
        else:
            data += (b"qcow2 compressed text %d " % rng.randrange(1000)) * (chunk // 20)
    data = bytes(data[:SIZE])
    with open(raw, "wb") as f:
        f.write(data)
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
         "compression_type=%s,cluster_size=%d" % (ctype, cluster_size), raw, img)
    got = our_dump(img, SIZE, os.path.join(tmp, "got.raw"))
    assert_same(got, data)
    out = vio(img, "check", opts=["-r"]).stdout
    assert '"corruptions": 0' in out and '"leaks": 0' in out, out


def test_compressed_then_overwritten(tmp, rng):
    raw = os.path.join(tmp, "src.raw")
    img = os.path.join(tmp, "c.qcow2")
    with open(raw, "wb") as f:
        f.write(b"abc" * (SIZE // 3) + b"x" * (SIZE % 3))
    qimg("convert", "-c", "-O", "qcow2", raw, img)
    fill_with_qemu(img, rng, SIZE, n=30)
    compare_with_qemu(tmp, img, SIZE)


def test_backing_chain_depth3(tmp, rng):
    base = os.path.join(tmp, "base.raw")
    mid = os.path.join(tmp, "mid.qcow2")
    mid2 = os.path.join(tmp, "mid2.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    with open(base, "wb") as f:
        f.write(os.urandom(SIZE // 2))  # shorter than the overlays
    qimg("create", "-f", "qcow2", "-F", "raw", "-b", base, mid, SIZE)
    fill_with_qemu(mid, rng, SIZE, n=20)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", mid, "-o", "cluster_size=4096", mid2, SIZE)
    fill_with_qemu(mid2, rng, SIZE, n=20)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", mid2, "-o", "cluster_size=2M", top, SIZE)
    fill_with_qemu(top, rng, SIZE, n=20)
    compare_with_qemu(tmp, top, SIZE)


def test_snapshots_read(tmp, rng):
    img = os.path.join(tmp, "s.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    fill_with_qemu(img, rng, SIZE, n=10)
    qimg("snapshot", "-c", "one", img)
    fill_with_qemu(img, rng, SIZE, n=10)
    qimg("snapshot", "-c", "two", img)
    fill_with_qemu(img, rng, SIZE, n=10)
    compare_with_qemu(tmp, img, SIZE)
    listing = vio(img, "snapshot -l", opts=["-r"]).stdout
    assert '"name": "one"' in listing and '"name": "two"' in listing


def test_preallocated_images(tmp, rng):
    for mode in ("metadata", "falloc", "full"):
        img = os.path.join(tmp, "p-%s.qcow2" % mode)
        qimg("create", "-f", "qcow2", "-o", "preallocation=%s" % mode, img, SIZE)
        fill_with_qemu(img, rng, SIZE, n=10)
        compare_with_qemu(tmp, img, SIZE)


def test_block_status_matches_qemu_map(tmp, rng):
    img = os.path.join(tmp, "m.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    fill_with_qemu(img, rng, SIZE, n=20)
    qio(img, "discard 1M 1M")
    import json
    theirs = [json.loads(l.rstrip(",").lstrip("[").rstrip("]")) for l in
              qimg("map", "--output=json", img).stdout.strip().splitlines()]
    ours = [json.loads(l) for l in vio(img, "map", opts=["-r"]).stdout.splitlines()]

    def expand(entries, key_data, key_zero, key_off):
        m = {}
        for e in entries:
            for c in range(e["start"] // 512, (e["start"] + e["length"]) // 512):
                off = e.get(key_off)
                m[c] = (e[key_data], e[key_zero],
                        None if off is None else off + c * 512 - e["start"])
        return m
    a = expand(theirs, "data", "zero", "offset")
    b = expand(ours, "data", "zero", "offset")
    assert a == b
