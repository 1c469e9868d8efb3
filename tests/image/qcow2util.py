# SPDX-License-Identifier: GPL-2.0-or-later
"""Just enough qcow2 layout knowledge to damage images on purpose in tests."""
import struct

HEADER = struct.Struct(">IIQIIQIIQQIIQ")


def read_header(path):
    with open(path, "rb") as f:
        (magic, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
         rt_off, rt_clusters, nb_snapshots, snapshots_off) = HEADER.unpack(f.read(HEADER.size))
    return dict(magic=magic, version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                l1_off=l1_off, rt_off=rt_off, rt_clusters=rt_clusters, nb_snapshots=nb_snapshots)


def read_u64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def write_u32(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">I", value))


OFFSET_MASK = 0x00FFFFFFFFFFFE00


def l2_entry_addr(path, guest_off):
    """File offset of the (standard, 8-byte) L2 entry that maps guest_off."""
    h = read_header(path)
    cs = 1 << h["cluster_bits"]
    l2_entries = cs // 8
    cluster = guest_off // cs
    l1_index, l2_index = divmod(cluster, l2_entries)
    l1e = read_u64(path, h["l1_off"] + 8 * l1_index)
    l2_off = l1e & OFFSET_MASK
    assert l2_off, "guest offset %d has no L2 table" % guest_off
    return l2_off + 8 * l2_index
