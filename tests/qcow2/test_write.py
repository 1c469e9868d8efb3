# SPDX-License-Identifier: LGPL-2.1-or-later
"""Images written through our block layer pass qemu-img check and read back identically with QEMU."""
import json
import os

import pytest

from conftest import (RawModel, assert_clean, assert_same, our_dump, qimg, qio, random_ops, to_raw, vio)

SIZE = 8 << 20


def apply_ops(img, model, ops, opts=(), batch=25):
    cmds = []
    for op, off, length, pat in ops:
        if op == "write":
            cmds.append("write -P %d %d %d" % (pat, off, length))
            model.write(off, length, pat)
        elif op == "zero":
            cmds.append("zero%s %d %d" % (" -u" if pat else "", off, length))
            model.zero(off, length)
        elif op == "discard":
            # discard reads back as zeroes for whole clusters only: callers pass cluster-aligned ranges
            cmds.append("discard %d %d" % (off, length))
            model.zero(off, length)
    for i in range(0, len(cmds), batch):
        vio(img, *cmds[i:i + batch], opts=opts)


def verify(tmp, img, model, allow_leaks=False):
    assert_clean(img, allow_leaks=allow_leaks)
    want = bytes(model.data)
    got_qemu = to_raw(img, os.path.join(tmp, "qemu.raw"))
    assert_same(got_qemu, want)
    got_ours = our_dump(img, len(want), os.path.join(tmp, "ours.raw"))
    assert_same(got_ours, want)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_random_writes(tmp, rng, cluster_size, compat):
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=%d,compat=%s" % (cluster_size, compat), img, SIZE)
    model = RawModel(SIZE)
    apply_ops(img, model, random_ops(rng, SIZE, 60))
    verify(tmp, img, model)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(tmp, rng, refcount_bits):
    img = os.path.join(tmp, "a.qcow2")
    # small clusters so the refcount table must grow and new refcount blocks appear
    qimg("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=%d" % refcount_bits, img, 32 << 20)
    model = RawModel(32 << 20)
    apply_ops(img, model, random_ops(rng, 32 << 20, 40, max_len=2 << 20))
    verify(tmp, img, model)


@pytest.mark.parametrize("cluster_size", [16384, 65536, 2 << 20])
def test_extended_l2_writes(tmp, rng, cluster_size):
    base = os.path.join(tmp, "base.qcow2")
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x33 0 %d" % SIZE, "write -z 1M 1M")
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base,
         "-o", "extended_l2=on,cluster_size=%d" % cluster_size, img, SIZE)
    model = RawModel(SIZE, base=b"\x33" * SIZE)
    model.zero(1 << 20, 1 << 20)
    apply_ops(img, model, random_ops(rng, SIZE, 80, granularity=cluster_size // 32))
    verify(tmp, img, model)


@pytest.mark.parametrize("extl2", [False, True])
def test_cow_from_backing_keeps_untouched_bytes(tmp, extl2):
    base = os.path.join(tmp, "base.raw")
    img = os.path.join(tmp, "top.qcow2")
    data = bytearray(os.urandom(SIZE))
    with open(base, "wb") as f:
        f.write(data)
    opts = "cluster_size=65536" + (",extended_l2=on" if extl2 else "")
    qimg("create", "-f", "qcow2", "-F", "raw", "-b", base, "-o", opts, img, SIZE)
    model = RawModel(SIZE, base=data)
    ops = [("write", 100, 1, 7), ("write", 65536 + 5000, 3000, 8), ("write", 3 * 65536 - 10, 20, 9),
           ("write", 10 * 65536 + 2048, 2048, 10), ("write", 12 * 65536, 65536 * 3 + 17, 11)]
    apply_ops(img, model, ops)
    verify(tmp, img, model)
    if extl2:
        # only touched subclusters were allocated: the rest still comes from the backing file
        m = qimg("map", "--output=json", img).stdout
        assert '"depth": 1' in m


def test_backing_shorter_than_image(tmp):
    base = os.path.join(tmp, "base.qcow2")
    img = os.path.join(tmp, "top.qcow2")
    qimg("create", "-f", "qcow2", base, 1 << 20)
    qio(base, "write -P 0x44 0 1M")
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, img, SIZE)
    model = RawModel(SIZE, base=b"\x44" * (1 << 20))
    apply_ops(img, model, [("write", (1 << 20) - 100, 300, 5), ("write", 3 << 20, 10, 6)])
    verify(tmp, img, model)


def test_overwrite_snapshot_shared_clusters(tmp, rng):
    img = os.path.join(tmp, "s.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    qio(img, "write -P 0x21 0 %d" % SIZE)
    qimg("snapshot", "-c", "snap", img)
    model = RawModel(SIZE, base=b"\x21" * SIZE)
    apply_ops(img, model, random_ops(rng, SIZE, 40))
    verify(tmp, img, model)
    # the snapshot still holds the old data
    snap = to_raw(img, os.path.join(tmp, "snap.raw"), extra=("-l", "snapshot.name=snap"))
    assert snap == b"\x21" * SIZE


def test_zero_and_discard(tmp, rng):
    base = os.path.join(tmp, "base.qcow2")
    img = os.path.join(tmp, "z.qcow2")
    qimg("create", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x99 0 %d" % SIZE)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, img, SIZE)
    model = RawModel(SIZE, base=b"\x99" * SIZE)
    cs = 65536
    ops = [("write", 0, 4 * cs, 1), ("zero", cs, cs, 1), ("zero", 2 * cs + 100, 1000, 0),
           ("discard", 3 * cs, cs, 0), ("discard", 8 * cs, 2 * cs, 0), ("zero", 20 * cs, 5 * cs, 0),
           ("write", 21 * cs + 7, 100, 3), ("zero", 30 * cs + 1, cs * 2, 1)]
    apply_ops(img, model, ops)
    verify(tmp, img, model)


@pytest.mark.parametrize("extl2", [False, True])
def test_random_with_discard(tmp, rng, extl2):
    cs = 65536
    img = os.path.join(tmp, "a.qcow2")
    opts = "cluster_size=%d%s" % (cs, ",extended_l2=on" if extl2 else "")
    qimg("create", "-f", "qcow2", "-o", opts, img, SIZE)
    model = RawModel(SIZE)
    ops = []
    for op, off, length, pat in random_ops(rng, SIZE, 80, with_discard=True):
        if op == "discard":
            off = off - off % cs
            length = max(cs, length - length % cs)
            length = min(length, SIZE - off)
        ops.append((op, off, length, pat))
    apply_ops(img, model, ops)
    verify(tmp, img, model)
    # discarded space went back to the file system
    info = qimg("info", "--output=json", img).stdout
    assert '"actual-size"' in info


def test_parallel_overlapping_allocation(tmp):
    img = os.path.join(tmp, "p.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=65536", img, SIZE)
    # many concurrent sub-cluster writes into the same few clusters: one allocation each
    cmds = ["write -P %d %d 4096" % (i + 1, i * 4096) for i in range(48)]
    vio(img, "parallel " + "; ".join(cmds))
    model = RawModel(SIZE)
    for i in range(48):
        model.write(i * 4096, 4096, i + 1)
    verify(tmp, img, model)
    r = assert_clean(img)
    assert r["allocated-clusters"] == 3


def test_parallel_mixed(tmp, rng):
    img = os.path.join(tmp, "p.qcow2")
    base = os.path.join(tmp, "b.qcow2")
    qimg("create", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x5a 0 %d" % SIZE)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, "-o", "cluster_size=4096", img, SIZE)
    model = RawModel(SIZE, base=b"\x5a" * SIZE)
    # non-overlapping concurrent writes of all sizes (overlapping ones have no defined result)
    slots = list(range(0, SIZE, 65536))
    rng.shuffle(slots)
    cmds = []
    for i, s in enumerate(slots[:40]):
        off = s + rng.randrange(0, 30000)
        length = rng.randrange(1, 65536 - (off - s))
        cmds.append("write -P %d %d %d" % (i + 1, off, length))
        model.write(off, length, i + 1)
    for i in range(0, len(cmds), 20):
        vio(img, "parallel " + "; ".join(cmds[i:i + 20]), "read -P 0x5a %d 1" % (SIZE - 1))
    verify(tmp, img, model)


def test_grow_l1_and_reftable(tmp, rng):
    img = os.path.join(tmp, "g.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=512", img, 1 << 20)
    model = RawModel(1 << 20)
    apply_ops(img, model, random_ops(rng, 1 << 20, 10))
    vio(img, "truncate %d" % (64 << 20))
    model.resize(64 << 20)
    apply_ops(img, model, random_ops(rng, 64 << 20, 20, max_len=4 << 20))
    verify(tmp, img, model)


def test_resize_shrink_and_grow(tmp, rng):
    img = os.path.join(tmp, "r.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    model = RawModel(SIZE)
    apply_ops(img, model, [("write", 0, SIZE, 0x42)])
    vio(img, "truncate %d" % (3 * 1024 * 1024 + 1536))
    model.resize(3 * 1024 * 1024 + 1536)
    verify(tmp, img, model)
    vio(img, "truncate %d" % SIZE)
    model.resize(SIZE)
    verify(tmp, img, model)
    assert qimg("info", "--output=json", img).stdout.count('"virtual-size": %d' % SIZE) == 1


def test_resize_hides_longer_backing(tmp):
    base = os.path.join(tmp, "b.qcow2")
    img = os.path.join(tmp, "t.qcow2")
    qimg("create", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x71 0 %d" % SIZE)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, img, 1 << 20)
    vio(img, "truncate %d" % SIZE)
    model = RawModel(SIZE, base=b"\x71" * (1 << 20))
    verify(tmp, img, model)


@pytest.mark.parametrize("cache", ["writethrough", "none", "directsync", "unsafe"])
def test_cache_modes(tmp, rng, cache):
    img = os.path.join(tmp, "c.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    model = RawModel(SIZE)
    apply_ops(img, model, random_ops(rng, SIZE, 20), opts=["-t", cache])
    verify(tmp, img, model)


def test_lazy_refcounts(tmp, rng):
    img = os.path.join(tmp, "l.qcow2")
    qimg("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, SIZE)
    model = RawModel(SIZE)
    apply_ops(img, model, random_ops(rng, SIZE, 30))
    verify(tmp, img, model)
    info = qimg("info", "--output=json", img).stdout
    assert '"dirty-flag": false' in info


def test_fua_write(tmp):
    img = os.path.join(tmp, "f.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    vio(img, "write -F -P 0x12 12345 100000")
    model = RawModel(SIZE)
    model.write(12345, 100000, 0x12)
    verify(tmp, img, model)


@pytest.mark.parametrize("variant", ["plain", "extl2-backing", "snapshot", "small"])
def test_parallel_stress(tmp, rng, variant):
    """Concurrent writes, zeroes, discards, reads and flushes on disjoint byte ranges that share clusters."""
    img = os.path.join(tmp, "ps.qcow2")
    cs = 65536
    base_data = None
    if variant == "extl2-backing":
        base = os.path.join(tmp, "base.qcow2")
        qimg("create", "-f", "qcow2", base, SIZE)
        qio(base, "write -P 0x3c 0 %d" % SIZE)
        qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, "-o", "extended_l2=on", img, SIZE)
        base_data = b"\x3c" * SIZE
    elif variant == "small":
        cs = 4096
        qimg("create", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=2", img, SIZE)
    else:
        qimg("create", "-f", "qcow2", img, SIZE)
    model = RawModel(SIZE, base=base_data)
    if variant == "snapshot":
        vio(img, "write -P 0x4d 0 %d" % SIZE, "snapshot -c s")
        model.write(0, SIZE, 0x4d)
    for rnd in range(6):
        # split the image into 2k slots; each command in a round gets its own slots
        slots = list(range(SIZE // 2048))
        rng.shuffle(slots)
        cmds = []
        for i in range(40):
            s0 = slots[i] * 2048
            r = rng.random()
            if r < 0.6:
                off = s0 + rng.randrange(0, 1024)
                length = rng.randrange(1, 2048 - (off - s0))
                pat = rng.randrange(1, 256)
                cmds.append("write -P %d %d %d" % (pat, off, length))
                model.write(off, length, pat)
            elif r < 0.75:
                cmds.append("read -P %d %d 2048" % (model.data[s0], s0) if len(set(model.data[s0:s0 + 2048])) == 1
                            else "read %d 2048" % s0)
            elif r < 0.85:
                cmds.append("zero %d 2048" % s0)
                model.zero(s0, 2048)
            elif r < 0.9:
                cmds.append("flush")
            else:
                # whole-cluster discard in a cluster nobody else touches this round
                c = rng.randrange(SIZE // cs) * cs
                if any(c <= sl * 2048 < c + cs for sl in slots[:40]):
                    continue
                cmds.append("discard %d %d" % (c, cs))
                model.zero(c, cs)
        vio(img, "parallel " + "; ".join(cmds))
        assert_clean(img)
    verify(tmp, img, model)


@pytest.mark.parametrize("parallel", [False, True])
def test_tiny_caches(tmp, rng, parallel):
    """With two cached L2 tables and four refcount blocks, eviction and write-back happen all the time."""
    img = os.path.join(tmp, "tc.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=512", img, SIZE)
    model = RawModel(SIZE)
    opts = ["-O", "l2-cache-size=1k,refcount-cache-size=2k"]
    ops = random_ops(rng, SIZE, 120, max_len=40000)
    if not parallel:
        apply_ops(img, model, ops, opts=opts)
    else:
        # disjoint 64k windows so the parallel commands do not overlap
        cmds = []
        for i, (op, off, length, pat) in enumerate(ops[:60]):
            off = i * 131072 + off % 65536
            length = min(length, 65536)
            if op == "write":
                cmds.append("write -P %d %d %d" % (pat, off, length))
                model.write(off, length, pat)
            else:
                cmds.append("zero %d %d" % (off, length))
                model.zero(off, length)
        for i in range(0, len(cmds), 30):
            vio(img, "parallel " + "; ".join(cmds[i:i + 30]), opts=opts)
    verify(tmp, img, model)
    ours = our_dump(img, SIZE, os.path.join(tmp, "small-cache.raw"), opts=opts)
    assert_same(ours, bytes(model.data))


def test_shrink_frees_l2_tables(tmp):
    img = os.path.join(tmp, "sh.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=512", img, SIZE)
    vio(img, "write -P 9 0 %d" % SIZE)
    before = assert_clean(img)["image-end-offset"]
    vio(img, "truncate %d" % ((1 << 20) + 512))
    r = assert_clean(img)
    assert r["allocated-clusters"] == ((1 << 20) + 512) // 512
    model = RawModel((1 << 20) + 512, base=b"\x09" * SIZE)
    verify(tmp, img, model)
    # the freed space is reused by later writes instead of growing the file
    vio(img, "truncate %d" % SIZE, "write -P 8 2M 2M")
    model.resize(SIZE)
    model.write(2 << 20, 2 << 20, 8)
    verify(tmp, img, model)
    assert assert_clean(img)["image-end-offset"] <= before


def host_offset(img, guest_off):
    """Host offset of the cluster holding guest_off, from qemu-img map."""
    for r in json.loads(qimg("map", "--output=json", img).stdout):
        if r["start"] <= guest_off < r["start"] + r["length"] and r.get("offset") is not None:
            return r["offset"] + (guest_off - r["start"])
    return None


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_fresh_cluster_gets_only_guest_data(tmp, cache):
    """A 4k write into a cluster past the old end of file writes 4k, not 64k: the rest is a hole that reads zeroes."""
    img = os.path.join(tmp, "fresh.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=65536", img, SIZE)
    vio(img, "write -P 0x5a %d 4096" % (3 * 65536 + 8192), opts=["-t", cache])
    host = host_offset(img, 3 * 65536 + 8192) - 8192
    with open(img, "rb") as f:
        data_at = os.lseek(f.fileno(), host, os.SEEK_DATA)
    assert data_at == host + 8192, "the untouched head of the cluster was written"
    model = RawModel(SIZE)
    model.write(3 * 65536 + 8192, 4096, 0x5a)
    verify(tmp, img, model)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_reused_cluster_reads_zeroes(tmp, cache):
    """A host cluster freed and reused in the same session is not fresh: its old bytes must not show through."""
    img = os.path.join(tmp, "reuse.qcow2")
    cs = 65536
    qimg("create", "-f", "qcow2", "-o", "cluster_size=%d" % cs, img, SIZE)
    # no pass-down of discards: the freed cluster keeps its 0xaa bytes in the file
    opts = ["-t", cache, "-O", "pass-discard-request=off"]
    cmds = ["write -P 0xaa 0 %d" % cs, "write -P 0xbb %d %d" % (cs, cs), "discard 0 %d" % cs,
            "write -P 0x11 %d 4096" % (20 * cs + 4096), "read -P 0 %d 4096" % (20 * cs),
            "read -P 0x11 %d 4096" % (20 * cs + 4096), "read -P 0 %d %d" % (20 * cs + 8192, cs - 8192)]
    vio(img, *cmds, opts=opts)
    # the freed cluster (allocated before the 0xbb one) was the one reused
    assert host_offset(img, 20 * cs) < host_offset(img, cs)
    model = RawModel(SIZE)
    model.write(cs, cs, 0xbb)
    model.write(20 * cs + 4096, 4096, 0x11)
    verify(tmp, img, model, allow_leaks=True)


def test_cluster_below_old_end_is_not_fresh(tmp):
    """After reopening, clusters inside the file (freed earlier, old bytes still there) get their COW zeroes written."""
    img = os.path.join(tmp, "old.qcow2")
    cs = 65536
    qimg("create", "-f", "qcow2", "-o", "cluster_size=%d" % cs, img, SIZE)
    opts = ["-O", "pass-discard-request=off"]
    vio(img, "write -P 0xaa 0 %d" % cs, "write -P 0xbb %d %d" % (cs, cs), "discard 0 %d" % cs, opts=opts)
    vio(img, "write -P 0x22 %d 512" % (30 * cs + 512), "read -P 0 %d 512" % (30 * cs),
        "read -P 0 %d %d" % (30 * cs + 1024, cs - 1024), opts=opts + ["-t", "none"])
    model = RawModel(SIZE)
    model.write(cs, cs, 0xbb)
    model.write(30 * cs + 512, 512, 0x22)
    verify(tmp, img, model, allow_leaks=True)
