# SPDX-License-Identifier: LGPL-2.1-or-later
"""Malformed images give clean errors (naming the field) or are marked corrupt; never a crash or a bad write."""
import os
import struct

import pytest

from conftest import QCOW2_IO, assert_clean, qemu_info, qimg, qio, run, vio

SIZE = 16 << 20


def put(path, off, fmt, *vals):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def get(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def fresh(tmp, name="m.qcow2", opts=None, data=True):
    img = os.path.join(tmp, name)
    args = ["create", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qimg(*(args + [img, SIZE]))
    if data:
        qio(img, "write -P 0x61 0 1M", "write -P 0x62 4M 64k")
    return img


def expect_open_error(img, *words, rw=False):
    p = vio(img, "read 0 512", opts=["-f", "qcow2"] + ([] if rw else ["-r"]), check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    for w in words:
        assert w in p.stderr, p.stderr
    return p


HEADER_CASES = [
    # (description, offset, struct format, value, words expected in the message)
    ("bad magic", 0, ">I", 0x12345678, ["magic"]),
    ("version 1", 4, ">I", 1, ["version"]),
    ("version 4", 4, ">I", 4, ["version"]),
    ("cluster_bits 8", 20, ">I", 8, ["cluster_bits"]),
    ("cluster_bits 22", 20, ">I", 22, ["cluster_bits"]),
    ("cluster_bits huge", 20, ">I", 0xffffffff, ["cluster_bits"]),
    ("encryption", 32, ">I", 1, ["encrypt"]),
    ("huge l1_size", 36, ">I", 0x7fffffff, ["l1_size"]),
    ("l1_size too small", 36, ">I", 0, ["l1_size"]),
    ("unaligned l1", 40, ">Q", 0x30001, ["l1_table_offset"]),
    ("l1 past eof", 40, ">Q", 1 << 40, ["L1 table", "end of the file"]),
    ("l1 at zero", 40, ">Q", 0, ["l1_table_offset"]),
    ("unaligned reftable", 48, ">Q", 0x10008, ["refcount_table_offset"]),
    ("reftable past eof", 48, ">Q", 1 << 40, ["refcount table", "end of the file"]),
    ("reftable clusters 0", 56, ">I", 0, ["refcount_table_clusters"]),
    ("reftable huge", 56, ">I", 0xffffff, ["refcount_table_clusters"]),
    ("many snapshots", 60, ">I", 1 << 30, ["nb_snapshots"]),
    ("unknown incompatible", 72, ">Q", 1 << 40, ["incompatible", "40"]),
    ("data file bit", 72, ">Q", 4, ["external data file"]),
    ("refcount_order 7", 96, ">I", 7, ["refcount_order"]),
    ("header_length 100", 100, ">I", 100, ["header_length"]),
    ("header_length 108", 100, ">I", 108, ["header_length"]),
    ("header_length huge", 100, ">I", 1 << 20, ["header_length"]),
    ("huge size", 24, ">Q", 1 << 62, ["size"]),
    ("backing name too long", 16, ">I", 5000, ["backing_file"]),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header_fields(tmp, case):
    _, off, fmt, val, words = case
    img = fresh(tmp)
    if case[0] == "backing name too long":
        put(img, 8, ">Q", 0x200)
    put(img, off, fmt, val)
    expect_open_error(img, *words)
    expect_open_error(img, *words, rw=True)


def test_compression_type_mismatch(tmp):
    img = fresh(tmp)
    put(img, 104, ">B", 1)
    expect_open_error(img, "compression")
    put(img, 104, ">B", 7)
    put(img, 72, ">Q", 8)
    expect_open_error(img, "compression_type")


def test_truncated_files(tmp):
    img = fresh(tmp)
    for n in (0, 10, 71, 100):
        with open(img, "r+b") as f:
            f.truncate(n)
        expect_open_error(img, "qcow2" if n else "")


def test_extension_too_long(tmp):
    img = fresh(tmp)
    hl = get(img, 100, ">I")[0]
    put(img, hl, ">II", 0xe2792aca, 100000)
    expect_open_error(img, "extension")


def test_backing_loop(tmp):
    a = os.path.join(tmp, "a.qcow2")
    b = os.path.join(tmp, "b.qcow2")
    qimg("create", "-f", "qcow2", a, SIZE)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", a, b, SIZE)
    # make a's backing b: a loop a -> b -> a
    qimg("rebase", "-u", "-F", "qcow2", "-b", b, a)
    p = vio(b, "read 0 512", opts=["-r"], check=False)
    assert p.returncode == 1 and "loop" in p.stderr, p.stderr
    p = vio(a, "read 0 512", check=False)
    assert p.returncode == 1 and "loop" in p.stderr, p.stderr


def test_missing_backing_file(tmp):
    b = os.path.join(tmp, "b.qcow2")
    qimg("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "/nonexistent/x.qcow2", b, SIZE)
    p = vio(b, "read 0 512", opts=["-r"], check=False)
    assert p.returncode == 1 and "x.qcow2" in p.stderr, p.stderr
    # without the backing chain it opens
    vio(b, "read -P 0 0 512", opts=["-r", "-U"])


def l1_entry_off(img, i=0):
    return get(img, 40, ">Q")[0] + 8 * i


def l2_entry_off(img, i=0, l1i=0):
    l1e = get(img, l1_entry_off(img, l1i), ">Q")[0]
    return (l1e & 0x00fffffffffffe00) + 8 * i


def test_unaligned_l2_table_marks_corrupt(tmp):
    img = fresh(tmp)
    off = l1_entry_off(img)
    l1e = get(img, off, ">Q")[0]
    put(img, off, ">Q", l1e | 0x200)  # unaligned L2 offset
    p = vio(img, "read 0 512", check=False)
    assert p.returncode == 1 and "unaligned" in p.stderr, p.stderr
    assert qemu_info(img)["format-specific"]["data"]["corrupt"] is True
    # read/write open is refused now; read-only still opens
    p = vio(img, "info", check=False)
    assert p.returncode == 1 and "corrupt" in p.stderr
    assert '"corrupt":true' in vio(img, "info", opts=["-r"]).stdout.replace(" ", "")


def test_l2_entry_into_header_refuses_write(tmp):
    img = fresh(tmp)
    with open(img, "rb") as f:
        header = f.read(4096)
    # guest cluster 0 -> the refcount table (host 0x10000), COPIED: an in-place write would destroy it
    put(img, l2_entry_off(img, 0), ">Q", (1 << 63) | 0x10000)
    with open(img, "rb") as f:
        f.seek(0x10000)
        reftable = f.read(65536)
    p = vio(img, "write -P 0xee 0 4096", check=False)
    assert p.returncode == 1, p.stderr
    assert "overlaps" in p.stderr
    with open(img, "rb") as f:
        after = f.read(4096)
    # only the corrupt bit changed; nothing was written over the header
    assert after[:72] == header[:72]
    assert after[80:] == header[80:]
    assert struct.unpack(">Q", after[72:80])[0] & 2
    with open(img, "rb") as f:
        f.seek(0x10000)
        assert f.read(65536) == reftable


def test_l2_entry_past_eof_reads_zeroes(tmp):
    img = fresh(tmp)
    put(img, l2_entry_off(img, 3), ">Q", (1 << 63) | (1 << 40))
    vio(img, "read -P 0 196608 65536", opts=["-r"])


def test_garbage_compressed_cluster(tmp):
    raw = os.path.join(tmp, "r.raw")
    img = os.path.join(tmp, "c.qcow2")
    with open(raw, "wb") as f:
        f.write(b"x" * SIZE)
    qimg("convert", "-c", "-O", "qcow2", raw, img)
    e = get(img, l2_entry_off(img, 0), ">Q")[0]
    coff = e & ((1 << 54) - 1)
    put(img, coff, ">Q", 0xdeadbeefdeadbeef)
    p = vio(img, "read 0 512", opts=["-r"], check=False)
    assert p.returncode == 1 and "decompress" in p.stderr, p.stderr
    vio(img, "read -P 0x78 65536 65536", opts=["-r"])


def test_invalid_subcluster_bitmap(tmp):
    img = fresh(tmp, opts="extended_l2=on", data=False)
    qio(img, "write -P 1 0 2k")
    off = get(img, l1_entry_off(img), ">Q")[0] & 0x00fffffffffffe00
    e, bm = get(img, off, ">QQ")
    put(img, off + 8, ">Q", bm | (1 << 32))  # subcluster 0 allocated and zero
    p = vio(img, "read 0 512", check=False)
    assert p.returncode == 1 and "bitmap" in p.stderr, p.stderr


def test_bad_refcount_table_entry(tmp):
    img = fresh(tmp)
    rt = get(img, 48, ">Q")[0]
    put(img, rt, ">Q", get(img, rt, ">Q")[0] | 0x200)
    p = vio(img, "write -P 1 8M 64k", check=False)
    assert p.returncode == 1 and "refblock" in p.stderr, p.stderr
    # the data written earlier is intact
    qio(img, "read -P 0x61 0 1M", extra=["-r"])


def test_refcount_table_moved_onto_other_metadata(tmp):
    # Found by mutation: the reftable offset moved one cluster on, onto the
    # refcount block, so the reftable's entries read 0x1 (reserved bits only).
    # Allocation saw a block there and the refcount update saw none, so it set
    # one up and looked again, forever.  It must fail, marked corrupt, at once.
    img = fresh(tmp, opts="refcount_bits=64")
    put(img, 48, ">Q", get(img, 48, ">Q")[0] + (64 << 10))
    p = vio(img, "write -P 1 8M 64k", check=False)
    assert p.returncode == 1 and "refblock offset 0x1 unaligned" in p.stderr, p.stderr
    assert qemu_info(img)["format-specific"]["data"]["corrupt"]
    qio(img, "read -P 0x61 0 1M", extra=["-r", "-U"])


def test_refcount_overflow_on_snapshot(tmp):
    img = fresh(tmp, opts="refcount_bits=1")
    p = vio(img, "snapshot -c s1", check=False)
    assert p.returncode == 1 and "overflow" in p.stderr, p.stderr
    assert_clean(img)
    qio(img, "read -P 0x61 0 1M", extra=["-r"])


def test_dirty_image_is_repaired(tmp):
    img = fresh(tmp, opts="lazy_refcounts=on")
    # a dirty image with a missing refcount for a used cluster (as a crash with lazy refcounts leaves)
    put(img, 72, ">Q", get(img, 72, ">Q")[0] | 1)
    rt = get(img, 48, ">Q")[0]
    rb = get(img, rt, ">Q")[0]
    l2e = get(img, l2_entry_off(img, 0), ">Q")[0] & 0x00fffffffffffe00
    put(img, rb + 2 * (l2e >> 16), ">H", 0)
    assert qemu_check_corruptions(img) > 0
    vio(img, "read -P 0x61 0 1M")  # read/write open repairs first
    assert_clean(img)
    assert qemu_info(img)["dirty-flag"] is False


def qemu_check_corruptions(img):
    from conftest import qemu_check
    return qemu_check(img).get("corruptions", 0)


def test_snapshot_table_past_eof(tmp):
    img = fresh(tmp)
    qimg("snapshot", "-c", "s", img)
    put(img, 64, ">Q", 1 << 40)
    expect_open_error(img, "snapshot")


def test_snapshot_l1_unaligned(tmp):
    img = fresh(tmp)
    qimg("snapshot", "-c", "s", img)
    so = get(img, 64, ">Q")[0]
    put(img, so, ">Q", get(img, so, ">Q")[0] + 8)
    expect_open_error(img, "snapshot", "aligned")


def test_random_header_garbage_never_crashes(tmp):
    import random
    rnd = random.Random(1234)
    base = fresh(tmp, "base.qcow2")
    with open(base, "rb") as f:
        orig = f.read()
    img = os.path.join(tmp, "g.qcow2")
    for i in range(150):
        data = bytearray(orig)
        for _ in range(rnd.randrange(1, 6)):
            pos = rnd.randrange(0, 128) if rnd.random() < 0.8 else rnd.randrange(0, len(data))
            data[pos] = rnd.randrange(256)
        with open(img, "wb") as f:
            f.write(data)
        # any outcome but a crash or a sanitizer report is fine
        run([QCOW2_IO, "-r", img, "-c", "read 0 64k", "-c", "map"], check=False)
        run([QCOW2_IO, img, "-c", "write -P 1 0 64k", "-c", "read 1M 64k"], check=False)


def test_unknown_header_fields_preserved(tmp):
    img = fresh(tmp)
    with open(img, "rb") as f:
        c0 = bytearray(f.read(65536))
    assert struct.unpack(">I", c0[100:104])[0] == 112
    # header_length 120 with an unknown (non-zero) field, extensions moved behind it
    new = c0[:100] + struct.pack(">I", 120) + c0[104:112] + b"EXTRAFLD" + c0[112:65536 - 8]
    # an unknown auto-clear bit forces a header rewrite on a read/write open
    new[88:96] = struct.pack(">Q", 1 << 9)
    with open(img, "r+b") as f:
        f.write(new)
    vio(img, "write -P 7 0 512")
    with open(img, "rb") as f:
        c1 = f.read(128)
    assert struct.unpack(">I", c1[100:104])[0] == 120
    assert c1[112:120] == b"EXTRAFLD"
    assert struct.unpack(">Q", c1[88:96])[0] == 0
    assert_clean(img)
    qio(img, "read -P 7 0 512", "read -P 0x61 512 1023k", extra=["-r"])


def test_data_cluster_partly_past_eof(tmp):
    img = os.path.join(tmp, "t.qcow2")
    qimg("create", "-f", "qcow2", img, SIZE)
    qio(img, "write -P 0x55 0 64k")
    host = get(img, l2_entry_off(img, 0), ">Q")[0] & 0x00fffffffffffe00
    assert host + 65536 == os.path.getsize(img)
    with open(img, "r+b") as f:
        f.truncate(host + 1000)
    # the lost part reads as zeroes, and an in-place write grows the file again
    vio(img, "read -P 0x55 0 1000", "read -P 0 1000 64536", opts=["-r"])
    vio(img, "write -P 0x56 512 64k", "read -P 0x55 0 512", "read -P 0x56 512 64k")
    assert_clean(img)
    qio(img, "read -P 0x56 512 64k", extra=["-r"])


@pytest.mark.parametrize("where", ["l2-entry", "l1-entry"])
def test_check_reference_far_past_eof(tmp, where):
    """A flipped high bit in an L1/L2 entry is a corruption for check, not a request for a huge table."""
    img = fresh(tmp)
    if where == "l2-entry":
        put(img, l2_entry_off(img, 5), ">Q", (1 << 63) | (0xfd << 40))
    else:
        put(img, l1_entry_off(img, 0), ">Q", (1 << 63) | (0x7f << 48))
    p = vio(img, "check", opts=["-r"], check=False)
    assert p.returncode in (0, 1, 2, 3) and "past the end of the file" in p.stderr, (p.returncode, p.stderr)
    assert qemu_check_corruptions(img) > 0


def test_snapshot_create_old_table_without_refcount(tmp):
    # Found by mutation fuzzing: the old snapshot table's clusters have no
    # refcount, so freeing them fails after the header already points at the
    # new table.  That failure was returned as if nothing had changed: the new
    # table was freed while nb_snapshots counted it (heap overflow, abort).
    # Now the new table is adopted and the old one leaks at worst.
    img = os.path.join(tmp, "c.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    qio(img, "write -P 0x61 0 64k")
    qimg("snapshot", "-c", "s1", img)
    so = get(img, 64, ">Q")[0]
    with open(img, "rb") as f:
        f.seek(so)
        table = f.read(512)
    put(img, 1 << 20, "512s", table)  # a copy far past the refcounted clusters
    put(img, 64, ">Q", 1 << 20)
    p = vio(img, "snapshot -c s2", "snapshot -l")
    assert '"name": "s1"' in p.stdout and '"name": "s2"' in p.stdout, p.stdout
    names = [s["name"] for s in qemu_info(img)["snapshots"]]
    assert names == ["s1", "s2"], names
    assert_clean(img, allow_leaks=True)
    qio(img, "read -P 0x61 0 64k", extra=["-r"])


def test_snapshot_delete_table_without_refcount(tmp):
    # The same on delete: the table went, the error left the in-memory table
    # out of step with nb_snapshots (the deleted snapshot leaked, and could be
    # written back by the next table update).
    img = fresh(tmp)
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x63 0 64k")
    so = get(img, 64, ">Q")[0]
    rb = get(img, get(img, 48, ">Q")[0], ">Q")[0]
    put(img, rb + 2 * (so >> 16), ">H", 0)
    p = vio(img, "snapshot -d s1", "snapshot -l")
    assert p.stdout == "", p.stdout
    assert_clean(img)
    assert "snapshots" not in qemu_info(img)
    qio(img, "read -P 0x63 0 64k", "read -P 0x61 64k 960k", extra=["-r"])


@pytest.mark.parametrize("where", ["l1-entry", "l2-entry", "free-l2-entry"])
def test_check_reserved_bits(tmp, where):
    """Reserved bits in an L1 / L2 entry are a corruption for check, as for qemu-img check (found by fuzzing)."""
    img = fresh(tmp)
    if where == "l1-entry":
        off = l1_entry_off(img)
    else:
        off = l2_entry_off(img, 0 if where == "l2-entry" else 100)
    put(img, off, ">Q", get(img, off, ">Q")[0] | 0x40)
    assert qemu_check_corruptions(img) == 1
    p = vio(img, "check", opts=["-r"])
    assert '"corruptions": 1,' in p.stdout and "reserved bits" in p.stderr, (p.stdout, p.stderr)


def test_snapshot_goto_larger_disk_size_grows_l1(tmp):
    # Found by mutation fuzzing: a snapshot whose disk size needs more L1
    # entries than the image has.  Reverting to it wrote the larger size into
    # the header without growing the L1 table, and neither we nor QEMU could
    # open the image again ("l1_size 4 is too small").
    img = os.path.join(tmp, "s.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")  # an L1 entry per 2 MiB
    qio(img, "write -P 0x61 0 1M")
    qimg("snapshot", "-c", "s1", img)
    so = get(img, 64, ">Q")[0]
    assert get(img, so + 36, ">I")[0] >= 16  # extra data holds the disk size
    put(img, so + 48, ">Q", 32 << 20)
    assert_clean(img)
    vio(img, "snapshot -a s1")
    assert qemu_info(img)["virtual-size"] == 32 << 20
    assert_clean(img)
    vio(img, "write -P 0x62 30M 64k")
    qio(img, "read -P 0x61 0 1M", "read -P 0x62 30M 64k", "read -P 0 31M 1M", extra=["-r"])


def test_empty_backing_name_is_no_backing_file(tmp):
    """backing_file_offset set but backing_file_size 0 (even pointing into the header): no backing file, as QEMU."""
    img = fresh(tmp)
    put(img, 8, ">QI", 0x10, 0)
    assert "backing-filename" not in qemu_info(img)
    p = vio(img, "read -P 0x61 0 1M", "write -P 0x63 2M 64k", opts=["-f", "qcow2"])
    assert p.returncode == 0, p.stderr
    qio(img, "read -P 0x63 2M 64k")
    assert_clean(img)


def test_data_file_extension_without_the_feature_bit_is_ignored(tmp):
    """A data-file name extension without the incompatible bit: the data is in the image (QEMU ignores it too)."""
    img = fresh(tmp)
    name = b"elsewhere.raw"
    ext = struct.pack(">II", 0x44415441, len(name)) + name + b"\0" * (-len(name) % 8)
    (hlen,) = get(img, 100, ">I")
    with open(img, "r+b") as f:  # in front of the extensions qemu-img wrote, which still follow
        f.seek(hlen)
        rest = f.read(4096 - hlen - len(ext))
        f.seek(hlen)
        f.write(ext + rest)
    qio(img, "read -P 0x61 0 1M")
    p = vio(img, "read -P 0x61 0 1M", "write -P 0x64 3M 4k", opts=["-f", "qcow2"])
    assert p.returncode == 0, p.stderr
    qio(img, "read -P 0x64 3M 4k")
    assert_clean(img)
