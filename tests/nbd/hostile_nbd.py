# SPDX-License-Identifier: LGPL-2.1-or-later
"""
A scriptable, deliberately broken NBD server (raw sockets, Unix socket) for
tests/nbd/test_hostile_server.py.

It speaks enough of the NBD protocol (doc/proto.md of the NBD project) to
get a client through a normal fixed-newstyle handshake (NBD_OPT_STRUCTURED_
REPLY, NBD_OPT_GO / NBD_OPT_INFO with NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE,
NBD_REP_ERR_UNSUP for any other option, NBD_OPT_EXPORT_NAME) and
to serve reads and writes from an in-memory export filled with FILL, so
that a scenario only overrides the one step where it misbehaves.

A Scenario holds the knobs: handshake fields (magics, sizes, flags, block
sizes, extra or replacement option replies, where to close or stall) and a
`read` hook called for NBD_CMD_READ requests that decides what goes back on
the wire.  The server runs in a thread of the test process and serves any
number of connections (the client may open one per queue).
"""
import os
import socket
import struct
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C    # extended headers (never negotiated with libnbd 1.14)

# Handshake flags, options, option replies, info types.
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN = 2**31 + 6, 2**31 + 7
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# Transmission flags.
TF_HAS_FLAGS, TF_READ_ONLY, TF_FLUSH, TF_FUA = 1, 2, 4, 8
TF_TRIM, TF_WRITE_ZEROES, TF_DF, TF_MULTI_CONN, TF_FAST_ZERO = 32, 64, 128, 256, 2048
DEFAULT_EFLAGS = TF_HAS_FLAGS | TF_FLUSH | TF_FUA | TF_TRIM | TF_WRITE_ZEROES | TF_DF

# Commands and replies.
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
REPLY_FLAG_DONE = 1
T_NONE, T_OFFSET_DATA, T_OFFSET_HOLE, T_BLOCK_STATUS = 0, 1, 2, 5
T_ERROR, T_ERROR_OFFSET = 2**15 + 1, 2**15 + 2
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28

SIZE = 1 << 20
FILL = 0x5A


class Closed(Exception):
    """The client went away (or the scenario ended the connection)."""


def u16(x):
    return struct.pack(">H", x)


def u32(x):
    return struct.pack(">I", x)


def u64(x):
    return struct.pack(">Q", x)


class Scenario:
    """Knobs; every one defaults to a well-behaved server."""

    def __init__(self, **kw):
        self.greeting = u64(NBDMAGIC) + u64(IHAVEOPT)
        self.gflags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        self.size = SIZE
        self.eflags = DEFAULT_EFLAGS
        self.block = None            # (min, pref, max) for NBD_INFO_BLOCK_SIZE, or None
        self.info_export = None      # raw NBD_REP_INFO payload replacing NBD_INFO_EXPORT
        self.extra_infos = []        # raw NBD_REP_INFO payloads sent before the export info
        self.go_reply = None         # (reply type, payload) replacing the final NBD_REP_ACK
        self.structured = True       # accept NBD_OPT_STRUCTURED_REPLY
        self.opt_reply = None        # f(conn, option, data) -> True if it answered, "go" if that ended
                                     # the handshake, False for the default answer
        self.close_at = None         # "greeting", "cflags", "option", "go"
        self.stall_at = None         # same stages: send nothing more, keep the socket open
        self.read = None             # f(conn, req) -> None; default serve_read
        self.write = None            # f(conn, req) -> None; default ack
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown scenario knob {k}")
            setattr(self, k, v)


class Req:
    def __init__(self, flags, typ, cookie, offset, length):
        self.flags, self.type, self.cookie, self.offset, self.length = flags, typ, cookie, offset, length

    def __repr__(self):
        return f"Req(type={self.type} cookie={self.cookie} off={self.offset} len={self.length})"


class Conn:
    """One client connection and the helpers a scenario uses to answer it."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.sc = server.scenario
        self.structured = False
        self.data = server.data
        self.reads = 0        # NBD_CMD_READ requests seen on this connection
        self.index = 0        # connection number (0 = first)

    # -- raw I/O
    def send(self, b):
        try:
            self.sock.sendall(b)
        except OSError as e:
            raise Closed() from e

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as e:
                raise Closed() from e
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def stall(self):
        """Answer nothing more, but keep the connection open until the client leaves."""
        while not self.server.stopping.is_set():
            try:
                self.sock.settimeout(0.1)
                if not self.sock.recv(65536):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        raise Closed()

    def close(self):
        raise Closed()

    # -- handshake
    def opt_reply(self, option, reply, payload=b"", magic=REPLY_MAGIC):
        self.send(u64(magic) + u32(option) + u32(reply) + u32(len(payload)) + payload)

    def info_export(self, size=None, eflags=None):
        return u16(INFO_EXPORT) + u64(self.sc.size if size is None else size) + \
            u16(self.sc.eflags if eflags is None else eflags)

    def stage(self, name):
        if self.sc.close_at == name:
            raise Closed()
        if self.sc.stall_at == name:
            self.stall()

    def handshake(self):
        sc = self.sc
        self.send(sc.greeting + u16(sc.gflags))
        self.stage("greeting")
        cflags = struct.unpack(">I", self.recv(4))[0]
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        self.stage("cflags")
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            if magic != IHAVEOPT:
                raise Closed()
            data = self.recv(length)
            self.stage("option")
            answered = sc.opt_reply(self, option, data) if sc.opt_reply else False
            if answered == "go":
                return  # the hook finished the handshake itself
            if answered:
                continue
            if option == OPT_STRUCTURED_REPLY and sc.structured:
                self.structured = True
                self.opt_reply(option, REP_ACK)
            elif option in (OPT_GO, OPT_INFO):
                self.stage("go")
                for p in sc.extra_infos:
                    self.opt_reply(option, REP_INFO, p)
                self.opt_reply(option, REP_INFO, sc.info_export if sc.info_export is not None
                               else self.info_export())
                if sc.block is not None:
                    self.opt_reply(option, REP_INFO, u16(INFO_BLOCK_SIZE) + struct.pack(">III", *sc.block))
                if sc.go_reply is not None:
                    self.opt_reply(option, *sc.go_reply)
                    if sc.go_reply[0] != REP_ACK:
                        continue
                else:
                    self.opt_reply(option, REP_ACK)
                if option == OPT_GO:
                    return
            elif option == OPT_EXPORT_NAME:
                self.send(u64(sc.size) + u16(sc.eflags) + (b"" if self.no_zeroes else bytes(124)))
                return
            elif option == OPT_ABORT:
                self.opt_reply(option, REP_ACK)
                raise Closed()
            else:
                self.opt_reply(option, REP_ERR_UNSUP)

    # -- transmission
    def simple(self, cookie, error=0, data=b"", magic=SIMPLE_MAGIC):
        self.send(u32(magic) + u32(error) + u64(cookie) + data)

    def chunk(self, cookie, typ, payload=b"", flags=0, length=None, magic=STRUCTURED_MAGIC):
        """One structured reply chunk; length overrides the header's length field only."""
        n = len(payload) if length is None else length
        self.send(u32(magic) + u16(flags) + u16(typ) + u64(cookie) + u32(n) + payload)

    def data_chunk(self, cookie, offset, length, flags=0, fill=None):
        self.chunk(cookie, T_OFFSET_DATA, u64(offset) + self.payload(offset, length, fill), flags)

    def hole_chunk(self, cookie, offset, length, flags=0):
        self.chunk(cookie, T_OFFSET_HOLE, u64(offset) + u32(length), flags)

    def error_chunk(self, cookie, error, msg=b"", flags=REPLY_FLAG_DONE, typ=T_ERROR, msglen=None, tail=b""):
        n = len(msg) if msglen is None else msglen
        self.chunk(cookie, typ, u32(error) + u16(n) + msg + tail, flags)

    def done(self, cookie):
        self.chunk(cookie, T_NONE, flags=REPLY_FLAG_DONE)

    def payload(self, offset, length, fill=None):
        if fill is not None:
            return bytes([fill]) * length
        end = min(offset + length, len(self.data))
        b = bytes(self.data[offset:end]) if offset < len(self.data) else b""
        return b + bytes([FILL]) * (length - len(b))

    def serve_read(self, req):
        if self.structured:
            self.data_chunk(req.cookie, req.offset, req.length, flags=REPLY_FLAG_DONE)
        else:
            self.simple(req.cookie, data=self.payload(req.offset, req.length))

    def reply_ok(self, req):
        if self.structured:
            self.done(req.cookie)
        else:
            self.simple(req.cookie)

    def transmission(self):
        while True:
            magic, flags, typ, cookie, offset, length = struct.unpack(">IHHQQI", self.recv(28))
            if magic != REQUEST_MAGIC:
                raise Closed()
            req = Req(flags, typ, cookie, offset, length)
            if typ == CMD_WRITE:
                data = self.recv(length)
                if self.sc.write:
                    self.sc.write(self, req)
                    continue
                if offset + length <= len(self.data):
                    self.data[offset:offset + length] = data
                self.reply_ok(req)
            elif typ == CMD_READ:
                self.reads += 1
                (self.sc.read or Conn.serve_read)(self, req)
            elif typ == CMD_DISC:
                raise Closed()
            else:
                self.reply_ok(req)


class HostileServer:
    """Listen on a Unix socket path and serve every connection with scenario."""

    def __init__(self, path, scenario):
        self.path = str(path)
        self.scenario = scenario
        self.data = bytearray([FILL]) * min(scenario.size, 4 << 20)
        self.stopping = threading.Event()
        self.errors = []      # exceptions raised by scenario code (test bugs)
        self.connections = 0
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.path)
        self.lsock.listen(16)
        self.lsock.settimeout(0.1)
        self.threads = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            s.settimeout(None)
            c = Conn(self, s)
            c.index = self.connections
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c):
        try:
            c.handshake()
            c.transmission()
        except Closed:
            pass
        except Exception as e:  # a bug in the scenario: make the test fail
            self.errors.append(e)
        finally:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.sock.close()

    def stop(self):
        self.stopping.set()
        self.lsock.close()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False
