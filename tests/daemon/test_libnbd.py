# SPDX-License-Identifier: GPL-2.0-or-later
"""Every NBD command, flag and reply type, driven by python3-libnbd."""
import errno
import os

import pytest

from conftest import MiB, KiB, nbd_handle

nbd = pytest.importorskip("nbd")


def extents(h, offset, length, flags=0, ctx="base:allocation"):
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == ctx:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def test_handshake_flags(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"))
    assert h.get_size() == 64 * MiB
    assert h.get_structured_replies_negotiated()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero()
    assert h.can_cache() and h.can_df()
    assert h.can_multi_conn()  # raw over file
    assert not h.is_read_only() and not h.is_rotational()
    assert h.can_meta_context("base:allocation")
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.shutdown()


def test_read_only_export(raw_daemon):
    h = nbd_handle(raw_daemon.uri("ro"), strict=False)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero() and not h.can_fua()
    assert h.can_multi_conn()
    for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errnum == errno.EPERM
    assert len(h.pread(4096, 0)) == 4096  # reads still work
    h.shutdown()


def test_read_write_flush_fua(raw_daemon, raw_image):
    h = nbd_handle(raw_daemon.uri("r0"))
    data = os.urandom(3 * MiB + 123)
    h.pwrite(data, 5 * MiB + 7)
    h.pwrite(b"F" * 4096, 40 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(len(data), 5 * MiB + 7) == data
    assert h.pread(4096, 40 * MiB) == b"F" * 4096
    h.shutdown()
    with open(raw_image, "rb") as f:
        f.seek(5 * MiB + 7)
        assert f.read(len(data)) == data


def test_simple_replies(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"), structured=False, contexts=())
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    h.pwrite(b"s" * 70000, 100)
    assert h.pread(70000, 100) == b"s" * 70000
    # Errors come back as simple replies too.
    h2 = nbd_handle(raw_daemon.uri("r0"), structured=False, contexts=(), strict=False)
    with pytest.raises(nbd.Error) as e:
        h2.pread(4096, 64 * MiB)
    assert e.value.errnum == errno.EINVAL
    h2.pread(4096, 0)  # still usable
    h.shutdown()
    h2.shutdown()


def test_structured_read_holes_and_df(raw_daemon):
    """Large reads of sparse ranges come back as hole chunks; DF forces one data chunk."""
    h = nbd_handle(raw_daemon.uri("r0"))
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, status, len(buf)))
        return 0

    buf = nbd.Buffer(4 * MiB)
    h.pread_structured(4 * MiB, 14 * MiB, chunk)  # 14..18 MiB: hole, data at 16..16.25, hole
    kinds = [s for _, s, _ in chunks]
    assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds
    data = h.pread(4 * MiB, 14 * MiB)
    assert data[:2 * MiB] == bytes(2 * MiB)
    assert data[2 * MiB:2 * MiB + 256 * KiB] == b"\xa5" * (256 * KiB)
    chunks.clear()
    h.pread_structured(4 * MiB, 14 * MiB, chunk, nbd.CMD_FLAG_DF)
    assert [(o, s) for o, s, _ in chunks] == [(14 * MiB, nbd.READ_DATA)]
    del buf
    h.shutdown()


def test_trim_and_zeroes(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"))
    h.pwrite(b"\x01" * MiB, 30 * MiB)
    h.zero(MiB, 30 * MiB)  # may punch a hole
    assert h.pread(MiB, 30 * MiB) == bytes(MiB)
    h.pwrite(b"\x02" * MiB, 31 * MiB)
    h.zero(MiB, 31 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 31 * MiB) == bytes(MiB)
    h.zero(64 * KiB, 32 * MiB, nbd.CMD_FLAG_FAST_ZERO)  # the file can punch holes: fast
    h.pwrite(b"\x03" * MiB, 33 * MiB)
    h.trim(MiB, 33 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    h.shutdown()


def test_cache(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"))
    h.cache(8 * MiB, 0)
    h.shutdown()


def test_block_status(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"))
    ext = extents(h, 0, 64 * MiB)
    assert sum(l for l, _ in ext) == 64 * MiB
    assert ext[0] == (MiB, 0)  # data
    assert ext[1][1] == nbd.STATE_HOLE | nbd.STATE_ZERO
    one = extents(h, 0, 64 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0] == (MiB, 0)
    h.shutdown()


def test_block_status_without_context(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"), contexts=(), strict=False)
    with pytest.raises(nbd.Error) as e:
        h.block_status(4096, 0, lambda *a: 0)
    assert e.value.errnum == errno.EINVAL
    h.shutdown()


def test_allocation_depth_backing_chain(daemon_factory, tmp_path):
    from conftest import make_qcow2, run
    base = make_qcow2(tmp_path / "base.qcow2", "16M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(base)])
    top = make_qcow2(tmp_path / "top.qcow2", "16M", backing=base)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 4M 1M", str(top)])
    d = daemon_factory(["--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
                        "--export", "type=nbd,id=e,node-name=top"])
    h = nbd_handle(d.uri("top"), contexts=("base:allocation", "qemu:allocation-depth"))
    depth = extents(h, 0, 16 * MiB, ctx="qemu:allocation-depth")
    assert depth[0] == (MiB, 2)         # from the backing file
    assert (MiB, 1) in depth            # the top's own write
    assert depth[-1][1] == 0            # unallocated anywhere
    base_alloc = extents(h, 0, 16 * MiB)
    assert base_alloc[0] == (MiB, 0)    # backing data is data
    assert h.pread(MiB, 0) == b"\x01" * MiB
    assert h.pread(MiB, 4 * MiB) == b"\x02" * MiB
    h.shutdown()


def test_out_of_range_and_bad_flags(raw_daemon):
    h = nbd_handle(raw_daemon.uri("r0"), strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 64 * MiB - 2048)
    assert e.value.errnum == errno.EINVAL
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 64 * MiB)
    assert e.value.errnum == errno.ENOSPC
    with pytest.raises(nbd.Error) as e:
        h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)  # not a read flag
    assert e.value.errnum == errno.EINVAL
    with pytest.raises(nbd.Error) as e:
        h.pread(33 * MiB, 0)  # over the maximum payload
    assert e.value.errnum == errno.EINVAL
    assert h.pread(512, 0)  # the connection survives
    h.shutdown()


def test_many_requests_in_flight(raw_daemon):
    """Requests pipelined on one connection complete (in any order) with the right data."""
    h = nbd_handle(raw_daemon.uri("r0"))
    blobs = {i: os.urandom(64 * KiB) for i in range(200)}
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), 20 * MiB + i * 64 * KiB)
               for i, b in blobs.items()]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    bufs = [(i, nbd.Buffer(64 * KiB)) for i in blobs]
    cookies = [h.aio_pread(b, 20 * MiB + i * 64 * KiB) for i, b in bufs]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, b in bufs:
        assert b.to_bytearray() == blobs[i]
    h.shutdown()


def test_list_and_info(raw_daemon):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(raw_daemon.uri())
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert ("r0", "raw disk") in names and ("ro", "") in names
    h.set_export_name("r0")
    h.set_full_info(True)
    h.opt_info()
    assert h.get_export_description() == "raw disk"
    assert h.get_canonical_export_name() == "r0"
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert set(ctxs) == {"base:allocation", "qemu:allocation-depth"}
    h.set_export_name("nosuch")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("r0")
    h.opt_go()
    assert h.pread(512, 0)
    h.shutdown()


def test_oldstyle_export_name_option(raw_daemon):
    """NBD_OPT_EXPORT_NAME (no NBD_OPT_GO): libnbd falls back when GO is disabled... force it via opt mode."""
    h = nbd.NBD()
    h.set_handshake_flags(0)  # no fixed newstyle: libnbd must use NBD_OPT_EXPORT_NAME
    h.set_request_structured_replies(False)
    h.connect_uri(raw_daemon.uri("r0"))
    assert h.get_size() == 64 * MiB
    assert h.pread(512, 0)
    h.shutdown()


def test_qcow2_multi_conn(qcow2_daemon, qcow2_image):
    """A writable qcow2 export offers multi-conn: a flush on one connection covers writes that completed on
    another (one node, node-wide flush); after it the image on disk holds them (qemu-img check, qemu-io)."""
    from conftest import run
    a, b = nbd_handle(qcow2_daemon.uri("q0")), nbd_handle(qcow2_daemon.uri("q0"))
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(b"\x5a" * (64 * KiB), 3 * MiB)
    b.flush()
    run(["qemu-img", "check", "-U", "-f", "qcow2", str(qcow2_image)])
    run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P 0x5a {3 * MiB} 64k", str(qcow2_image)])
    a.shutdown()
    b.shutdown()
