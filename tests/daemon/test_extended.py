# SPDX-License-Identifier: GPL-2.0-or-later
"""
NBD extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit
lengths, 32-byte reply chunks that echo the request's offset, and
NBD_REPLY_TYPE_BLOCK_STATUS_EXT.  No peer on this system speaks them yet
(libnbd 1.14, qemu 7.2), so a raw-socket client written from the protocol
document drives the export.
"""
import struct

import pytest

from conftest import requires, run
from test_hostile import (CMD_READ, CMD_WRITE, OPT_GO, REP_ACK, REQ_MAGIC, SIMPLE_MAGIC, closed_by_server, connect,
                          recv_exact, recv_rep, send_opt)

OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 10, 11
REP_META_CONTEXT = 4
REP_ERR_INVALID, REP_ERR_EXT_HEADER_REQD = 0x80000003, 0x8000000A
EXT_REQ_MAGIC, EXT_REPLY_MAGIC = 0x21E41C71, 0x6E8A278C
STRUCTURED_MAGIC = 0x668E33EF
CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 3, 4, 6, 7
FLAG_PAYLOAD_LEN = 1 << 5
REPLY_DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_BLOCK_STATUS_EXT, TYPE_ERROR = 0, 1, 6, 32769
GiB = 1 << 30
SIZE = 8 * GiB  # block status and zeroing lengths above 32 bits


@pytest.fixture
def big_daemon(daemon_factory, tmp_path):
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=r0,file=f0",
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
    ])


def negotiate(d, contexts=(b"base:allocation", b"qemu:allocation-depth")):
    """Extended headers, both meta contexts, then GO; returns (socket, {context id: name})."""
    s = connect(d)
    send_opt(s, OPT_EXTENDED_HEADERS)
    assert recv_rep(s)[1] == REP_ACK
    name = b"r0"
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
    for c in contexts:
        data += struct.pack(">I", len(c)) + c
    send_opt(s, OPT_SET_META_CONTEXT, data)
    ids = {}
    while True:
        _, rtype, payload = recv_rep(s)
        if rtype == REP_META_CONTEXT:
            ids[struct.unpack(">I", payload[:4])[0]] = payload[4:].decode()
        else:
            assert rtype == REP_ACK
            break
    send_opt(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _, rtype, payload = recv_rep(s)
        assert rtype & 0x80000000 == 0, (rtype, payload)
        if rtype == REP_ACK:
            return s, ids


def request(s, cmd, offset, length, cookie=1, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQQ", EXT_REQ_MAGIC, flags, cmd, cookie, offset, length) + payload)


def chunk(s):
    """One extended reply chunk: (flags, type, cookie, offset, payload)."""
    magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", recv_exact(s, 32))
    assert magic == EXT_REPLY_MAGIC, hex(magic)
    assert length < 64 << 20
    return flags, rtype, cookie, offset, recv_exact(s, length)


def reply(s):
    """All chunks of one reply, up to the one flagged DONE."""
    chunks = []
    while True:
        c = chunk(s)
        chunks.append(c)
        if c[0] & REPLY_DONE:
            return chunks


def test_negotiation_rules(big_daemon):
    s = connect(big_daemon)
    send_opt(s, OPT_EXTENDED_HEADERS, b"x")
    assert recv_rep(s)[1] == REP_ERR_INVALID  # takes no data
    send_opt(s, OPT_STRUCTURED_REPLY)
    assert recv_rep(s)[1] == REP_ACK  # structured replies first is fine
    send_opt(s, OPT_EXTENDED_HEADERS)
    assert recv_rep(s)[1] == REP_ACK
    send_opt(s, OPT_STRUCTURED_REPLY)
    assert recv_rep(s)[1] == REP_ERR_EXT_HEADER_REQD  # extended headers take precedence
    s.close()


def test_io_with_extended_headers(big_daemon):
    s, ids = negotiate(big_daemon)
    assert sorted(ids.values()) == ["base:allocation", "qemu:allocation-depth"]
    data = bytes(range(256)) * 16

    request(s, CMD_WRITE, 1 << 20, len(data), cookie=7, flags=FLAG_PAYLOAD_LEN, payload=data)
    [(flags, rtype, cookie, offset, payload)] = reply(s)
    assert (rtype, cookie, offset, payload) == (TYPE_NONE, 7, 1 << 20, b"")

    request(s, CMD_READ, 1 << 20, len(data), cookie=8)
    [(flags, rtype, cookie, offset, payload)] = reply(s)
    assert (rtype, cookie, offset) == (TYPE_OFFSET_DATA, 8, 1 << 20)
    assert struct.unpack(">Q", payload[:8])[0] == 1 << 20 and payload[8:] == data

    # Block status over all 8 GiB: a 64-bit effect length, 64-bit descriptor lengths.
    request(s, CMD_BLOCK_STATUS, 0, SIZE, cookie=9)
    chunks = reply(s)
    assert {c[1] for c in chunks} == {TYPE_BLOCK_STATUS_EXT} and len(chunks) == 2
    for _, _, cookie, offset, payload in chunks:
        assert (cookie, offset) == (9, 0)
        ctx, count = struct.unpack(">II", payload[:8])
        assert count > 0 and len(payload) == 8 + 16 * count
        descs = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
        assert sum(length for length, _ in descs) == SIZE
        if ids[ctx] == "base:allocation":
            # hole, data (the write), hole up to the end: more than 4 GiB in one descriptor
            assert descs[0][1] == 3 and descs[-1][1] == 3
            assert any(length > 1 << 32 for length, _ in descs)
            assert any(status == 0 for _, status in descs)

    # Zeroing and trimming more than 4 GiB in one request.
    request(s, CMD_WRITE_ZEROES, 0, 5 * GiB, cookie=10)
    assert [c[1:4] for c in reply(s)] == [(TYPE_NONE, 10, 0)]
    request(s, CMD_TRIM, 0, SIZE, cookie=11)
    assert [c[1:4] for c in reply(s)] == [(TYPE_NONE, 11, 0)]
    request(s, CMD_READ, 1 << 20, 4096, cookie=12)
    [(_, rtype, _, _, payload)] = reply(s)
    assert rtype == TYPE_OFFSET_DATA and payload[8:] == bytes(4096)

    # Errors are extended ERROR chunks carrying the request's offset.
    request(s, CMD_READ, SIZE, 4096, cookie=13)
    [(flags, rtype, cookie, offset, payload)] = reply(s)
    assert (rtype, cookie, offset) == (TYPE_ERROR, 13, SIZE)
    assert struct.unpack(">I", payload[:4])[0] == 22  # NBD_EINVAL

    # A payload on a command that takes none is consumed and refused; the connection goes on.
    request(s, CMD_FLUSH, 0, 10, cookie=14, flags=FLAG_PAYLOAD_LEN, payload=b"0123456789")
    [(_, rtype, cookie, _, payload)] = reply(s)
    assert (rtype, cookie) == (TYPE_ERROR, 14) and struct.unpack(">I", payload[:4])[0] == 22
    request(s, CMD_FLUSH, 0, 0, cookie=15)
    assert [c[1:3] for c in reply(s)] == [(TYPE_NONE, 15)]
    s.close()


def test_structured_compact_replies(big_daemon):
    """
    Structured replies without extended headers: READ and BLOCK_STATUS answer
    in chunks, successful commands without data in a simple reply (allowed,
    and what nbdkit and qemu-nbd send: libnbd reads it in one recv), errors
    in an ERROR chunk that carries the message.
    """
    s = connect(big_daemon)
    send_opt(s, OPT_STRUCTURED_REPLY)
    assert recv_rep(s)[1] == REP_ACK
    name = b"r0"
    send_opt(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while recv_rep(s)[1] != REP_ACK:
        pass

    def compact(cmd, offset, length, cookie, payload=b""):
        s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, cookie, offset, length) + payload)

    def simple(cookie):
        magic, err, got = struct.unpack(">IIQ", recv_exact(s, 16))
        assert (magic, got) == (SIMPLE_MAGIC, cookie), hex(magic)
        return err

    def chunk(cookie):
        magic, flags, rtype, got, length = struct.unpack(">IHHQI", recv_exact(s, 20))
        assert (magic, got) == (STRUCTURED_MAGIC, cookie), hex(magic)
        return flags, rtype, recv_exact(s, length)

    data = b"sr" * 2048
    for cmd, offset, length, cookie, payload in [(CMD_WRITE, 4096, len(data), 1, data), (CMD_FLUSH, 0, 0, 2, b""),
                                                 (CMD_WRITE_ZEROES, 1 << 20, 65536, 3, b""),
                                                 (CMD_TRIM, 1 << 21, 65536, 4, b"")]:
        compact(cmd, offset, length, cookie, payload)
        assert simple(cookie) == 0
    compact(CMD_READ, 4096, len(data), 5)
    flags, rtype, payload = chunk(5)
    assert (flags & REPLY_DONE, rtype, payload[8:]) == (REPLY_DONE, TYPE_OFFSET_DATA, data)
    compact(CMD_BLOCK_STATUS, 0, 1 << 20, 6)  # no meta context negotiated: refused, in a chunk
    flags, rtype, payload = chunk(6)
    assert (flags & REPLY_DONE, rtype) == (REPLY_DONE, TYPE_ERROR)
    # A write past the end: an error chunk with errno and a message, not a bare simple error.
    compact(CMD_WRITE, SIZE, len(data), 7, data)
    flags, rtype, payload = chunk(7)
    err, mlen = struct.unpack(">IH", payload[:6])
    assert (rtype, err) == (TYPE_ERROR, 28) and mlen == len(payload) - 6 and mlen > 0  # NBD_ENOSPC
    s.close()


def test_compact_request_after_extended_hangs_up(big_daemon):
    s, _ = negotiate(big_daemon)
    # 28 compact bytes and the start of the next request: the server reads 32 and finds the wrong magic.
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 1, 0, 512) + struct.pack(">I", REQ_MAGIC))
    assert closed_by_server(s)


def test_write_without_payload_flag_hangs_up(big_daemon):
    s, _ = negotiate(big_daemon)
    request(s, CMD_WRITE, 0, 4096, payload=bytes(4096))
    assert closed_by_server(s)


def test_oversized_payload_hangs_up(big_daemon):
    s, _ = negotiate(big_daemon)
    request(s, CMD_WRITE, 0, 1 << 40, flags=FLAG_PAYLOAD_LEN)
    assert closed_by_server(s)


@requires("nbdinfo")
def test_plain_clients_still_work(big_daemon):
    """Clients that do not ask for extended headers get 32-bit block status as before."""
    p = run(["nbdinfo", "--map", f"nbd+unix:///r0?socket={big_daemon.nbd_path}"])
    rows = [line.split() for line in p.stdout.decode().splitlines()]
    assert sum(int(r[1]) for r in rows) == SIZE and all(r[2] == "3" for r in rows), rows


def test_failed_set_meta_context_clears_the_earlier_choice(big_daemon):
    """
    NBD_OPT_SET_META_CONTEXT replaces the contexts chosen before even when it
    fails, so after a failed SET no context is active and BLOCK_STATUS is
    refused (the old daemon kept base:allocation from the first SET).
    """
    s = connect(big_daemon)
    send_opt(s, OPT_STRUCTURED_REPLY)
    assert recv_rep(s)[1] == REP_ACK
    name, ctx = b"r0", b"base:allocation"

    def set_meta(export):
        send_opt(s, OPT_SET_META_CONTEXT,
                 struct.pack(">I", len(export)) + export + struct.pack(">II", 1, len(ctx)) + ctx)
        replies = []
        while True:
            replies.append(recv_rep(s)[1])
            if replies[-1] != REP_META_CONTEXT:
                return replies

    assert set_meta(name) == [REP_META_CONTEXT, REP_ACK]
    [err] = set_meta(b"no-such-export")
    assert err & 0x80000000
    send_opt(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while recv_rep(s)[1] != REP_ACK:
        pass
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_BLOCK_STATUS, 1, 0, 1 << 20))
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (magic, cookie, rtype) == (STRUCTURED_MAGIC, 1, TYPE_ERROR)
    assert struct.unpack(">I", recv_exact(s, length)[:4])[0] == 22  # NBD_EINVAL
    s.close()
