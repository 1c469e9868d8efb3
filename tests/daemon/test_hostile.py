# SPDX-License-Identifier: GPL-2.0-or-later
"""
Hostile and broken clients on raw sockets: bad magic, oversized lengths,
unknown commands, floods, disconnects mid-request, clients that never read.
Each ends with the daemon still serving a well-behaved client (and, with a
sanitizer build, stopping without reports).
"""
import socket
import struct
import time

import pytest

from conftest import MiB, nbd_handle

nbd = pytest.importorskip("nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
REP_ACK, REP_INFO = 1, 3
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_server(s, timeout=10):
    """True once the server hung up (reads return EOF or the connection resets)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def connect(d):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.nbd_path))
    magic, opts, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opts == IHAVEOPT and flags & 1
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return s


def send_opt(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def recv_rep(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REP_MAGIC
    return opt, rtype, recv_exact(s, length)


def go(d, name=b"r0"):
    """A transmission-phase socket with simple replies; returns (socket, size)."""
    s = connect(d)
    send_opt(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = None
    while True:
        opt, rtype, data = recv_rep(s)
        if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            size = struct.unpack(">Q", data[2:10])[0]
        elif rtype == REP_ACK:
            return s, size
        else:
            assert rtype & 0x80000000 == 0, (rtype, data)


def request(s, cmd, offset, length, cookie=1, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload)


def simple_reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_MAGIC
    return err, cookie


def assert_healthy(d):
    h = nbd_handle(d.uri("r0"))
    h.pwrite(b"ok" * 2048, 0)
    assert h.pread(4096, 0) == b"ok" * 2048
    h.shutdown()


def test_bad_option_magic(raw_daemon):
    s = connect(raw_daemon)
    s.sendall(struct.pack(">QII", 0x1234, OPT_GO, 0))
    assert closed_by_server(s)
    assert_healthy(raw_daemon)


def test_unknown_client_flags(raw_daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(raw_daemon.nbd_path))
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 0x80))
    assert closed_by_server(s)
    assert_healthy(raw_daemon)


def test_option_flood(raw_daemon):
    s = connect(raw_daemon)
    replies = 0
    try:
        for _ in range(400):
            send_opt(s, 1000)
            opt, rtype, _ = recv_rep(s)
            assert rtype == 0x80000001  # NBD_REP_ERR_UNSUP
            replies += 1
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass
    assert 200 <= replies <= 300
    assert_healthy(raw_daemon)


def test_oversized_option(raw_daemon):
    s = connect(raw_daemon)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 30))
    opt, rtype, _ = recv_rep(s)
    assert rtype & 0x80000000
    assert closed_by_server(s)
    assert_healthy(raw_daemon)


def test_unknown_export_name_hangs_up(raw_daemon):
    s = connect(raw_daemon)
    send_opt(s, OPT_EXPORT_NAME, b"nosuch")
    assert closed_by_server(s)


def test_abort(raw_daemon):
    s = connect(raw_daemon)
    send_opt(s, OPT_ABORT)
    assert recv_rep(s)[1] == REP_ACK
    assert closed_by_server(s)


def test_silent_client_times_out(daemon_factory, raw_image):
    d = daemon_factory(["--blockdev", f"driver=file,node-name=r0,filename={raw_image}"], nbd=False)
    d.qmp("nbd-server-start", addr={"type": "unix", "path": str(d.nbd_path)}, handshake_max_seconds=1)
    d.qmp("block-export-add", type="nbd", id="e", node_name="r0", writable=True)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.nbd_path))
    t = time.monotonic()
    assert closed_by_server(s, timeout=15)
    assert 0.5 < time.monotonic() - t < 9
    assert_healthy(d)


def test_bad_request_magic(raw_daemon):
    s, _ = go(raw_daemon)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    assert closed_by_server(s)
    assert_healthy(raw_daemon)


def test_unknown_command_gets_einval(raw_daemon):
    s, _ = go(raw_daemon)
    request(s, 99, 0, 0, cookie=7)
    assert simple_reply(s) == (22, 7)
    request(s, CMD_READ, 0, 512, cookie=8)
    assert simple_reply(s) == (0, 8)
    recv_exact(s, 512)
    request(s, CMD_READ, 0, 512, cookie=9, flags=0x4000)  # unknown flag
    assert simple_reply(s) == (22, 9)


def test_out_of_range_and_oversize_read(raw_daemon):
    s, size = go(raw_daemon)
    request(s, CMD_READ, size, 512, cookie=1)
    assert simple_reply(s) == (22, 1)
    request(s, CMD_READ, 2 ** 64 - 512, 1024, cookie=2)
    assert simple_reply(s) == (22, 2)
    request(s, CMD_READ, 0, 64 * MiB, cookie=3)
    assert simple_reply(s) == (22, 3)
    request(s, CMD_WRITE, size - 256, 512, cookie=4, payload=b"x" * 512)
    assert simple_reply(s) == (28, 4)  # ENOSPC, payload consumed
    request(s, CMD_READ, 0, 16, cookie=5)
    assert simple_reply(s) == (0, 5)


def test_zero_length_write(raw_daemon):
    # No payload, so no buffer: the UBSan build aborted on memcpy(NULL, ..., 0).
    s, _ = go(raw_daemon)
    request(s, CMD_WRITE, 0, 0, cookie=1)
    assert simple_reply(s) == (0, 1)
    request(s, CMD_READ, 0, 16, cookie=2)
    assert simple_reply(s) == (0, 2)
    recv_exact(s, 16)
    assert_healthy(raw_daemon)


def test_oversize_write_hangs_up(raw_daemon):
    s, _ = go(raw_daemon)
    request(s, CMD_WRITE, 0, 1 << 30, cookie=1)
    assert closed_by_server(s)
    assert_healthy(raw_daemon)


def test_disconnect_mid_write(raw_daemon):
    for _ in range(5):
        s, _ = go(raw_daemon)
        request(s, CMD_WRITE, 0, MiB, cookie=1, payload=b"y" * (MiB // 2))
        s.close()
    assert_healthy(raw_daemon)


def test_disconnect_with_requests_in_flight(raw_daemon):
    for _ in range(3):
        s, _ = go(raw_daemon)
        for i in range(100):
            request(s, CMD_READ, (i % 60) * MiB, MiB, cookie=i)
        s.close()
    assert_healthy(raw_daemon)


def test_slow_reader_does_not_block_others(raw_daemon):
    """A client that never reads its replies is held back; others keep their latency."""
    s, _ = go(raw_daemon)
    s.setblocking(False)
    sent = 0
    payload = struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 1, 0, 4 * MiB)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            s.send(payload)
            sent += 1
        except BlockingIOError:
            break
    # It could only queue so much before the server stopped reading.
    assert sent < 100000
    t = time.monotonic()
    assert_healthy(raw_daemon)
    assert time.monotonic() - t < 8
    out = raw_daemon.qmp("query-block-exports")
    assert {e["id"]: e for e in out}["e0"]["connections"] >= 1
    s.close()
    assert_healthy(raw_daemon)


def test_disc_finishes_in_flight(raw_daemon):
    s, _ = go(raw_daemon)
    for i in range(8):
        request(s, CMD_READ, i * MiB, 64 * 1024, cookie=i)
    request(s, CMD_DISC, 0, 0, cookie=99)
    got = set()
    for _ in range(8):
        err, cookie = simple_reply(s)
        assert err == 0
        recv_exact(s, 64 * 1024)
        got.add(cookie)
    assert got == set(range(8))
    assert closed_by_server(s)


def test_max_connections(daemon_factory, raw_image):
    d = daemon_factory(["--blockdev", f"driver=file,node-name=r0,filename={raw_image}"], nbd=False)
    d.qmp("nbd-server-start", addr={"type": "unix", "path": str(d.nbd_path)}, max_connections=2)
    d.qmp("block-export-add", type="nbd", id="e", node_name="r0")
    a = nbd_handle(d.uri("r0"))
    b = nbd_handle(d.uri("r0"))
    with pytest.raises(nbd.Error):
        nbd_handle(d.uri("r0"))
    a.shutdown()
    wait = time.monotonic() + 5
    while True:
        try:
            c = nbd_handle(d.uri("r0"))
            break
        except nbd.Error:
            assert time.monotonic() < wait
            time.sleep(0.05)
    b.shutdown()
    c.shutdown()


def test_hard_export_del_with_io_in_flight_on_iothread(daemon_factory, raw_image):
    """Clients in an iothread, requests in flight, one client not reading: the export goes, the daemon stays."""
    d = daemon_factory(["--object", "iothread,id=io0",
                        "--blockdev", f"driver=file,node-name=f0,filename={raw_image}",
                        "--blockdev", "driver=raw,node-name=r0,file=f0",
                        "--export", "type=nbd,id=e0,node-name=r0,writable=on,iothread=io0"])
    handles = [nbd_handle(d.uri("r0")) for _ in range(3)]
    for h in handles:
        for i in range(32):
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 65536)), i * 65536)
    s, _ = go(d)  # a client that never reads its replies
    s.setblocking(False)
    try:
        while True:
            s.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 1, 0, 4 * MiB))
    except BlockingIOError:
        pass
    t = time.monotonic()
    d.qmp("block-export-del", id="e0", mode="hard")
    assert time.monotonic() - t < 10
    for h in handles:
        try:
            while h.aio_in_flight() > 0:
                h.poll(1000)
        except nbd.Error:
            pass
    s.close()
    d.qmp("block-export-add", type="nbd", id="e0", node_name="r0", writable=True, iothread="io0")
    assert_healthy(d)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def settled_rss_mib(pid, timeout=15):
    """The daemon's RSS once it stopped growing for a second."""
    last, since = rss_mib(pid), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_mib(pid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 1:
            break
    return last


def test_clients_that_never_read_share_one_budget(daemon_factory):
    """
    Many clients that queue reads and never read the replies: each alone
    may pin its own 64 MiB budget, but all of them together are held to the
    lane's budget (256 MiB) plus one request each, not 64 MiB per client.
    """
    clients, length = 24, 4 * MiB
    d = daemon_factory(["--blockdev", "driver=null-co,node-name=r0,size=1G,read-zeroes=on",
                        "--export", "type=nbd,id=e0,node-name=r0,writable=on"])
    def healthy():
        h = nbd_handle(d.uri("r0"))
        assert h.pread(4096, 0) == bytes(4096)  # a null node reads zeroes
        h.shutdown()

    healthy()
    base = settled_rss_mib(d.proc.pid)
    socks = []
    for c in range(clients):
        s, _ = go(d)
        s.sendall(b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, i, i * length, length)
                           for i in range(32)))  # 128 MiB of reads, never read
        socks.append(s)
    grown = settled_rss_mib(d.proc.pid) - base
    print(f"RSS grew by {grown} MiB with {clients} clients not reading")
    # Per-connection budgets alone allow 24 * 64 MiB = 1.5 GiB.
    assert grown < 256 + clients * length // MiB + 200, f"RSS grew by {grown} MiB"
    t = time.monotonic()
    healthy()  # the lane's budget is pinned, yet a new client's first request goes ahead
    assert time.monotonic() - t < 8
    for s in socks:
        s.close()
    healthy()


def test_held_request_goes_ahead_when_a_request_without_payload_ends(daemon_factory):
    """
    The lane's budget is pinned by clients that never read; a client's second
    request waits for room.  When its first request, one without payload (a
    flush), completes, the held one is its only request and must go ahead
    (the old daemon woke held readers only on releases of payload bytes).
    """
    d = daemon_factory(["--blockdev", "driver=null-co,node-name=r0,size=1G,read-zeroes=on,latency-ns=200000000",
                        "--export", "type=nbd,id=e0,node-name=r0,writable=on"])
    length, socks = 4 * MiB, []
    for c in range(6):  # 6 clients * 64 MiB: the lane's 256 MiB is pinned
        s, _ = go(d)
        s.sendall(b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, i, i * length, length)
                           for i in range(16)))
        socks.append(s)
    time.sleep(1)  # their reads complete and stay pinned behind unread replies
    s, _ = go(d)
    request(s, 3, 0, 0, cookie=1)  # NBD_CMD_FLUSH: no payload
    request(s, CMD_READ, 0, 64 * 1024, cookie=2)
    s.settimeout(10)
    got = set()
    for _ in range(2):
        err, cookie = simple_reply(s)
        assert err == 0
        if cookie == 2:
            assert recv_exact(s, 64 * 1024) == bytes(64 * 1024)
        got.add(cookie)
    assert got == {1, 2}
    for c in socks + [s]:
        c.close()
