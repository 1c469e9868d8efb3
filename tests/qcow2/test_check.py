# SPDX-License-Identifier: LGPL-2.1-or-later
"""Our check finds what qemu-img check finds, and our repair leaves images qemu-img calls clean."""
import json
import os
import struct

import pytest

from conftest import assert_clean, qemu_check, qimg, qio, to_raw, vio

SIZE = 16 << 20


def get(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def put(path, off, fmt, *vals):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def our_check(img, repair=None):
    cmd = "check" + (" -r " + repair if repair else "")
    p = vio(img, cmd, opts=[] if repair else ["-r"], check=False)
    line = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert line, p.stderr
    return json.loads(line[-1]), p


def refcount_entry(img, cluster):
    """Offset of the 16-bit refcount entry of a cluster (default refcount_bits, 64k clusters)."""
    rt = get(img, 48, ">Q")[0]
    cb = get(img, 20, ">I")[0]
    per_block = (1 << cb) * 8 // 16
    rb = get(img, rt + 8 * (cluster // per_block), ">Q")[0]
    return rb + 2 * (cluster % per_block)


def l2_entry_off(img, i):
    l1 = get(img, 40, ">Q")[0]
    l2 = get(img, l1, ">Q")[0] & 0x00fffffffffffe00
    return l2 + 8 * i


def data_image(tmp, opts=None):
    img = os.path.join(tmp, "c.qcow2")
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else []) + [img, SIZE]
    qimg(*args)
    qio(img, "write -P 0x31 0 256k", "write -P 0x32 1M 64k", "write -P 0x33 5M 3M")
    return img


@pytest.mark.parametrize("opts", [None, "cluster_size=512", "refcount_bits=1,cluster_size=4096", "extended_l2=on",
                                  "compat=0.10", "refcount_bits=64"])
def test_clean_image_numbers_match(tmp, opts):
    img = data_image(tmp, opts)
    qio(img, "discard 1M 64k", "write -z 6M 64k")
    ours, _ = our_check(img)
    theirs = qemu_check(img)
    for k in ("corruptions", "leaks", "check-errors"):
        assert ours[k] == theirs.get(k, 0), (k, ours, theirs)
    for k in ("image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
              "compressed-clusters"):
        assert ours[k] == theirs.get(k, 0), (k, ours, theirs)


def test_compressed_numbers_match(tmp):
    raw = os.path.join(tmp, "r.raw")
    img = os.path.join(tmp, "c.qcow2")
    with open(raw, "wb") as f:
        f.write(b"compress me " * (SIZE // 12) + bytes(SIZE % 12))
    qimg("convert", "-c", "-O", "qcow2", raw, img)
    qimg("snapshot", "-c", "s", img)
    qio(img, "write -P 1 0 100k")
    ours, _ = our_check(img)
    theirs = qemu_check(img)
    for k in ("corruptions", "leaks", "image-end-offset", "allocated-clusters", "compressed-clusters",
              "fragmented-clusters"):
        assert ours[k] == theirs.get(k, 0), (k, ours, theirs)


def test_leaks_found_and_repaired(tmp):
    img = data_image(tmp)
    used = get(img, l2_entry_off(img, 0), ">Q")[0] & 0x00fffffffffffe00
    put(img, refcount_entry(img, used >> 16), ">H", 2)       # a used cluster with one reference too many
    end = qemu_check(img)["image-end-offset"]
    with open(img, "r+b") as f:
        f.truncate(end + 8 * 65536)
    put(img, refcount_entry(img, (end >> 16) + 3), ">H", 1)   # a cluster nobody references
    theirs = qemu_check(img)
    ours, _ = our_check(img)
    assert theirs["leaks"] == 2 and ours["leaks"] == 2, (ours, theirs)
    # refcount 2 with the COPIED flag set is also an error for both
    assert ours["corruptions"] == theirs.get("corruptions", 0) == 1, (ours, theirs)
    ours, _ = our_check(img, "leaks")
    assert ours["leaks-fixed"] == 2, ours
    assert_clean(img)
    qio(img, "read -P 0x31 0 256k", "read -P 0x33 5M 3M", extra=["-r"])


def test_refcount_too_low_repaired(tmp):
    img = data_image(tmp)
    want = to_raw(img, os.path.join(tmp, "before.raw"))
    used = get(img, l2_entry_off(img, 2), ">Q")[0] & 0x00fffffffffffe00
    put(img, refcount_entry(img, used >> 16), ">H", 0)
    theirs = qemu_check(img)
    ours, _ = our_check(img)
    assert theirs["corruptions"] >= 1 and ours["corruptions"] >= 1, (ours, theirs)
    # leaks-only repair must not touch it
    ours, _ = our_check(img, "leaks")
    assert ours["corruptions"] >= 1
    ours, p = our_check(img, "all")
    assert ours["corruptions-fixed"] >= 1, (ours, p.stderr)
    assert_clean(img)
    assert to_raw(img, os.path.join(tmp, "after.raw")) == want


def test_copied_flag_repaired(tmp):
    img = data_image(tmp)
    off = l2_entry_off(img, 1)
    put(img, off, ">Q", get(img, off, ">Q")[0] & ~(1 << 63))
    theirs = qemu_check(img)
    ours, _ = our_check(img)
    assert ours["corruptions"] == theirs["corruptions"] == 1, (ours, theirs)
    ours, _ = our_check(img, "all")
    assert ours["corruptions-fixed"] == 1
    assert_clean(img)


def test_broken_refcount_block_rebuilt(tmp):
    img = data_image(tmp)
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x44 0 64k")
    want = to_raw(img, os.path.join(tmp, "before.raw"))
    want_snap = to_raw(img, os.path.join(tmp, "snap.raw"), extra=("-l", "snapshot.name=s1"))
    rt = get(img, 48, ">Q")[0]
    put(img, rt, ">Q", get(img, rt, ">Q")[0] + 512)  # refcount block 0 unaligned
    ours, _ = our_check(img)
    assert ours["corruptions"] >= 1
    ours, p = our_check(img, "all")
    assert "Rebuilding" in p.stderr, p.stderr
    assert_clean(img)
    assert to_raw(img, os.path.join(tmp, "after.raw")) == want
    assert to_raw(img, os.path.join(tmp, "snap2.raw"), extra=("-l", "snapshot.name=s1")) == want_snap


def test_zeroed_refcount_block_rebuilt(tmp):
    img = data_image(tmp, "cluster_size=4096")
    want = to_raw(img, os.path.join(tmp, "before.raw"))
    rt = get(img, 48, ">Q")[0]
    rb = get(img, rt, ">Q")[0]
    put(img, rb, "4096x")  # every refcount of the first block lost
    assert qemu_check(img)["corruptions"] > 0
    our_check(img, "all")
    assert_clean(img)
    assert to_raw(img, os.path.join(tmp, "after.raw")) == want


def test_corrupt_bit_cleared_by_repair(tmp):
    img = data_image(tmp)
    put(img, 72, ">Q", 2)
    p = vio(img, "read 0 512", check=False)
    assert p.returncode == 1 and "corrupt" in p.stderr
    # opened for repair (as check -r does), the corrupt bit goes away
    vio(img, "check -r all", opts=["--check"])
    assert get(img, 72, ">Q")[0] & 2 == 0
    vio(img, "read -P 0x31 0 256k")


def test_check_unaligned_l2_entry(tmp):
    img = data_image(tmp)
    off = l2_entry_off(img, 3)
    put(img, off, ">Q", get(img, off, ">Q")[0] | 0x200)
    theirs = qemu_check(img)
    ours, _ = our_check(img)
    assert ours["corruptions"] >= 1 and theirs["corruptions"] >= 1, (ours, theirs)
    our_check(img, "all")
    assert_clean(img)
