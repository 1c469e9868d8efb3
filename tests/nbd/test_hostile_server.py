# SPDX-License-Identifier: LGPL-2.1-or-later
"""
The nbd driver against a hostile or broken NBD server (hostile_nbd.py): each
scenario breaks the protocol at one point, and the client must fail that
step with a clear errno and message (or, where the spec lets a client
cope, cope) -- never crash, hang, trip a sanitizer, or hand back a read
buffer the server's reply did not fill.  (The driver counts the bytes a
reply covers and the ranges they cover, so missing and surplus data and
overlapping chunks, even ones that exactly cancel a gap, are caught.)

libnbd 1.14 asks for neither extended headers nor (unless told to, which
the driver does not) meta contexts, and the driver never sends
NBD_CMD_BLOCK_STATUS: so the block-status scenarios are BLOCK_STATUS chunks
where none may come, and an extended-header reply is an unknown magic.
"""
import errno
import os
import re
import subprocess

import pytest

from conftest import check_sanitizers, run
from vdtest import hostile_peers
from hostile_nbd import (CMD_READ, DEFAULT_EFLAGS, EXT_REPLY_MAGIC, EIO, ENOSPC, EPERM, FILL, IHAVEOPT, INFO_BLOCK_SIZE,
                         INFO_EXPORT, INFO_NAME, NBDMAGIC, OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_POLICY,
                         REP_ERR_UNKNOWN, REP_INFO, REP_META_CONTEXT, REP_SERVER, REPLY_FLAG_DONE, SIMPLE_MAGIC, SIZE,
                         STRUCTURED_MAGIC, T_BLOCK_STATUS, T_ERROR_OFFSET, T_NONE, T_OFFSET_DATA, TF_MULTI_CONN,
                         HostileServer, Scenario, u16, u32, u64)

TIMEOUT = 20            # per client run: a hang fails the test long before pytest's own limits
LOST = "connection to the NBD server lost"
READ = f"read -P {FILL:#x} 0 4k"
READ2 = f"read -P {FILL:#x} 4k 4k"


@pytest.fixture
def hostile(tmp_path):
    """hostile(scenario) -> HostileServer on a Unix socket in tmp_path."""
    yield from hostile_peers(tmp_path, HostileServer)


def strerror(name):
    return os.strerror(getattr(errno, name))


def io_run(exe, server, *cmds, timeout=TIMEOUT):
    args = [exe, "--driver=nbd", "--path", server.path, "--set", "connect-timeout=2"]
    for c in cmds:
        args += ["-c", c]
    return run(args, timeout=timeout)


def queues(exe, server, mode, *more, timeout=TIMEOUT, input=None):
    return run([exe, "--set", f"path={server.path}", "--set", "connect-timeout=1", *more, mode],
               timeout=timeout, input=input)


# ---- handshake ------------------------------------------------------------------------------------------------


def wrong_option(c, opt, data):
    if opt == OPT_STRUCTURED_REPLY:
        c.opt_reply(OPT_GO, REP_ACK)  # an answer to a question not asked
        return True
    return False


def bad_option_magic(c, opt, data):
    c.opt_reply(opt, REP_ACK, magic=0x0003E889045565A8)
    return True


def info_block(mn, pref, mx):
    return u16(INFO_BLOCK_SIZE) + u32(mn) + u32(pref) + u32(mx)


# id, scenario knobs, errno name, text in the message
CONNECT_FAILS = [
    ("greeting-magic", dict(greeting=u64(NBDMAGIC ^ 1) + u64(IHAVEOPT)), "EIO", "did not send expected NBD magic"),
    ("ihaveopt-magic", dict(greeting=u64(NBDMAGIC) + u64(0x1122334455667788)), "EIO",
     "not either an oldstyle or fixed newstyle"),
    ("option-reply-magic", dict(opt_reply=bad_option_magic), "EIO", "invalid option reply magic or option"),
    ("reply-for-wrong-option", dict(opt_reply=wrong_option), "EIO", "invalid option reply magic or option"),
    ("info-export-too-long", dict(info_export=u16(INFO_EXPORT) + u64(SIZE) + u16(DEFAULT_EFLAGS) + b"x"), "EIO",
     "incorrect NBD_INFO_EXPORT option reply length"),
    ("info-export-too-short", dict(info_export=u16(INFO_EXPORT) + u64(SIZE)), "EIO",
     "incorrect NBD_INFO_EXPORT option reply length"),
    ("info-block-size-too-short", dict(extra_infos=[u16(INFO_BLOCK_SIZE) + u32(512) + u32(4096)]), "EIO",
     "incorrect NBD_INFO_BLOCK_SIZE option reply length"),
    ("info-shorter-than-type", dict(extra_infos=[b"\x00"]), "EIO", "NBD_REP_INFO reply length too small"),
    ("info-name-too-long", dict(extra_infos=[u16(INFO_NAME) + b"n" * 5000]), "EIO",
     "incorrect NBD_INFO_NAME option reply length"),
    ("no-info-export", dict(info_export=u16(99)), "EPROTO", "without sending the export size"),
    ("eflags-zero", dict(eflags=0), "EINVAL", "invalid eflags == 0"),
    ("size-2^63", dict(size=2**63), "EPROTO", "export size of 2^63 bytes or more (9223372036854775808)"),
    ("size-2^64-1", dict(size=2**64 - 1), "EPROTO", "export size of 2^63 bytes or more (18446744073709551615)"),
    ("go-unexpected-reply-type", dict(go_reply=(REP_SERVER, u32(0))), "EIO", "unexpected option reply type 2"),
    ("go-ack-with-payload", dict(go_reply=(REP_ACK, b"xx")), "EIO", "invalid NBD_REP_ACK option reply length"),
    ("go-error-string-too-long", dict(go_reply=(REP_ERR_POLICY, b"e" * 5000)), "EIO",
     "option error string too long"),
    ("go-meta-context-unrequested", dict(go_reply=(REP_META_CONTEXT, u32(1) + b"base:allocation")), "EIO",
     "unexpected option reply type 4"),
    ("go-unknown-export", dict(go_reply=(REP_ERR_UNKNOWN, b"no such export")), "ENOENT", "has no export named"),
    ("close-after-greeting", dict(close_at="greeting"), None, "connecting to unix:"),
    ("close-after-client-flags", dict(close_at="cflags"), None, "connecting to unix:"),
    ("close-after-option", dict(close_at="option"), "EIO", "server disconnected unexpectedly"),
    ("close-mid-go", dict(close_at="go"), "EIO", "server disconnected unexpectedly"),
    ("stall-after-greeting", dict(stall_at="greeting"), "ETIMEDOUT", "no handshake within connect-timeout (1 s)"),
    ("stall-after-client-flags", dict(stall_at="cflags"), "ETIMEDOUT", "no handshake within connect-timeout"),
    ("stall-on-option", dict(stall_at="option"), "ETIMEDOUT", "no handshake within connect-timeout"),
    ("stall-mid-go", dict(stall_at="go"), "ETIMEDOUT", "no handshake within connect-timeout"),
]


@pytest.mark.parametrize("knobs,err,text", [pytest.param(k, e, t, id=i) for i, k, e, t in CONNECT_FAILS])
def test_broken_handshake_fails_connect(hostile, nbd_queues, knobs, err, text):
    s = hostile(Scenario(**knobs))
    p = queues(nbd_queues, s, "connect")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "connected" not in p.stdout
    assert text in p.stderr, p.stderr
    if err:  # a peer that vanishes early may surface as EPIPE or ECONNRESET: only the text is fixed then
        assert f"[{strerror(err)}]" in p.stderr, p.stderr


# Handshakes a client may accept: the limits it then reports must be sane.
# id, scenario knobs, capacity, request-alignment, optimal-io-size, max-transfer
CONNECT_OK = [
    ("size-0", dict(size=0), 0, 1, 4096, 32 << 20),
    ("size-2^63-1", dict(size=2**63 - 1), 2**63 - 1, 1, 4096, 32 << 20),
    ("size-unaligned-to-min-block", dict(size=SIZE - 100, block=(512, 4096, 65536)), SIZE - 512, 512, 4096, 65536),
    ("unknown-info-type-skipped", dict(extra_infos=[u16(99) + b"junk"]), SIZE, 1, 4096, 32 << 20),
    # Improper block sizes are ignored as a whole (libnbd), so the defaults apply.
    ("block-min-0", dict(block=(0, 4096, 65536)), SIZE, 1, 4096, 32 << 20),
    ("block-min-over-max", dict(block=(4096, 4096, 512)), SIZE, 1, 4096, 32 << 20),
    ("block-min-not-power-of-2", dict(block=(768, 4096, 65536)), SIZE, 1, 4096, 32 << 20),
    ("block-min-over-64k", dict(block=(1 << 17, 1 << 17, 1 << 20)), SIZE, 1, 4096, 32 << 20),
    ("block-preferred-over-max", dict(block=(512, 8192, 4096)), SIZE, 1, 4096, 32 << 20),
    ("block-max-not-multiple-of-min", dict(block=(512, 4096, 1000)), SIZE, 1, 4096, 32 << 20),
    # Valid but extreme: preferred 2 GiB with "no maximum" must not exceed what one request may carry.
    ("block-preferred-2g-max-any", dict(block=(1, 1 << 31, 0xFFFFFFFF)), SIZE, 1, 32 << 20, 32 << 20),
    ("block-small-max", dict(block=(512, 512, 512)), SIZE, 512, 512, 512),
]


@pytest.mark.parametrize("knobs,cap,align,opt,maxt", [pytest.param(*x[1:], id=x[0]) for x in CONNECT_OK])
def test_odd_but_acceptable_handshake(hostile, nbd_queues, knobs, cap, align, opt, maxt):
    s = hostile(Scenario(**knobs))
    p = queues(nbd_queues, s, "connect")
    assert p.returncode == 0, p.stderr
    assert f"connected capacity={cap} request-alignment={align} optimal-io-size={opt} max-transfer={maxt}" \
        in p.stdout, p.stdout


def test_unaligned_tail_is_not_addressable(hostile, vdisk_io):
    """Size 1 MiB - 100 with 512-byte blocks: the last whole block reads, nothing past it is offered."""
    s = hostile(Scenario(size=SIZE - 100, block=(512, 4096, 65536)))
    p = io_run(vdisk_io, s, f"read -P {FILL:#x} {SIZE - 1024} 512", f"read {SIZE - 512} 512")
    assert p.returncode == 1
    assert "read 512/512 bytes" in p.stdout
    assert f"past capacity {SIZE - 512} (Invalid argument)" in p.stderr, p.stderr


def test_second_connection_differs(hostile, nbd_queues):
    """Multi-conn: a second connection that reports another export size is refused at start."""
    sc = Scenario(eflags=DEFAULT_EFLAGS | TF_MULTI_CONN)

    def opt_reply(c, opt, data):
        if opt == OPT_GO and c.index > 0:
            c.opt_reply(opt, REP_INFO, c.info_export(size=SIZE // 2))
            c.opt_reply(opt, REP_ACK)
            return "go"
        return False
    sc.opt_reply = opt_reply
    s = hostile(sc)
    p = queues(nbd_queues, s, "connect", "--queues", "2")
    assert p.returncode == 1, p.stdout
    assert "changed the export" in p.stderr and f"[{strerror('EPROTO')}]" in p.stderr, p.stderr


def test_second_connection_stalls(hostile, nbd_queues):
    """Multi-conn: queue 1's handshake stalls; vdisk_start times out instead of hanging."""
    sc = Scenario(eflags=DEFAULT_EFLAGS | TF_MULTI_CONN)

    def opt_reply(c, opt, data):
        if c.index > 0:
            c.stall()
        return False
    sc.opt_reply = opt_reply
    s = hostile(sc)
    p = queues(nbd_queues, s, "connect", "--queues", "2")
    assert p.returncode == 1, p.stdout
    assert "queue 1" in p.stderr and "no handshake within connect-timeout" in p.stderr, p.stderr
    assert f"[{strerror('ETIMEDOUT')}]" in p.stderr, p.stderr


# ---- transmission ---------------------------------------------------------------------------------------------


def raw_header(c, r, length):
    c.send(u32(STRUCTURED_MAGIC) + u16(REPLY_FLAG_DONE) + u16(T_OFFSET_DATA) + u64(r.cookie) + u32(length))


def overlap_excess(c, r):
    c.data_chunk(r.cookie, r.offset, 3072)
    c.data_chunk(r.cookie, r.offset + 1024, 3072, flags=REPLY_FLAG_DONE)


def overlap_cancels_gap(c, r):
    # [0,2k) and [1k,3k) cover 4k bytes in all, with [3k,4k) never sent.
    c.data_chunk(r.cookie, r.offset, 2048)
    c.data_chunk(r.cookie, r.offset + 1024, 2048, flags=REPLY_FLAG_DONE)


def out_of_order_overlap(c, r):
    # Separate ranges first, then a chunk that bridges them and runs into the second.
    c.data_chunk(r.cookie, r.offset + 3072, 1024)
    c.data_chunk(r.cookie, r.offset, 1024)
    c.data_chunk(r.cookie, r.offset + 1024, 2560, flags=REPLY_FLAG_DONE)


def twice(c, r):
    c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)
    c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)


def done_twice(c, r):
    c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)
    c.done(r.cookie)


def data_then_close(c, r):
    c.data_chunk(r.cookie, r.offset, r.length)  # no DONE
    c.close()


# id, read hook (or scenario knobs), commands, errno name, text, successful commands before the failure
IO_FAILS = [
    ("reply-magic", lambda c, r: c.chunk(r.cookie, T_OFFSET_DATA, u64(r.offset) + c.payload(r.offset, r.length),
                                         flags=REPLY_FLAG_DONE, magic=0xDEADBEEF), None, "EIO",
     f"{LOST}: invalid reply magic"),
    ("extended-reply-not-negotiated", lambda c, r: c.send(u32(EXT_REPLY_MAGIC) + u16(REPLY_FLAG_DONE) +
                                                          u16(T_OFFSET_DATA) + u64(r.cookie) + u64(r.offset) +
                                                          u64(8 + r.length)), None, "EIO",
     f"{LOST}: invalid reply magic"),
    ("unknown-cookie", lambda c, r: c.data_chunk(r.cookie ^ 0x5555, r.offset, r.length, flags=REPLY_FLAG_DONE),
     None, "EIO", f"{LOST}: no matching cookie"),
    ("duplicate-cookie", twice, [READ, READ2], "EIO", f"{LOST}: no matching cookie"),
    ("done-twice", done_twice, [READ, READ2], "EIO", f"{LOST}: no matching cookie"),
    ("simple-reply-to-structured-read", lambda c, r: c.simple(r.cookie, data=c.payload(r.offset, r.length)),
     None, "EIO", f"{LOST}: server sent unexpected simple reply"),
    ("structured-reply-not-negotiated",
     dict(structured=False, read=lambda c, r: c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)),
     None, "EIO", f"{LOST}: server sent unexpected structured reply"),
    ("chunk-length-huge", lambda c, r: raw_header(c, r, 0xFFFFFFF0), None, "EIO",
     f"{LOST}: invalid server reply length"),
    ("chunk-length-short-of-offset", lambda c, r: raw_header(c, r, 4), None, "EIO",
     f"{LOST}: too short length in NBD_REPLY_TYPE_OFFSET_DATA"),
    ("data-before-request", lambda c, r: c.data_chunk(r.cookie, r.offset - 8, r.length, flags=REPLY_FLAG_DONE),
     [READ2], "EIO", f"{LOST}: range of structured reply is out of bounds"),
    ("data-past-request", lambda c, r: c.data_chunk(r.cookie, r.offset + 8, r.length, flags=REPLY_FLAG_DONE),
     None, "EIO", f"{LOST}: range of structured reply is out of bounds"),
    ("hole-past-request", lambda c, r: c.hole_chunk(r.cookie, r.offset + r.length, 4096, flags=REPLY_FLAG_DONE),
     None, "EIO", f"{LOST}: range of structured reply is out of bounds"),
    ("hole-bad-length", lambda c, r: c.chunk(r.cookie, 2, u64(r.offset) + u32(r.length) + b"x",
                                             flags=REPLY_FLAG_DONE), None, "EIO",
     f"{LOST}: invalid length in NBD_REPLY_TYPE_OFFSET_HOLE"),
    # The server's chunks must cover the request exactly once (defect: success with stale bytes).
    ("done-without-data", lambda c, r: c.done(r.cookie), None, "EIO", "the server's reply covered 0 of 4096 bytes"),
    ("data-covers-half", lambda c, r: c.data_chunk(r.cookie, r.offset, r.length // 2, flags=REPLY_FLAG_DONE),
     None, "EIO", "the server's reply covered 2048 of 4096 bytes"),
    ("overlapping-chunks", overlap_excess, None, "EIO", "the server's reply has overlapping chunks"),
    ("overlap-cancels-gap", overlap_cancels_gap, None, "EIO", "the server's reply has overlapping chunks"),
    ("out-of-order-overlap", out_of_order_overlap, None, "EIO", "the server's reply has overlapping chunks"),
    ("vectored-read-done-without-data", lambda c, r: c.done(r.cookie), [f"read -v -P {FILL:#x} 0 12k"], "EIO",
     "the server's reply covered 0 of 12288 bytes"),
    ("missing-done-then-close", data_then_close, None, "EIO", f"{LOST}: the server closed the connection"),
    ("unknown-chunk-type", lambda c, r: c.chunk(r.cookie, 77, b"abcd", flags=REPLY_FLAG_DONE), None, "EIO",
     f"{LOST}: unknown structured reply type (77)"),
    ("unknown-error-chunk-type", lambda c, r: c.error_chunk(r.cookie, EPERM, b"go away", typ=0x8077, tail=b"tail"),
     None, "EPERM", "read at offset 0: server replied: Operation not permitted"),
    ("error-message-past-chunk", lambda c, r: c.error_chunk(r.cookie, EIO, b"short", msglen=200), None, "EIO",
     f"{LOST}: error message length too large"),
    ("error-chunk-shorter-than-error", lambda c, r: c.chunk(r.cookie, 0x8001, b"\0\0", flags=REPLY_FLAG_DONE),
     None, "EIO", f"{LOST}: too short length in structured reply error"),
    ("error-chunk-error-zero", lambda c, r: c.error_chunk(r.cookie, 0), None, "EINVAL",
     "server replied: Invalid argument"),
    ("error-offset-past-request", lambda c, r: c.error_chunk(r.cookie, EIO, typ=T_ERROR_OFFSET,
                                                             tail=u64(r.offset + (1 << 20))), None, "EIO",
     f"{LOST}: range of structured reply is out of bounds"),
    ("error-offset-in-request", lambda c, r: c.error_chunk(r.cookie, EIO, b"bad sector", typ=T_ERROR_OFFSET,
                                                           tail=u64(r.offset + 512)), None, "EIO",
     "read at offset 0: server replied: Input/output error"),
    ("block-status-chunk-for-read", lambda c, r: c.chunk(r.cookie, T_BLOCK_STATUS, u32(1) + u32(4096) + u32(0),
                                                         flags=REPLY_FLAG_DONE), None, "EIO",
     f"{LOST}: invalid command for receiving block-status chunk"),
    ("block-status-chunk-no-descriptors", lambda c, r: c.chunk(r.cookie, T_BLOCK_STATUS, u32(1),
                                                               flags=REPLY_FLAG_DONE), None, "EIO",
     f"{LOST}: invalid command for receiving block-status chunk"),
    ("none-chunk-without-done", lambda c, r: c.chunk(r.cookie, T_NONE), None, "EIO",
     f"{LOST}: NBD_REPLY_FLAG_DONE must be set"),
    ("none-chunk-with-payload", lambda c, r: c.chunk(r.cookie, T_NONE, b"abcd", flags=REPLY_FLAG_DONE), None,
     "EIO", f"{LOST}: invalid length in NBD_REPLY_TYPE_NONE"),
    ("close-before-reply", lambda c, r: c.close(), None, "EIO", f"{LOST}: the server closed the connection"),
    ("close-after-chunk-header", lambda c, r: (raw_header(c, r, 8 + r.length), c.close()), None, "EIO",
     f"{LOST}: recv: server disconnected unexpectedly"),
    ("close-mid-chunk-payload", lambda c, r: (raw_header(c, r, 8 + r.length), c.send(u64(r.offset) + b"Z" * 100),
                                              c.close()), None, "EIO",
     f"{LOST}: recv: server disconnected unexpectedly"),
    ("simple-close-after-header",
     dict(structured=False, read=lambda c, r: (c.send(u32(SIMPLE_MAGIC) + u32(0) + u64(r.cookie)), c.close())),
     None, "EIO", f"{LOST}: recv: server disconnected unexpectedly"),
    ("simple-close-mid-magic", dict(structured=False, read=lambda c, r: (c.send(u32(SIMPLE_MAGIC)), c.close())),
     None, "EIO", f"{LOST}: recv: server disconnected unexpectedly"),
    ("simple-unknown-nbd-error", dict(structured=False, read=lambda c, r: c.simple(r.cookie, error=12345)), None,
     "EINVAL", "server replied: Invalid argument"),
    ("offset-data-for-write",
     dict(write=lambda c, r: c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)),
     ["write -P 1 0 4k"], "EIO", f"{LOST}: invalid command for receiving offset-data chunk"),
    ("write-error-reply",
     dict(write=lambda c, r: c.simple(r.cookie, error=ENOSPC)),
     ["write -P 1 0 4k"], "ENOSPC", "server replied: No space left on device"),
]


@pytest.mark.parametrize("hook,cmds,err,text", [pytest.param(*x[1:], id=x[0]) for x in IO_FAILS])
def test_broken_reply_fails_request(hostile, vdisk_io, hook, cmds, err, text):
    s = hostile(Scenario(**hook) if isinstance(hook, dict) else Scenario(read=hook))
    cmds = cmds or [READ]
    p = io_run(vdisk_io, s, *cmds)
    assert p.returncode == 1, p.stdout + p.stderr
    # The failure is the driver's, on the last command: not a verification of wrong data.
    assert "verification failed" not in p.stderr and "touched memory" not in p.stderr, p.stderr
    assert p.stdout.count(" bytes at offset ") == len(cmds) - 1, p.stdout
    assert text in p.stderr and f"({strerror(err)})" in p.stderr, p.stderr


def split_in_order(c, r):
    c.hole_chunk(r.cookie, r.offset, 1024)
    c.data_chunk(r.cookie, r.offset + 1024, 3072, fill=0, flags=REPLY_FLAG_DONE)


def split_reversed(c, r):
    half = r.length // 2
    c.data_chunk(r.cookie, r.offset + half, half, fill=0)
    c.hole_chunk(r.cookie, r.offset, half)
    c.done(r.cookie)


def shuffled_pieces(n):
    """The read in n equal data chunks, in an order that leaves gaps and then closes them."""
    def hook(c, r):
        piece = r.length // n
        order = list(range(0, n, 2)) + list(range(1, n, 2))[::-1]  # evens, then odds backwards
        for i in order:
            c.data_chunk(r.cookie, r.offset + i * piece, piece, fill=0)
        c.done(r.cookie)
    return hook


def error_then_data(c, r):
    c.error_chunk(r.cookie, EIO, b"", flags=0)
    c.data_chunk(r.cookie, r.offset, r.length, flags=REPLY_FLAG_DONE)


@pytest.mark.parametrize("hook,cmds", [
    pytest.param(split_in_order, ["read -P 0 0 4k", "read -P 0 64k 4k"], id="hole-then-data"),
    pytest.param(split_reversed, ["read -P 0 0 4k", "read -v -P 0 0 12k"], id="chunks-out-of-order"),
    # 8 pieces leave 4 separate ranges that the odd ones join; 32 leave more than the driver tracks.
    pytest.param(shuffled_pieces(8), ["read -P 0 0 4k", "read -P 0 64k 4k"], id="shuffled-8"),
    pytest.param(shuffled_pieces(32), ["read -P 0 0 4k", "read -P 0 64k 4k"], id="shuffled-32"),
])
def test_legal_fragmented_replies_are_accepted(hostile, vdisk_io, hook, cmds):
    s = hostile(Scenario(read=hook))
    p = io_run(vdisk_io, s, *cmds)
    assert p.returncode == 0, p.stderr


def test_error_chunk_then_data_still_fails(hostile, vdisk_io):
    """An error chunk followed by data covering everything: the error wins (no silent success)."""
    s = hostile(Scenario(read=error_then_data))
    p = io_run(vdisk_io, s, READ, READ2)
    assert p.returncode == 1
    assert "server replied: Input/output error (Input/output error)" in p.stderr, p.stderr


def stall_read(c, r):
    c.stall()


def data_then_stall(c, r):
    c.data_chunk(r.cookie, r.offset, r.length)  # no DONE
    c.stall()


def header_then_stall(c, r):
    raw_header(c, r, 8 + r.length)
    c.send(u64(r.offset) + b"Z" * 100)
    c.stall()


@pytest.mark.parametrize("hook", [
    pytest.param(stall_read, id="no-reply"),
    pytest.param(data_then_stall, id="missing-done"),
    pytest.param(header_then_stall, id="mid-payload"),
])
def test_stalled_reply_times_out_and_destroy_returns(hostile, nbd_queues, hook):
    """do_io with a timeout gives -ETIME; destroy gives the server ~2 s to leave, then returns."""
    s = hostile(Scenario(read=hook))
    p = queues(nbd_queues, s, "stall")
    assert p.returncode == 0, p.stdout + p.stderr
    ms = int(re.search(r"destroy took (\d+) ms", p.stdout).group(1))
    assert ms < 5000, p.stdout


def test_stalled_server_with_many_requests_abandoned(hostile, nbd_queues):
    s = hostile(Scenario(read=lambda c, r: c.stall() if r.type == CMD_READ else None))
    h = subprocess.Popen([str(nbd_queues), "--set", f"path={s.path}", "abandon"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = h.communicate("go\n", timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        h.kill()
        out, err = h.communicate()
        pytest.fail(f"HANG: destroy on a stalled server\n{out}\n{err}")
    check_sanitizers("nbd-queues abandon", err)
    assert h.returncode == 0, err
    assert int(re.search(r"destroy took (\d+) ms", out).group(1)) < 5000, out
