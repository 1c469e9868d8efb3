# SPDX-License-Identifier: LGPL-2.1-or-later
"""
A raw vhost-user front end in Python, for what a well-behaved client
library cannot do: malformed messages, hand-made descriptor chains (bad
indexes, loops, buffers outside shared memory, indirect tables), requests
on a read-only export, GET_ID, and hanging up with requests in flight.

Memory: one memfd of `mem` bytes shared as one region, guest physical
address 0, front-end virtual address UVA.  Virtqueue i's rings live in page
i (descriptor table, avail ring) and page 16+i (used ring); request headers,
data and status bytes are allocated from DATA onwards by the test.
"""
import mmap
import os
import select
import socket
import struct
import time

UVA = 0x7f0000000000
DATA = 64 * 4096

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32

F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_DISCARD, F_WRITE_ZEROES = 5, 6, 9, 12, 13, 14
F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1 = 28, 29, 30, 32
PF_MQ, PF_REPLY_ACK, PF_CONFIG, PF_INFLIGHT = 0, 3, 9, 12

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4

FLAG_VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 1, 4, 8


class Closed(Exception):
    """The back end hung up."""


class Frontend:
    def __init__(self, path, mem=4 << 20, timeout=10, memfd=None):
        """memfd: share this memory (a front end reconnecting with the same guest RAM) instead of a new one."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.memfd = os.memfd_create("vhu-test") if memfd is None else os.dup(memfd)
        if memfd is None:
            os.ftruncate(self.memfd, mem)
        self.mem = mmap.mmap(self.memfd, mem)
        self.size = mem
        self.queues = {}
        self.brk = DATA
        self.reply_ack = False

    def close(self):
        self.sock.close()
        for q in self.queues.values():
            os.close(q["kick"])
            os.close(q["call"])
        self.queues = {}
        self.mem.close()
        os.close(self.memfd)

    def hang_up(self):
        """Close only the socket and the eventfds (the memory stays for the next front end)."""
        self.sock.close()
        for q in self.queues.values():
            os.close(q["kick"])
            os.close(q["call"])
        self.queues = {}

    # ---- messages ---------------------------------------------------------------------------

    def send(self, request, payload=b"", fds=(), flags=FLAG_VERSION, size=None):
        hdr = struct.pack("<III", request, flags, len(payload) if size is None else size)
        if fds:
            socket.send_fds(self.sock, [hdr + payload], list(fds))
        else:
            self.sock.sendall(hdr + payload)

    def recv_fds(self, request):
        """A reply that may carry fds: (payload, [fds])."""
        msg, fds, _, _ = socket.recv_fds(self.sock, 12, 4)
        if not msg:
            raise Closed()
        hdr = msg + self._recv_exact(12 - len(msg))
        req, flags, size = struct.unpack("<III", hdr)
        assert flags & FLAG_REPLY and req == request, (req, flags)
        return self._recv_exact(size), fds

    def recv(self, request=None):
        hdr = self._recv_exact(12)
        req, flags, size = struct.unpack("<III", hdr)
        payload = self._recv_exact(size)
        assert flags & FLAG_REPLY, f"reply without the REPLY flag: {flags:#x}"
        if request is not None:
            assert req == request, f"reply to {req}, expected {request}"
        return payload

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                raise Closed()
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def hung_up(self, timeout=5):
        """True once the back end closed the connection (reads EOF)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if r:
                try:
                    data = self.sock.recv(4096)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
        return False

    def get_u64(self, request):
        self.send(request)
        return struct.unpack("<Q", self.recv(request))[0]

    def set_u64(self, request, value, ack=None):
        ack = self.reply_ack if ack is None else ack
        self.send(request, struct.pack("<Q", value), flags=FLAG_VERSION | (FLAG_NEED_REPLY if ack else 0))
        if ack:
            return struct.unpack("<Q", self.recv(request))[0]
        return None

    def msg(self, request, payload=b"", fds=()):
        """Send a message without a reply of its own; with REPLY_ACK return the ack value."""
        self.send(request, payload, fds, flags=FLAG_VERSION | (FLAG_NEED_REPLY if self.reply_ack else 0))
        if self.reply_ack:
            return struct.unpack("<Q", self.recv(request))[0]
        return None

    # ---- inflight I/O tracking ---------------------------------------------------------------

    def get_inflight(self, num_queues=1, queue_size=16):
        """GET_INFLIGHT_FD: (mmap_size, mmap_offset, fd or None)."""
        self.send(GET_INFLIGHT_FD, struct.pack("<QQHHI", 0, 0, num_queues, queue_size, 0))
        p, fds = self.recv_fds(GET_INFLIGHT_FD)
        size, off, nq, qs = struct.unpack_from("<QQHH", p)
        assert (nq, qs) == (num_queues, queue_size) and len(p) == 24
        return size, off, (fds[0] if fds else None)

    def set_inflight(self, fd, size, num_queues=1, queue_size=16, offset=0):
        return self.msg(SET_INFLIGHT_FD, struct.pack("<QQHHI", size, offset, num_queues, queue_size, 0),
                        [fd] if fd is not None else [])

    # ---- set-up ------------------------------------------------------------------------------

    def negotiate(self, features=None, proto=(1 << PF_MQ) | (1 << PF_REPLY_ACK) | (1 << PF_CONFIG)):
        self.send(SET_OWNER)
        self.offered = self.get_u64(GET_FEATURES)
        pf = self.get_u64(GET_PROTOCOL_FEATURES)
        self.set_u64(SET_PROTOCOL_FEATURES, pf & proto, ack=False)
        self.reply_ack = bool(pf & proto & (1 << PF_REPLY_ACK))
        if features is None:
            features = self.offered & ((1 << F_VERSION_1) | (1 << F_PROTOCOL) | (1 << F_INDIRECT) | (1 << F_FLUSH)
                                       | (1 << F_DISCARD) | (1 << F_WRITE_ZEROES) | (1 << F_RO) | (1 << F_MQ)
                                       | (1 << F_BLK_SIZE))
        self.features = features
        assert self.set_u64(SET_FEATURES, features) in (None, 0)
        return self.offered

    def config(self, size=60):
        self.send(GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        p = self.recv(GET_CONFIG)
        off, sz, _ = struct.unpack_from("<III", p)
        assert (off, sz) == (0, size)
        data = p[12:]
        capacity, size_max, seg_max = struct.unpack_from("<QII", data)
        blk_size = struct.unpack_from("<I", data, 20)[0]
        num_queues = struct.unpack_from("<H", data, 34)[0]
        return dict(capacity=capacity, seg_max=seg_max, blk_size=blk_size, num_queues=num_queues)

    def mem_table(self, regions=None, fds=None):
        if regions is None:
            regions = [(0, self.size, UVA, 0)]
        if fds is None:
            fds = [self.memfd] * len(regions)
        payload = struct.pack("<II", len(regions), 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
        return self.msg(SET_MEM_TABLE, payload, fds)

    def setup_queue(self, idx=0, num=16):
        desc, avail, used = idx * 4096, idx * 4096 + 16 * num, (16 + idx) * 4096
        assert self.msg(SET_VRING_NUM, struct.pack("<II", idx, num)) in (None, 0)
        assert self.msg(SET_VRING_BASE, struct.pack("<II", idx, 0)) in (None, 0)
        assert self.msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", idx, 0, UVA + desc, UVA + used, UVA + avail, 0)) \
            in (None, 0)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert self.msg(SET_VRING_CALL, struct.pack("<Q", idx), [call]) in (None, 0)
        assert self.msg(SET_VRING_KICK, struct.pack("<Q", idx), [kick]) in (None, 0)
        assert self.msg(SET_VRING_ENABLE, struct.pack("<II", idx, 1)) in (None, 0)
        self.queues[idx] = dict(num=num, desc=desc, avail=avail, used=used, kick=kick, call=call, avail_idx=0,
                                used_seen=0)

    def start(self, num=16, queues=1, **kw):
        self.negotiate(**kw)
        self.mem_table()
        for i in range(queues):
            self.setup_queue(i, num)

    # ---- requests ------------------------------------------------------------------------------

    def alloc(self, n, align=16):
        self.brk = (self.brk + align - 1) // align * align
        off = self.brk
        self.brk += n
        assert self.brk <= self.size
        return off

    def write_desc(self, table_off, i, addr, length, flags, nxt=0):
        struct.pack_into("<QIHH", self.mem, table_off + 16 * i, addr, length, flags, nxt)

    def post(self, head, qi=0):
        """Put head on the avail ring and kick."""
        q = self.queues[qi]
        struct.pack_into("<H", self.mem, q["avail"] + 4 + 2 * (q["avail_idx"] % q["num"]), head)
        q["avail_idx"] = (q["avail_idx"] + 1) & 0xffff
        struct.pack_into("<H", self.mem, q["avail"] + 2, q["avail_idx"])
        os.eventfd_write(q["kick"], 1)

    def used(self, qi=0, timeout=10):
        """Wait for the next used element: (id, len)."""
        q = self.queues[qi]
        end = time.monotonic() + timeout
        while struct.unpack_from("<H", self.mem, q["used"] + 2)[0] == q["used_seen"]:
            if time.monotonic() > end:
                return None
            time.sleep(0.001)
        e = struct.unpack_from("<II", self.mem, q["used"] + 4 + 8 * (q["used_seen"] % q["num"]))
        q["used_seen"] = (q["used_seen"] + 1) & 0xffff
        return e

    def prepare(self, type_, sector=0, data=b"", in_len=0, qi=0, head=0):
        """Write a direct chain at head without posting it: returns (status offset, in offset, in length)."""
        hdr = self.alloc(16)
        struct.pack_into("<IIQ", self.mem, hdr, type_, 0, sector)
        bufs = [(hdr, 16, 0)]
        if data:
            off = self.alloc(len(data), 512)
            self.mem[off:off + len(data)] = data
            bufs.append((off, len(data), 0))
        inb = None
        if in_len:
            inb = self.alloc(in_len, 512)
            bufs.append((inb, in_len, D_WRITE))
        st = self.alloc(1, 1)
        self.mem[st] = 0xff
        bufs.append((st, 1, D_WRITE))
        q = self.queues[qi]
        for i, (a, n, f) in enumerate(bufs):
            self.write_desc(q["desc"], head + i, a, n, f | (D_NEXT if i + 1 < len(bufs) else 0), head + i + 1)
        return st, inb, in_len

    def request(self, type_, sector=0, data=b"", in_len=0, qi=0, head=0, indirect=False, timeout=10):
        """One request: header, [data out], [in buffer], status.  Returns (status, in bytes, used len)."""
        hdr = self.alloc(16)
        struct.pack_into("<IIQ", self.mem, hdr, type_, 0, sector)
        bufs = [(hdr, 16, 0)]
        if data:
            off = self.alloc(len(data), 512)
            self.mem[off:off + len(data)] = data
            bufs.append((off, len(data), 0))
        inb = None
        if in_len:
            inb = self.alloc(in_len, 512)
            bufs.append((inb, in_len, D_WRITE))
        st = self.alloc(1, 1)
        self.mem[st] = 0xff
        bufs.append((st, 1, D_WRITE))
        return self.submit_chain(bufs, qi=qi, head=head, indirect=indirect, status=st, inb=inb, in_len=in_len,
                                 timeout=timeout)

    def submit_chain(self, bufs, qi=0, head=0, indirect=False, status=None, inb=None, in_len=0, timeout=10):
        q = self.queues[qi]
        if indirect:
            table = self.alloc(16 * len(bufs), 16)
            for i, (a, n, f) in enumerate(bufs):
                self.write_desc(table, i, a, n, f | (D_NEXT if i + 1 < len(bufs) else 0), i + 1)
            self.write_desc(q["desc"], head, table, 16 * len(bufs), D_INDIRECT)
        else:
            for i, (a, n, f) in enumerate(bufs):
                self.write_desc(q["desc"], head + i, a, n, f | (D_NEXT if i + 1 < len(bufs) else 0), head + i + 1)
        self.post(head, qi)
        u = self.used(qi, timeout)
        if u is None:
            return None
        return (self.mem[status] if status is not None else None,
                bytes(self.mem[inb:inb + in_len]) if inb is not None else b"", u[1])
