# SPDX-License-Identifier: LGPL-2.1-or-later
"""Seeded mutation fuzzing of the qcow2 driver.

Seed images are made by qemu-img / qemu-io (snapshots, zero clusters,
discards, extended L2, refcount_bits=1 and 64, zlib and zstd compression, a
backing chain, lazy refcounts with 2 MiB clusters, compat=0.10).  A small
header parser finds the metadata of each seed; every case takes one seed,
applies one to four mutations drawn from random.Random("<base seed>:<case>")
to the header, extensions, L1 / L2 tables, refcount table / blocks, snapshot
table and the file length, and drives the mutant through qcow2-io and the
vdisk CLI: reads, map, info, check, convert, snapshot list, then writes
(plain, compressed), write-zeroes and discards (some of them concurrent),
snapshot create / apply / delete, resize and check -r all.

A case fails on a crash (a signal, or an exit status the program does not
document), a hang (the per-command timeout), a sanitizer report, an error
exit without a message, or lost data: when qemu-img check finds no
corruption in the mutant (leaks are fine), it must find none after vdisk's
writes either, and qemu-io must read back what vdisk wrote.

Environment:
  VDISK_FUZZ_CASES=N   number of cases (default 150); raise it for long runs
  VDISK_FUZZ_SEED=S    base seed (default 0): another S, another set of mutants
  VDISK_FUZZ_TIMEOUT=T seconds a single command may take (default 60)
  VDISK_FUZZ_KEEP=DIR  where failing mutants are copied (default: fuzz-failures/
                       next to qcow2-io in the build directory)
A failure names the case, the seed image, the mutations and the command,
and keeps the unmodified mutant (case<N>-seed<S>-<seed image>.qcow2; the
backing seed's base stays in pytest's tmp dir).  `pytest test_fuzz.py -k
case0042` with the same VDISK_FUZZ_SEED makes the same mutant and runs that
case again (VDISK_FUZZ_CASES must be above 42).
"""
import json
import os
import random
import shutil
import struct
import subprocess

import pytest

from conftest import QCOW2_IO, QEMU_IMG, QEMU_IO, qimg, qio

CASES = int(os.environ.get("VDISK_FUZZ_CASES", "150"))
BASE_SEED = os.environ.get("VDISK_FUZZ_SEED", "0")
TIMEOUT = float(os.environ.get("VDISK_FUZZ_TIMEOUT", "60"))


def _find_vdisk():
    env = os.environ.get("VDISK_TOOL")
    if env:
        return env
    if QCOW2_IO:
        p = os.path.join(os.path.dirname(QCOW2_IO), "..", "..", "tools", "vdisk")
        if os.path.exists(p):
            return os.path.normpath(p)
    return None


VDISK = _find_vdisk()
KEEP_DIR = os.environ.get("VDISK_FUZZ_KEEP") or (QCOW2_IO and os.path.join(os.path.dirname(QCOW2_IO), "fuzz-failures"))

pytestmark = pytest.mark.skipif(not (QCOW2_IO and QEMU_IMG and QEMU_IO),
                                reason="qcow2-io, qemu-img or qemu-io missing")

# ---- seed images -------------------------------------------------------------------------

MiB = 1 << 20

# name: (size, create options, qemu-io commands, snapshots made along the way)
# Each command list is run in order; "snap NAME" makes an internal snapshot.
SEEDS = {
    "snapshots": (4 * MiB, "", [
        "write -P 0x11 0 1M", "write -z 1M 128k", "snap s1",
        "write -P 0x12 512k 256k", "discard 2M 64k", "write -P 0x13 2M 512k", "snap s2",
        "write -P 0x14 3M 64k", "discard 0 64k", "write -z 3M 32k"]),
    "small-clusters": (8 * MiB, "cluster_size=4096", [
        "write -P 0x21 0 300k", "write -P 0x22 2M 100k", "write -P 0x23 4100k 64k",
        "snap s1", "write -P 0x24 6M 1M", "write -z 6M 8k", "discard 6200k 12k", "write -P 0x25 100k 3k"]),
    "extended-l2": (4 * MiB, "extended_l2=on", [
        "write -P 0x31 0 5k", "write -P 0x32 70k 2k", "write -z 64k 4k", "write -P 0x33 1M 200k",
        "discard 1M 32k", "snap s1", "write -P 0x34 3k 7k", "write -z 1M 128k"]),
    "refcount1": (4 * MiB, "refcount_bits=1,cluster_size=4096", [
        "write -P 0x41 0 256k", "write -P 0x42 1M 64k", "discard 64k 64k", "write -z 2M 64k"]),
    "refcount64": (4 * MiB, "refcount_bits=64", [
        "write -P 0x51 0 512k", "snap s1", "write -P 0x52 256k 64k", "write -z 1M 1M"]),
    "zlib": (4 * MiB, "", [
        "write -c -P 0x61 0 64k", "write -c -P 0x62 64k 64k", "write -c -P 0x63 1M 64k",
        "write -P 0x64 2M 128k", "write -z 3M 64k", "snap s1", "write -P 0x65 1M 4k"]),
    "zstd": (4 * MiB, "compression_type=zstd", [
        "write -c -P 0x71 0 64k", "write -c -P 0x72 128k 64k", "write -P 0x73 1M 256k",
        "write -c -P 0x74 2M 64k"]),
    "backing": (4 * MiB, "BACKING", [
        "write -P 0x82 64k 64k", "write -z 1M 64k", "write -P 0x83 1100k 10k", "discard 2M 64k",
        "write -P 0x84 3M 64k"]),
    "lazy-2m": (8 * MiB, "lazy_refcounts=on,cluster_size=2M", [
        "write -P 0x91 0 100k", "write -P 0x92 2M 2M", "write -P 0x93 5M 4k", "write -z 6M 1M"]),
    "v2": (4 * MiB, "compat=0.10", [
        "write -P 0xa1 0 512k", "snap s1", "write -P 0xa2 64k 64k", "write -z 1M 64k",
        "write -P 0xa3 2M 100k"]),
}
SEED_NAMES = list(SEEDS)


def _zstd_supported(tmp):
    p = subprocess.run([QEMU_IMG, "create", "-f", "qcow2", "-o", "compression_type=zstd",
                        os.path.join(tmp, "zstd-probe.qcow2"), "1M"], capture_output=True)
    return p.returncode == 0


def _make_seed(tmp, name):
    size, opts, cmds = SEEDS[name]
    img = os.path.join(tmp, name + ".qcow2")
    args = ["create", "-f", "qcow2"]
    if opts == "BACKING":
        base = os.path.join(tmp, name + "-base.qcow2")
        qimg("create", "-f", "qcow2", base, size)
        qio(base, "write -P 0x81 0 2M", "write -P 0x85 3M 1M")
        args += ["-F", "qcow2", "-b", base]
    elif opts:
        args += ["-o", opts]
    qimg(*(args + [img, size]))
    batch = []
    for c in cmds + ["snap"]:
        if c.startswith("snap"):
            if batch:
                qio(img, *batch)
                batch = []
            if c != "snap":
                qimg("snapshot", "-c", c.split()[1], img)
        else:
            batch.append(c)
    # Snapshot dates and clocks are the only part that differs between runs:
    # fix them, so that a case is the same mutant every time.
    with open(img, "r+b") as f:
        data = bytearray(f.read())
        lay = Layout(data)
        for sn in lay.snapshots:
            data[sn["off"] + 16:sn["off"] + 32] = struct.pack(">IIQ", 1700000000, 0, 0)
        f.seek(0)
        f.write(data)
    return img


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fuzz-seeds"))
    out = {}
    for name in SEED_NAMES:
        if name == "zstd" and not _zstd_supported(d):
            continue
        img = _make_seed(d, name)
        with open(img, "rb") as f:
            data = f.read()
        out[name] = (img, data, Layout(data))
    return out


# ---- a small qcow2 layout parser (seeds are well-formed) ----------------------------------

OFF_MASK = 0x00fffffffffffe00
COPIED = 1 << 63
COMPRESSED = 1 << 62

HEADER_FIELDS = [
    # name, offset, struct format, is an offset
    ("magic", 0, ">I", False), ("version", 4, ">I", False),
    ("backing_file_offset", 8, ">Q", True), ("backing_file_size", 16, ">I", False),
    ("cluster_bits", 20, ">I", False), ("size", 24, ">Q", False), ("crypt_method", 32, ">I", False),
    ("l1_size", 36, ">I", False), ("l1_table_offset", 40, ">Q", True),
    ("refcount_table_offset", 48, ">Q", True), ("refcount_table_clusters", 56, ">I", False),
    ("nb_snapshots", 60, ">I", False), ("snapshots_offset", 64, ">Q", True),
]
HEADER_FIELDS_V3 = [
    ("incompatible_features", 72, ">Q", False), ("compatible_features", 80, ">Q", False),
    ("autoclear_features", 88, ">Q", False), ("refcount_order", 96, ">I", False),
    ("header_length", 100, ">I", False), ("compression_type", 104, ">B", False),
]
EXT_TYPES = [0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441, 0x12345678]


class Layout:
    """Where a seed's metadata is, and what it references."""

    def __init__(self, data):
        u = lambda off, fmt: struct.unpack_from(fmt, data, off)[0]
        self.file_size = len(data)
        self.version = u(4, ">I")
        self.cluster_bits = u(20, ">I")
        self.cs = 1 << self.cluster_bits
        self.size = u(24, ">Q")
        self.fields = HEADER_FIELDS + (HEADER_FIELDS_V3 if self.version >= 3 else [])
        self.hdr_len = u(100, ">I") if self.version >= 3 else 72
        incompat = u(72, ">Q") if self.version >= 3 else 0
        self.extl2 = bool(incompat & 16)
        self.rc_bits = 1 << (u(96, ">I") if self.version >= 3 else 4)
        self.backing = (u(8, ">Q"), u(16, ">I"))
        # header extensions: (offset, type, length)
        self.exts = []
        off = self.hdr_len
        while off + 8 <= self.cs:
            t, n = struct.unpack_from(">II", data, off)
            self.exts.append((off, t, n))
            if t == 0:
                break
            off += 8 + ((n + 7) & ~7)
        self.l1 = (u(40, ">Q"), u(36, ">I"))
        self.reftable = (u(48, ">Q"), u(56, ">I") * self.cs)
        self.refblocks = [e & ~0x1ff for e in self.entries(data, *self.reftable) if e]
        self.snapshots = []
        off = u(64, ">Q")
        for _ in range(u(60, ">I")):
            l1o, l1n, idn, nn, _, _, _, _, extra = struct.unpack_from(">QIHHIIQII", data, off)
            name = bytes(data[off + 40 + extra + idn:off + 40 + extra + idn + nn]).decode()
            self.snapshots.append({"off": off, "l1": (l1o, l1n), "extra": extra, "name": name,
                                   "id": off + 40 + extra, "name_off": off + 40 + extra + idn})
            off += (40 + extra + idn + nn + 7) & ~7
        self.snaptable = (u(64, ">Q"), off - u(64, ">Q"))
        self.l2s, self.data_clusters, self.compressed = [], set(), set()
        for l1o, l1n in [self.l1] + [s["l1"] for s in self.snapshots]:
            for e in self.entries(data, l1o, l1n * 8):
                l2 = e & OFF_MASK
                if l2 and l2 not in self.l2s:
                    self.l2s.append(l2)
        esz = 16 if self.extl2 else 8
        for l2 in self.l2s:
            for i in range(0, self.cs, esz):
                e = u(l2 + i, ">Q")
                if e & COMPRESSED:
                    self.compressed.add(e & ((1 << (62 - (self.cluster_bits - 8))) - 1))
                elif e & OFF_MASK:
                    self.data_clusters.add(e & OFF_MASK)
        self.metadata = sorted({0, self.l1[0], self.reftable[0], self.snaptable[0]} | set(self.refblocks) |
                               set(self.l2s) | {s["l1"][0] for s in self.snapshots})

    @staticmethod
    def entries(data, off, length):
        return [struct.unpack_from(">Q", data, off + i)[0] for i in range(0, length, 8)]


# ---- mutations ---------------------------------------------------------------------------


class Mutator:
    """Changes to a copy of a seed, each logged as what, where, old -> new."""

    def __init__(self, rng, data, lay):
        self.rng, self.data, self.lay = rng, data, lay
        self.log = []

    def get(self, off, fmt):
        return struct.unpack_from(fmt, self.data, off)[0]

    def put(self, off, fmt, val, what):
        old = self.get(off, fmt)
        struct.pack_into(fmt, self.data, off, val)
        self.log.append("%s @%#x: %#x -> %#x" % (what, off, old, val))

    def interesting(self, old, bits, is_offset=False):
        """A value for a field of this width: boundaries, bit flips, other structures."""
        r, lay = self.rng, self.lay
        top = (1 << bits) - 1
        choices = [0, 1, top, top >> 1, old ^ (1 << r.randrange(bits)), old + 1, old - 1, old * 2,
                   old >> 1, 1 << r.randrange(bits), r.getrandbits(bits)]
        if is_offset or bits == 64:
            choices += [r.choice(lay.metadata), r.choice(lay.metadata) + r.choice([8, 512, lay.cs]),
                        lay.file_size, lay.file_size + lay.cs, old + lay.cs, old - lay.cs, old + 512]
        return r.choice(choices) & top

    def table_entry(self, off, what, flags_mask):
        """Mutate the 64-bit table entry at off (L1, L2, reftable, snapshot L1)."""
        r, lay = self.rng, self.lay
        old = self.get(off, ">Q")
        flags = old & ~OFF_MASK & flags_mask
        k = r.randrange(9)
        if k == 0:
            new = 0
        elif k == 1:
            new = old ^ (1 << r.randrange(64))
        elif k == 2:
            new = old ^ r.choice([COPIED, COMPRESSED, 1])
        elif k == 3:
            new = flags | r.choice(lay.metadata)
        elif k == 4:
            new = flags | ((old & OFF_MASK) + r.choice([512, 8 * 512, lay.cs // 2 or 512]))
        elif k == 5:
            new = flags | ((lay.file_size + lay.cs * r.randrange(0, 4)) & OFF_MASK)
        elif k == 6 and lay.data_clusters:
            new = (old & ~OFF_MASK) | r.choice(sorted(lay.data_clusters))
        elif k == 7:
            new = flags | (r.getrandbits(56) & OFF_MASK)
        else:
            new = self.interesting(old, 64)
        self.put(off, ">Q", new & ((1 << 64) - 1), what)

    def pick_entry(self, off, length, esz=8):
        """An entry offset in the table, mostly one that is in use."""
        used = [off + i for i in range(0, length, esz) if self.get(off + i, ">Q")]
        if used and self.rng.random() < 0.8:
            return self.rng.choice(used)
        return off + self.rng.randrange(max(length // esz, 1)) * esz

    def bytes_in(self, off, length, what):
        r = self.rng
        pos = off + r.randrange(max(length, 1))
        if pos >= len(self.data):
            return
        old = self.data[pos]
        k = r.randrange(3)
        new = old ^ (1 << r.randrange(8)) if k == 0 else r.choice([0, 0xff, r.randrange(256)])
        self.data[pos] = new
        self.log.append("%s byte @%#x: %#x -> %#x" % (what, pos, old, new))

    # one method per target ----------------------------------------------------------

    def header(self):
        name, off, fmt, is_off = self.rng.choice(self.lay.fields)
        bits = struct.calcsize(fmt) * 8
        old = self.get(off, fmt)
        if name.endswith("features") and self.rng.random() < 0.7:
            new = old ^ (1 << self.rng.choice([0, 1, 2, 3, 4, 5, self.rng.randrange(64)]))
        elif name == "cluster_bits":
            new = self.rng.choice([8, 9, 12, 16, 21, 22, 31, old + 1, old - 1])
        elif name == "refcount_order":
            new = self.rng.randrange(8)
        else:
            new = self.interesting(old, bits, is_off)
        self.put(off, fmt, new & ((1 << bits) - 1), "header." + name)

    def header_bytes(self):
        self.bytes_in(0, self.lay.hdr_len, "header")

    def extension(self):
        r, lay = self.rng, self.lay
        off, t, n = r.choice(lay.exts)
        k = r.randrange(4)
        if k == 0:
            self.put(off, ">I", r.choice(EXT_TYPES + [0, r.getrandbits(32)]), "ext.type")
        elif k == 1:
            self.put(off + 4, ">I", r.choice([0, 1, n + 1, n + 8, n - 1, lay.cs, 0xffffffff, r.getrandbits(16)])
                     & 0xffffffff, "ext.len")
        elif k == 2 and t == 0:
            # a new extension in place of the end marker
            n = r.choice([0, 4, 8, 16, 24, 48, 100])
            if off + 16 + n <= lay.cs:
                body = bytes(r.getrandbits(8) for _ in range(n))
                blob = struct.pack(">II", r.choice(EXT_TYPES), n) + body + bytes(-n % 8) + bytes(8)
                self.data[off:off + len(blob)] = blob
                self.log.append("ext added @%#x: %s" % (off, blob[:16].hex()))
        else:
            self.bytes_in(off + 8, max(n, 8), "ext.data")

    def backing_name(self):
        off, n = self.lay.backing
        self.bytes_in(off, n, "backing name")

    def l1(self):
        off, n = self.lay.l1
        self.table_entry(self.pick_entry(off, n * 8), "L1", COPIED)

    def l2(self):
        lay, r = self.lay, self.rng
        l2 = r.choice(lay.l2s)
        esz = 16 if lay.extl2 else 8
        e = self.pick_entry(l2, lay.cs, esz)
        if lay.extl2 and r.random() < 0.4:
            bm = self.get(e + 8, ">Q")
            new = r.choice([0, (1 << 64) - 1, bm ^ (1 << r.randrange(64)), bm << 32, bm | (bm << 32),
                            (bm ^ 0xffffffff) & 0xffffffff, r.getrandbits(64)])
            self.put(e + 8, ">Q", new & ((1 << 64) - 1), "L2 bitmap")
        elif self.get(e, ">Q") & COMPRESSED and r.random() < 0.5:
            shift = 62 - (lay.cluster_bits - 8)
            old = self.get(e, ">Q")
            sectors = r.choice([0, 1, (1 << (lay.cluster_bits - 8)) - 1, ((old >> shift) + 1)])
            new = (old & ~(((1 << (lay.cluster_bits - 8)) - 1) << shift)) | (
                (sectors & ((1 << (lay.cluster_bits - 8)) - 1)) << shift)
            if r.random() < 0.5:
                new = (new & ~((1 << shift) - 1)) | (r.choice([lay.file_size - 10, lay.file_size + 4096,
                                                               r.choice(lay.metadata) + 100]) & ((1 << shift) - 1))
            self.put(e, ">Q", new, "L2 compressed")
        else:
            self.table_entry(e, "L2", COPIED | COMPRESSED | 1)

    def l2_bytes(self):
        self.bytes_in(self.rng.choice(self.lay.l2s), self.lay.cs, "L2")

    def reftable(self):
        off, n = self.lay.reftable
        self.table_entry(self.pick_entry(off, n), "reftable", 0)

    def refblock(self):
        lay, r = self.lay, self.rng
        rb = r.choice(lay.refblocks)
        bits = lay.rc_bits
        per = lay.cs * 8 // bits
        # mostly a cluster that is in use
        first = lay.refblocks.index(rb) * per
        nclusters = (lay.file_size + lay.cs - 1) // lay.cs
        i = r.randrange(max(min(per, nclusters - first), 1)) if r.random() < 0.8 else r.randrange(per)
        top = (1 << bits) - 1
        if bits >= 8:
            fmt = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[bits]
            off = rb + i * bits // 8
            old = self.get(off, fmt)
            self.put(off, fmt, r.choice([0, 1, 2, old + 1, old - 1, top, top - 1]) & top,
                     "refcount[%d]" % (first + i))
        else:
            off, sh = rb + i * bits // 8, (i * bits) % 8
            old = self.data[off]
            v = r.randrange(top + 1)
            new = (old & ~(top << sh)) | (v << sh)
            self.put(off, ">B", new & 0xff, "refcount[%d]" % (first + i))

    def snaptable(self):
        lay, r = self.lay, self.rng
        sn = r.choice(lay.snapshots)
        o = sn["off"]
        fields = [("l1_table_offset", 0, ">Q", True), ("l1_size", 8, ">I", False), ("id_size", 12, ">H", False),
                  ("name_size", 14, ">H", False), ("vm_state_size", 32, ">I", False),
                  ("extra_size", 36, ">I", False)]
        if sn["extra"] >= 16:
            fields += [("vm_state_size_large", 40, ">Q", False), ("disk_size", 48, ">Q", False)]
        if r.random() < 0.25:
            self.bytes_in(sn["id"], sn["name_off"] - sn["id"] + 4, "snapshot id/name")
            return
        name, fo, fmt, is_off = r.choice(fields)
        bits = struct.calcsize(fmt) * 8
        old = self.get(o + fo, fmt)
        if name == "disk_size" and r.random() < 0.5:
            new = r.choice([0, lay.size // 2, lay.size + 512, lay.size * 4, 1 << 62])
        else:
            new = self.interesting(old, bits, is_off)
        self.put(o + fo, fmt, new & ((1 << bits) - 1), "snapshot." + name)

    def snap_l1(self):
        sn = self.rng.choice(self.lay.snapshots)
        off, n = sn["l1"]
        self.table_entry(self.pick_entry(off, n * 8), "snapshot L1", COPIED)

    def compressed_data(self):
        self.bytes_in(self.rng.choice(sorted(self.lay.compressed)), 64, "compressed data")

    def file_length(self):
        r, lay = self.rng, self.lay
        n = r.choice([r.randrange(lay.cs, len(self.data)), (r.randrange(len(self.data)) // lay.cs) * lay.cs,
                      len(self.data) - r.choice([1, 512, lay.cs]), len(self.data) + r.choice([1, 4096, lay.cs])])
        n = max(n, 512)
        if n < len(self.data):
            del self.data[n:]
        else:
            self.data += bytes(r.getrandbits(8) for _ in range(min(n - len(self.data), 4096)))
            self.data += bytes(n - len(self.data))
        self.log.append("file length %#x -> %#x" % (lay.file_size, n))

    def targets(self):
        lay = self.lay
        t = [(self.header, 18), (self.header_bytes, 4), (self.extension, 7), (self.l1, 10), (self.l2, 20),
             (self.l2_bytes, 4), (self.reftable, 10), (self.refblock, 14), (self.file_length, 2)]
        if lay.backing[0]:
            t.append((self.backing_name, 3))
        if lay.snapshots:
            t += [(self.snaptable, 10), (self.snap_l1, 5)]
        if lay.compressed:
            t.append((self.compressed_data, 5))
        return t

    def mutate(self):
        t = self.targets()
        n = self.rng.choice([1] * 6 + [2] * 3 + [3, 4])
        picked = self.rng.choices([f for f, _ in t], [w for _, w in t], k=n)
        # a new file length comes last: the others use the seed's offsets
        for f in sorted(picked, key=lambda f: f == self.file_length):
            f()
        return self.data


# ---- running the tools -------------------------------------------------------------------


class Failure(Exception):
    pass


class Case:
    def __init__(self, idx, name, tmp, mutations):
        self.idx, self.name, self.tmp, self.mutations = idx, name, tmp, mutations

    def fail(self, what, args=None, p=None):
        msg = ["case %d (VDISK_FUZZ_SEED=%s), seed image %s: %s" % (self.idx, BASE_SEED, self.name, what),
               "mutations:"] + ["  " + m for m in self.mutations]
        if args:
            msg.append("command: %s" % " ".join(map(str, args)))
        if p is not None:
            msg += ["exit status: %s" % p.returncode, "stdout: %s" % p.stdout[-2000:],
                    "stderr: %s" % p.stderr[-4000:]]
        msg.append("mutant kept as %s" % self.keep())
        raise Failure("\n".join(msg))

    def keep(self):
        """Copy the mutant where the next pytest run does not remove it."""
        src = os.path.join(self.tmp, "mutant.qcow2")
        d = KEEP_DIR or self.tmp
        try:
            os.makedirs(d, exist_ok=True)
            dst = os.path.join(d, "case%04d-seed%s-%s.qcow2" % (self.idx, BASE_SEED, self.name))
            shutil.copyfile(src, dst)
            return dst
        except OSError:
            return src

    def run(self, args, codes=(0, 1)):
        args = [str(a) for a in args]
        try:
            p = _run(args)
        except subprocess.TimeoutExpired:
            self.fail("hang (no exit after %g s)" % TIMEOUT, args)
        if p.returncode < 0:
            self.fail("killed by signal %d" % -p.returncode, args, p)
        if "ERROR: AddressSanitizer" in p.stderr or "runtime error:" in p.stderr or "LeakSanitizer" in p.stderr:
            self.fail("sanitizer report", args, p)
        if p.returncode not in codes:
            self.fail("undocumented exit status %d" % p.returncode, args, p)
        if p.returncode == 1 and not p.stderr.strip():
            self.fail("failed without a message", args, p)
        return p


class Model:
    """What reads must return where vdisk wrote: sorted (start, end, byte) runs."""

    def __init__(self):
        self.runs = []

    def set(self, a, b, v):
        out = []
        for s, e, x in self.runs:
            if e <= a or s >= b:
                out.append((s, e, x))
                continue
            if s < a:
                out.append((s, a, x))
            if e > b:
                out.append((b, e, x))
        if v is not None and b > a:
            out.append((a, b, v))
        self.runs = sorted(out)

    def copy(self):
        m = Model()
        m.runs = list(self.runs)
        return m


def random_range(rng, size, cs):
    if rng.random() < 0.4:
        off = rng.randrange(size // cs) * cs
        length = cs * rng.randint(1, 3)
    else:
        length = rng.randrange(1, 256) * 512 if rng.random() < 0.7 else rng.randrange(1, 200000)
        off = rng.randrange(max(size - length, 1))
        if rng.random() < 0.5:
            off &= ~511
    return off, min(length, size - off)


def write_ops(rng, size, cs, n):
    """qcow2-io commands and how each changes the model (byte, or None: unknown)."""
    ops = []
    for _ in range(n):
        off, length = random_range(rng, size, cs)
        pat = rng.randrange(1, 256)
        k = rng.random()
        if k < 0.45:
            ops.append(("write -P %d %d %d" % (pat, off, length), off, length, pat))
        elif k < 0.6:
            off = rng.randrange(size // cs) * cs
            ops.append(("write -c -P %d %d %d" % (pat, off, cs), off, cs, pat))
        elif k < 0.8:
            ops.append(("zero %s%d %d" % (rng.choice(["", "-u "]), off, length), off, length, 0))
        else:
            ops.append(("discard %d %d" % (off, length), off, length, None))
    return ops


MARK = "stats"


def _run(args):
    return subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace", timeout=TIMEOUT)


def qemu_check(img):
    """qemu-img check's JSON result; {} when it could not check, None when qemu-img crashed."""
    try:
        p = _run([QEMU_IMG, "check", "--output=json", img])
    except subprocess.TimeoutExpired:
        return None
    if p.returncode < 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {}


def run_case(idx, seeds, tmp):
    rng = random.Random("vdisk-qcow2-fuzz:%s:%d" % (BASE_SEED, idx))
    name = SEED_NAMES[idx % len(SEED_NAMES)]
    if name not in seeds:
        pytest.skip("seed %s not available" % name)
    _, seed_data, lay = seeds[name]
    m = Mutator(rng, bytearray(seed_data), lay)
    data = m.mutate()
    mutant = os.path.join(tmp, "mutant.qcow2")
    work = os.path.join(tmp, "work.qcow2")
    with open(mutant, "wb") as f:
        f.write(data)
    shutil.copyfile(mutant, work)
    case = Case(idx, name, tmp, m.log)
    size, cs = SEEDS[name][0], lay.cs

    before = qemu_check(work)
    if before is None:
        return  # qemu-img itself could not cope
    clean = "check-errors" in before and before.get("corruptions", 0) == 0 and before.get("check-errors", 0) == 0

    # read-only: qcow2-io, in a random order (a failing command ends the run)
    ro = ["info", "snapshot -l", "map", "check", "read 0 %d" % size, "read %d 4096" % rng.randrange(size)]
    rng.shuffle(ro)
    fmt = ["-f", "qcow2"] if rng.random() < 0.8 else []
    case.run([QCOW2_IO, "-r"] + fmt + [work] + [x for c in ro for x in ("-c", c)])

    # read-only: the vdisk CLI
    if VDISK:
        cli = [(["info", "--output=json"], (0, 1)), (["check", "--output=json"], (0, 1, 2, 3, 63)),
               (["map", "--output=json"], (0, 1)), (["snapshot", "-l"], (0, 1)),
               (["convert", "-O", "raw"], (0, 1))]
        for sub, codes in rng.sample(cli, 2):
            extra = [os.path.join(tmp, "out.raw")] if sub[0] == "convert" else []
            case.run([VDISK] + sub + [work] + extra, codes)

    # read/write: seed snapshot operations, writes, then a snapshot round trip
    model = Model()
    cmds = []
    effects = []  # per command: list of (off, len, byte-or-None), or "snap", "revert"
    if lay.snapshots and rng.random() < 0.3:
        sn = rng.choice(lay.snapshots)["name"]
        cmds.append(rng.choice(["snapshot -a %s" % sn, "snapshot -d %s" % sn, "snapshot -d 1"]))
        effects.append([])
    ops = write_ops(rng, size, cs, rng.randint(2, 6))
    while ops:
        # sometimes a few at once: concurrent requests on the damaged metadata
        n = rng.choice([1, 1, 2, 3])
        group, ops = ops[:n], ops[n:]
        if len(group) == 1:
            cmds.append(group[0][0])
            effects.append([group[0][1:]])
            continue
        cmds.append("parallel " + "; ".join(g[0] for g in group))
        spans = sorted((off, off + length) for _, off, length, _ in group)
        overlap = any(a[1] > b[0] for a, b in zip(spans, spans[1:]))
        effects.append([(off, length, None if overlap else v) for _, off, length, v in group])
    if name != "refcount1" or rng.random() < 0.2:
        cmds.append("snapshot -c fz")
        effects.append("snap")
        for c, off, length, v in write_ops(rng, size, cs, rng.randint(1, 3)):
            cmds.append(c)
            effects.append([(off, length, v)])
        cmds += ["snapshot -a fz", "snapshot -d fz"]
        effects += ["revert", []]
    args = [QCOW2_IO, "-f", "qcow2", work]
    for c in cmds:
        args += ["-c", c, "-c", MARK]
    p = case.run(args)
    done = p.stdout.count('{"file-reads"')
    saved = None
    pending = []  # ranges written since the snapshot: unknown if the revert fails
    for i, eff in enumerate(effects):
        ok = i < done
        if i > done:
            break
        if eff == "snap":
            if ok:
                saved = model.copy()
        elif eff == "revert":
            if ok:
                model = saved
            else:
                for off, length in pending:
                    model.set(off, off + length, None)
        else:
            for off, length, v in eff:
                model.set(off, off + length, v if ok else None)
                if saved is not None:
                    pending.append((off, length))

    # resize (grow, sometimes shrink) through the CLI
    with open(work, "rb") as f:
        hdr = f.read(32)
    cur = struct.unpack_from(">Q", hdr, 24)[0] if len(hdr) == 32 else None  # a snapshot may have changed it
    if VDISK:
        if rng.random() < 0.8:
            delta = rng.choice([512, cs, MiB, 3 * MiB + 512])
            p = case.run([VDISK, "resize", "-f", "qcow2", "-q", work, "+%d" % delta])
            # New space reads as zeroes only if nothing was mapped past the end
            # (a smaller size in the header exposes old data, in QEMU as well).
            if p.returncode == 0 and cur == size:
                model.set(cur, cur + delta, 0)
        else:
            p = case.run([VDISK, "resize", "-f", "qcow2", "-q", "--shrink", work, "-%d" % cs])
            model.set(max((cur or 0) - cs, 0), 1 << 63, None)

    # repair
    if VDISK and rng.random() < 0.5:
        case.run([VDISK, "check", "-f", "qcow2", "-r", "all", "--output=json", work], (0, 1, 2, 3))
    else:
        case.run([QCOW2_IO, "-f", "qcow2", work, "-c", "check -r all"])

    if not clean:
        return
    after = qemu_check(work) or {}
    if after.get("corruptions", 0) or after.get("check-errors", 0) or "check-errors" not in after:
        case.fail("qemu-img check was clean before vdisk's writes, not after: %s (before: %s)" % (after, before))
    reads = ["read -P %d %d %d" % (v, s, e - s) for s, e, v in model.runs]
    for i in range(0, len(reads), 200):
        cmds = [x for c in reads[i:i + 200] for x in ("-c", c)]
        q = _run([QEMU_IO, "-f", "qcow2", "-r"] + cmds + [work])
        if q.returncode != 0 or "fail" in q.stdout.lower() or "error" in q.stdout.lower():
            case.fail("qemu-io does not read back what vdisk wrote", [QEMU_IO] + cmds + [work], q)
        q = case.run([QCOW2_IO, "-r", "-f", "qcow2", work] + cmds)
        if q.returncode != 0:
            case.fail("vdisk does not read back what it wrote", [QCOW2_IO] + cmds, q)


@pytest.mark.parametrize("idx", range(CASES), ids=["case%04d" % i for i in range(CASES)])
def test_mutant(seeds, tmp_path, idx):
    try:
        run_case(idx, seeds, str(tmp_path))
        msg = None
    except Failure as e:
        msg = str(e)
    if msg:
        pytest.fail(msg, pytrace=False)
