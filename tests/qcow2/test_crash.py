# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash safety: cut the writes reaching the file after the Nth and check what is left.

qcow2-io wraps the file in the blkdrop filter when VDISK_FAULT_DROP_WRITES_AFTER=N
is set: the first N writes reach the file, every later one is silently lost, and
the program exits without closing.  For every N the image must have no
corruption (leaks are allowed) and everything a completed flush covered must
read back, with qemu-img / qemu-io.
"""
import os
import random
import shutil

import pytest

from conftest import QCOW2_IO, assert_clean, qemu_check, qimg, qio, run, vio

SIZE = 16 << 20


def workload(rng, cs, n=24):
    """(commands, expectations): expectations[i] = (off, len, pattern) for the i-th command."""
    cmds, expect = [], []
    slots = list(range(0, SIZE // (4 * cs)))
    rng.shuffle(slots)
    for i in range(n):
        base = slots[i] * 4 * cs
        kind = rng.random()
        if kind < 0.15:
            off, length = base, 2 * cs
            cmds.append("zero -u %d %d" % (off, length))
            expect.append((off, length, 0))
        else:
            off = base + rng.randrange(0, cs)
            length = rng.randrange(1, 3 * cs)
            cmds.append("write -P %d %d %d" % (i + 1, off, length))
            expect.append((off, length, i + 1))
        if rng.random() < 0.35:
            cmds.append("flush")
            expect.append(None)
    cmds.append("flush")
    expect.append(None)
    return cmds, expect


def run_cut(img, cmds, n, opts=()):
    args = [QCOW2_IO] + list(opts) + [img]
    for c in cmds:
        args += ["-c", c]
    p = run(args, check=False, env={"VDISK_FAULT_DROP_WRITES_AFTER": str(n)})
    assert p.returncode == 0, p.stderr
    vals = dict(line.split() for line in p.stdout.splitlines() if line.strip())
    return int(vals["durable-upto"]), int(vals["writes-seen"])


def check_image(img, cmds, expect, durable, lazy):
    if lazy:
        # refcounts may lag behind with lazy refcounts: opening read/write repairs them
        vio(img, "flush")
    r = qemu_check(img)
    assert r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, r
    reads = []
    for i in range(durable):
        if expect[i] is not None:
            off, length, pat = expect[i]
            reads.append("read -P %d %d %d" % (pat, off, length))
    for i in range(0, len(reads), 30):
        qio(img, *reads[i:i + 30], extra=["-r"])
    # and the survivor is usable: our own repair leaves it clean
    vio(img, "check -r all")
    assert_clean(img)


VARIANTS = {
    "plain-64k": dict(create="cluster_size=65536", cs=65536),
    "small-512": dict(create="cluster_size=512,refcount_bits=64", cs=512),
    "extl2": dict(create="cluster_size=65536,extended_l2=on", cs=65536, backing=True),
    "backing": dict(create="cluster_size=4096", cs=4096, backing=True),
    "snapshot": dict(create="cluster_size=4096", cs=4096, snapshot=True),
    "lazy": dict(create="cluster_size=65536,lazy_refcounts=on", cs=65536, lazy=True),
    "v2": dict(create="cluster_size=65536,compat=0.10", cs=65536),
    "tiny-cache": dict(create="cluster_size=4096", cs=4096, opts=["-O", "l2-cache-size=8k,refcount-cache-size=16k"]),
    "compressed": dict(create="cluster_size=4096,compression_type=zstd", cs=4096,
                       opts=["-O", "compress-writes=on"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_drop_writes_after_n(tmp, variant):
    v = VARIANTS[variant]
    rng = random.Random(hash(variant) & 0xffff)
    template = os.path.join(tmp, "template.qcow2")
    img = os.path.join(tmp, "img.qcow2")
    args = ["create", "-f", "qcow2", "-o", v["create"]]
    if v.get("backing"):
        base = os.path.join(tmp, "base.qcow2")
        qimg("create", "-f", "qcow2", base, SIZE)
        qio(base, "write -P 0xbb 0 %d" % SIZE)
        args += ["-F", "qcow2", "-b", base]
    qimg(*(args + [template, SIZE]))
    if v.get("snapshot"):
        qio(template, "write -P 0xcc 0 %d" % SIZE)
        qimg("snapshot", "-c", "before", template)
    cmds, expect = workload(rng, v["cs"])
    shutil.copy(template, img)
    _, total = run_cut(img, cmds, 1 << 30, v.get("opts", ()))
    assert total > 0
    points = sorted(set(list(range(0, min(total, 40))) + [int(total * f / 60) for f in range(60)] + [total]))
    # QCOW2_CRASH_STRIDE=k keeps every k-th crash point (and the last): the
    # sanitizer build runs a thinner sweep of the same workloads.
    stride = max(1, int(os.environ.get("QCOW2_CRASH_STRIDE", "1")))
    points = sorted(set(points[::stride] + [total]))
    for n in points:
        shutil.copy(template, img)
        durable, seen = run_cut(img, cmds, n, v.get("opts", ()))
        check_image(img, cmds, expect, durable, v.get("lazy", False))
