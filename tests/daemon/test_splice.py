# SPDX-License-Identifier: GPL-2.0-or-later
"""
Zero-copy NBD reads: when a read's bytes are in the page cache of the file
under a raw node (buffered), the export splices them file -> pipe -> socket.
These tests check that the spliced replies carry the right bytes in every
reply form, that the export falls back to a plain read where it must
(pages not cached, cache.direct=on, a qcow2 node, TLS is covered by
test_tls.py), and that the query-stats counters say which path ran.
"""
import os
import socket
import struct

import pytest

from conftest import KiB, MiB, nbd_handle
from test_hostile import CMD_READ, go, recv_exact, request, simple_reply

nbd = pytest.importorskip("nbd")


def spliced(d, export="e0"):
    for e in d.qmp("query-stats", target="export")["exports"]:
        if e["id"] == export:
            return e["spliced-reads"], e["spliced-bytes"]
    raise AssertionError(f"no export {export}")


def make_data_file(path, size=8 * MiB):
    data = os.urandom(size)
    path.write_bytes(data)  # written through the page cache: cached
    return data


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_daemon_on(daemon_factory, path, file_opts="", raw_opts=""):
    return daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={path}{file_opts}",
        "--blockdev", f"driver=raw,node-name=r0,file=f0{raw_opts}",
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
    ])


def read_chunks(h, length, off, flags=0):
    """A structured read: (data, [(status, offset, length) of each chunk])."""
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((status, offset, len(subbuf)))
        return 0

    return h.pread_structured(length, off, chunk, flags=flags), chunks


READS = [(0, 64 * KiB), (12345, 768 * KiB), (3 * MiB + 1, 256 * KiB + 3), (8 * MiB - 512 * KiB, 512 * KiB)]


@pytest.mark.parametrize("structured", [True, False])
def test_cached_reads_are_spliced(daemon_factory, tmp_path, structured):
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"), structured=structured)
    for off, length in READS:
        assert h.pread(length, off) == data[off:off + length], (off, length)
    # Small reads take the buffer path; they are still right.
    assert h.pread(4 * KiB, 4097) == data[4097:4097 + 4 * KiB]
    h.shutdown()
    assert spliced(d) == (len(READS), sum(length for _, length in READS))


def test_large_structured_read_is_spliced_in_chunks(daemon_factory, tmp_path):
    """Bigger than the pipe: several OFFSET_DATA chunks (libnbd checks they tile the request)."""
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"))
    off = MiB + 777
    got, chunks = read_chunks(h, 4 * MiB, off)
    h.shutdown()
    assert got == data[off:off + 4 * MiB]
    assert spliced(d) == (1, 4 * MiB)
    assert {status for status, _, _ in chunks} == {nbd.READ_DATA}
    assert len(chunks) >= 4 and sum(n for _, _, n in chunks) == 4 * MiB
    assert chunks[0][1] == off


@pytest.mark.parametrize("length", [MiB, 4 * MiB])
def test_df_read_is_one_chunk(daemon_factory, tmp_path, length):
    """NBD_CMD_FLAG_DF allows one data chunk: spliced only when the pipe holds it all, else read."""
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"))
    off = MiB + 4096
    got, chunks = read_chunks(h, length, off, flags=nbd.CMD_FLAG_DF)
    h.shutdown()
    assert got == data[off:off + length]
    assert chunks == [(nbd.READ_DATA, off, length)]
    assert spliced(d) == ((1, length) if length == MiB else (0, 0))


def test_simple_reply_larger_than_the_pipe_is_read(daemon_factory, tmp_path):
    """A simple reply has one header: a read the pipe cannot hold at once goes the buffer way."""
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"), structured=False)
    assert h.pread(4 * MiB + 5, MiB - 3) == data[MiB - 3:5 * MiB + 2]
    h.shutdown()
    assert spliced(d) == (0, 0)


def test_uncached_range_falls_back_then_splices(daemon_factory, tmp_path):
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    drop_cache(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"))
    assert h.pread(MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
    assert spliced(d) == (0, 0)  # not cached: read the usual way, which caches it
    assert h.pread(MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
    assert spliced(d) == (1, MiB)
    h.shutdown()


def test_raw_window_shifts_spliced_reads(daemon_factory, tmp_path):
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path, raw_opts=f",offset={192 * KiB},size={4 * MiB}")
    h = nbd_handle(d.uri("r0"))
    assert h.get_size() == 4 * MiB
    assert h.pread(MiB, 3 * MiB) == data[192 * KiB + 3 * MiB:192 * KiB + 4 * MiB]
    assert h.pread(100 * KiB, 7) == data[192 * KiB + 7:192 * KiB + 7 + 100 * KiB]
    h.shutdown()
    assert spliced(d) == (2, MiB + 100 * KiB)


def test_writes_are_seen_by_spliced_reads(daemon_factory, tmp_path):
    path = tmp_path / "data.raw"
    make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    h = nbd_handle(d.uri("r0"))
    new = os.urandom(MiB)
    h.pwrite(new, 5 * MiB)
    assert h.pread(MiB, 5 * MiB) == new
    h.zero(256 * KiB, 5 * MiB)  # punches a hole: the zeroes come as a hole chunk or zero pages
    assert h.pread(MiB, 5 * MiB) == bytes(256 * KiB) + new[256 * KiB:]
    h.shutdown()
    assert spliced(d)[0] >= 1


def test_direct_io_is_not_spliced(daemon_factory, tmp_path):
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path, file_opts=",cache.direct=on")
    h = nbd_handle(d.uri("r0"))
    assert h.pread(MiB, MiB) == data[MiB:2 * MiB]
    h.shutdown()
    assert spliced(d) == (0, 0)


def test_qcow2_is_not_spliced(daemon_factory, tmp_path, qcow2_image):
    d = daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={qcow2_image}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--export", "type=nbd,id=e0,node-name=q0",
    ])
    h = nbd_handle(d.uri("q0"))
    assert h.pread(MiB, 0) == b"\x11" * MiB
    h.shutdown()
    assert spliced(d) == (0, 0)


def test_many_spliced_replies_in_flight(daemon_factory, tmp_path):
    """64 pipelined 1 MiB reads, replies read back by a raw-socket client: all in order of cookies' data."""
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    s, _ = go(d, b"r0")
    for i in range(64):
        request(s, CMD_READ, (i % 7) * MiB, MiB, cookie=i)
    seen = set()
    for _ in range(64):
        err, cookie = simple_reply(s)
        assert err == 0
        off = (cookie % 7) * MiB
        assert recv_exact(s, MiB) == data[off:off + MiB], cookie
        seen.add(cookie)
    assert seen == set(range(64))
    s.close()
    assert spliced(d)[0] == 64


def test_client_gone_mid_splice(daemon_factory, tmp_path):
    """Clients that close with spliced replies half sent: the daemon goes on serving."""
    path = tmp_path / "data.raw"
    data = make_data_file(path)
    d = raw_daemon_on(daemon_factory, path)
    for _ in range(3):
        s, _ = go(d, b"r0")
        for i in range(32):
            request(s, CMD_READ, (i % 7) * MiB, MiB, cookie=i)
        recv_exact(s, 16 + 1000)  # part of the first reply
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    h = nbd_handle(d.uri("r0"))
    assert h.pread(MiB, 6 * MiB) == data[6 * MiB:7 * MiB]
    h.shutdown()
