# SPDX-License-Identifier: LGPL-2.1-or-later
"""
A scriptable, deliberately broken vhost-user-blk back end (Unix socket,
SCM_RIGHTS, the front end's memory mmap()ed from the SET_MEM_TABLE fds) for
tests/vhost-user/test_hostile_backend.py.

It speaks enough vhost-user (docs/interop/vhost-user.rst in QEMU) to get the
virtio-blk-vhost-user driver through its handshake -- features, protocol
features (MQ, REPLY_ACK, CONFIG), GET_QUEUE_NUM, GET_CONFIG, SET_MEM_TABLE,
the SET_VRING_* messages, GET_VRING_BASE -- and serves split virtqueues
(virtio 1.1 section 2.6: descriptor table, avail ring, used ring, indirect
tables) from an in-memory disk filled with FILL, so that a scenario only
overrides the one step where it misbehaves.

A Scenario holds the knobs: offered features, config space fields, a
`reply` hook per request code (called instead of the normal answer, with the
normal payload, so it can send a broken one, stall or hang up), and a
`complete` hook for data-plane requests (called with each request taken off
the avail ring; it decides what lands in the used ring).  The back end runs
in a thread of the test process and serves one connection at a time.
"""
import mmap
import os
import select
import socket
import struct
import threading
import time

# Front-end requests.
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD = 24, 25, 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38

FLAG_VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 1, 4, 8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY

# Feature bits.
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_MQ, F_DISCARD, F_WRITE_ZEROES = \
    1, 2, 5, 6, 9, 10, 12, 13, 14
F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1 = 28, 29, 30, 32
PF_MQ, PF_REPLY_ACK, PF_CONFIG, PF_INFLIGHT, PF_MEM_SLOTS = 0, 3, 9, 12, 15

DEFAULT_FEATURES = sum(1 << b for b in (F_VERSION_1, F_PROTOCOL, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_INDIRECT,
                                        F_DISCARD, F_WRITE_ZEROES, F_MQ))
DEFAULT_PROTOCOL = (1 << PF_MQ) | (1 << PF_REPLY_ACK) | (1 << PF_CONFIG)

# virtio-blk requests and status.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4

SIZE = 4 << 20
FILL = 0x5A

# virtio_blk_config (virtio 1.1 5.2.4), 60 bytes.
CONFIG_FIELDS = ("capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
                 "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "writeback", "unused0",
                 "num_queues", "max_discard_sectors", "max_discard_seg", "discard_sector_alignment",
                 "max_write_zeroes_sectors", "max_write_zeroes_seg", "write_zeroes_may_unmap")
CONFIG_FMT = "<QIIHBBIBBHIBBHIIIIIB3x"
assert struct.calcsize(CONFIG_FMT) == 60


def u64(x):
    return struct.pack("<Q", x)


class Closed(Exception):
    """The front end went away (or the scenario ended the connection)."""


class Scenario:
    """Knobs; every one defaults to a well-behaved back end."""

    def __init__(self, **kw):
        self.features = DEFAULT_FEATURES
        self.protocol = DEFAULT_PROTOCOL
        self.queue_num = 2
        self.mem_slots = 32    # GET_MAX_MEM_SLOTS (protocol feature CONFIGURE_MEM_SLOTS, not offered by default)
        self.config = dict(capacity=SIZE // 512, seg_max=32, blk_size=512, num_queues=2,
                           max_discard_sectors=SIZE // 512, max_discard_seg=1, discard_sector_alignment=1,
                           max_write_zeroes_sectors=SIZE // 512, max_write_zeroes_seg=1)
        self.reply = {}        # request code -> hook(conn, flags, payload, normal reply) instead of the answer
        self.complete = None   # hook(conn, vq, req): what goes into the used ring (default: conn.finish(vq, req))
        self.fill = FILL
        for k, v in kw.items():
            if k == "config":
                self.config = {**self.config, **v}
            else:
                setattr(self, k, v)


class Req:
    """A virtio-blk request taken off the avail ring."""

    def __init__(self, head, type_, sector, out, inb, status):
        self.head, self.type, self.sector = head, type_, sector
        self.out = out          # [(mmap, offset, length)] device-readable data after the header
        self.inb = inb          # [(mmap, offset, length)] device-writable data before the status byte
        self.status = status    # (mmap, offset) of the status byte, or None
        self.in_len = sum(n for _, _, n in inb) + (1 if status else 0)

    def __repr__(self):
        return f"Req(head={self.head}, type={self.type}, sector={self.sector}, in_len={self.in_len})"


class Vq:
    def __init__(self, index):
        self.index = index
        self.num = 0
        self.desc = self.used = self.avail = None   # front-end addresses
        self.kick = self.call = None
        self.enabled = False
        self.last_avail = 0
        self.used_idx = 0
        self.seen = 0          # requests taken, over the connection's life


class Conn:
    """The back end's side of one connection."""

    def __init__(self, server, sock):
        self.server = server
        self.sc = server.sc
        self.sock = sock
        self.regions = []      # (uva, size, mmap, base offset in the mmap)
        self.vqs = {}
        self.reply_ack = False
        self.features = 0      # acknowledged by the front end
        self.disk = bytearray([self.sc.fill]) * SIZE
        self.pending = []      # requests a hook kept for later
        self.log = server.log

    # ---- control channel --------------------------------------------------------------------------------

    def recv_exact(self, n):
        b = b""
        while len(b) < n:
            chunk = self.sock.recv(n - len(b))
            if not chunk:
                raise Closed()
            b += chunk
        return b

    def recv_msg(self):
        """(request, flags, payload, [fds])."""
        msg, anc, _, _ = self.sock.recvmsg(12, socket.CMSG_SPACE(16 * 4))
        if not msg:
            raise Closed()
        fds = []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4]))
        hdr = msg + self.recv_exact(12 - len(msg))
        req, flags, size = struct.unpack("<III", hdr)
        return req, flags, self.recv_exact(size) if size else b"", fds

    def send_msg(self, req, payload=b"", flags=REPLY_FLAGS, size=None, fds=()):
        data = struct.pack("<III", req, flags, len(payload) if size is None else size) + payload
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(data)

    def stall(self):
        """Send nothing more; wait for the front end to give up (hang up) or the test to end."""
        self.log.append("stall")
        while not self.server.stopping.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                try:
                    if not self.sock.recv(4096):
                        break
                except OSError:
                    break
        raise Closed()

    def hang_up(self):
        self.log.append("hang up")
        raise Closed()

    def ack(self, req, flags, value=0):
        if flags & FLAG_NEED_REPLY:
            self.send_msg(req, u64(value))

    def config_bytes(self):
        c = {f: 0 for f in CONFIG_FIELDS}
        c.update(self.sc.config)
        return struct.pack(CONFIG_FMT, *(c[f] for f in CONFIG_FIELDS))

    def normal_reply(self, req, payload):
        """What a well-behaved back end answers to req (None: no reply of its own)."""
        if req == GET_FEATURES:
            return u64(self.sc.features)
        if req == GET_PROTOCOL_FEATURES:
            return u64(self.sc.protocol)
        if req == GET_QUEUE_NUM:
            return u64(self.sc.queue_num)
        if req == GET_MAX_MEM_SLOTS:
            return u64(self.sc.mem_slots)
        if req == GET_CONFIG:
            off, size, flags = struct.unpack_from("<III", payload)
            return struct.pack("<III", off, size, flags) + (self.config_bytes() + bytes(256))[off:off + size]
        if req == GET_VRING_BASE:
            index, _ = struct.unpack_from("<II", payload)
            vq = self.vqs.get(index)
            return struct.pack("<II", index, vq.last_avail if vq else 0)
        return None

    def handle(self, req, flags, payload, fds):
        self.server.requests.append(req)
        hook = self.sc.reply.get(req)
        normal = self.normal_reply(req, payload)
        if hook:
            if hook(self, flags, payload, normal) is not False:
                for fd in fds:
                    os.close(fd)
                return
        self.apply(req, flags, payload, fds)
        if normal is not None:
            self.send_msg(req, normal)
        elif flags & FLAG_NEED_REPLY:
            self.ack(req, flags)

    def apply(self, req, flags, payload, fds):
        """The state change of a set-up message."""
        if req == SET_FEATURES:
            self.features = struct.unpack("<Q", payload)[0]
        elif req == SET_PROTOCOL_FEATURES:
            self.reply_ack = bool(struct.unpack("<Q", payload)[0] & (1 << PF_REPLY_ACK))
        elif req == SET_MEM_TABLE:
            n, _ = struct.unpack_from("<II", payload)
            for _, _, m, _ in self.regions:
                m.close()
            self.regions = []
            for i in range(n):
                gpa, size, uva, off = struct.unpack_from("<QQQQ", payload, 8 + 32 * i)
                self.regions.append((uva, size, mmap.mmap(fds[i], size + off, offset=0), off))
            for fd in fds:
                os.close(fd)
        elif req == ADD_MEM_REG:
            gpa, size, uva, off = struct.unpack_from("<QQQQ", payload, 8)
            self.regions.append((uva, size, mmap.mmap(fds[0], size + off, offset=0), off))
            os.close(fds[0])
        elif req == REM_MEM_REG:
            gpa, size, uva, off = struct.unpack_from("<QQQQ", payload, 8)
            for r in [r for r in self.regions if r[0] == uva and r[1] == size]:
                r[2].close()
                self.regions.remove(r)
        elif req in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE):
            index, num = struct.unpack_from("<II", payload)
            vq = self.vqs.setdefault(index, Vq(index))
            if req == SET_VRING_NUM:
                vq.num = num
            elif req == SET_VRING_BASE:
                vq.last_avail = vq.used_idx = num
            else:
                vq.enabled = bool(num)
        elif req == SET_VRING_ADDR:
            index, _, desc, used, avail, _ = struct.unpack_from("<IIQQQQ", payload)
            vq = self.vqs.setdefault(index, Vq(index))
            vq.desc, vq.used, vq.avail = desc, used, avail
        elif req in (SET_VRING_KICK, SET_VRING_CALL):
            u = struct.unpack("<Q", payload)[0]
            vq = self.vqs.setdefault(u & 0xff, Vq(u & 0xff))
            fd = fds[0] if fds else None
            old = vq.kick if req == SET_VRING_KICK else vq.call
            if old is not None:
                os.close(old)
            if req == SET_VRING_KICK:
                vq.kick = fd
            else:
                vq.call = fd
        elif req == GET_VRING_BASE:
            index, _ = struct.unpack_from("<II", payload)
            if index in self.vqs:
                self.vqs[index].enabled = False
        else:
            for fd in fds:
                os.close(fd)

    # ---- memory -----------------------------------------------------------------------------------------

    def translate(self, addr, length=1):
        """(mmap, offset) of front-end address addr; every region is identity-mapped by the driver."""
        for uva, size, m, base in self.regions:
            if uva <= addr and addr + length <= uva + size:
                return m, base + addr - uva
        raise RuntimeError(f"address {addr:#x}+{length} is in no region")

    def read(self, addr, fmt):
        m, off = self.translate(addr, struct.calcsize(fmt))
        return struct.unpack_from(fmt, m, off)

    def write(self, addr, fmt, *vals):
        m, off = self.translate(addr, struct.calcsize(fmt))
        struct.pack_into(fmt, m, off, *vals)

    # ---- data plane -------------------------------------------------------------------------------------

    def take(self, vq):
        """The next request on vq's avail ring, or None."""
        if vq.last_avail == self.read(vq.avail + 2, "<H")[0]:
            return None
        head = self.read(vq.avail + 4 + 2 * (vq.last_avail % vq.num), "<H")[0]
        vq.last_avail = (vq.last_avail + 1) & 0xffff
        vq.seen += 1
        if self.features & (1 << F_EVENT_IDX):
            self.write(vq.used + 4 + 8 * vq.num, "<H", vq.last_avail)  # avail_event: kick me for the next one
        addr, length, flags, nxt = self.read(vq.desc + 16 * head, "<QIHH")
        descs = []
        if flags & D_INDIRECT:
            table, i = addr, 0
            while True:
                a, n, f, nx = self.read(table + 16 * i, "<QIHH")
                descs.append((a, n, f))
                if not f & D_NEXT:
                    break
                i = nx
        else:
            while True:
                descs.append((addr, length, flags))
                if not flags & D_NEXT:
                    break
                addr, length, flags, nxt2 = self.read(vq.desc + 16 * nxt, "<QIHH")
                nxt = nxt2
        a, n, _ = descs[0]
        type_, _, sector = self.read(a, "<IIQ")
        out = [(*self.translate(a, n), n) for a, n, f in descs[1:] if not f & D_WRITE]
        wr = [(a, n) for a, n, f in descs if f & D_WRITE]
        status = None
        if wr and wr[-1][1] == 1:
            status = self.translate(wr[-1][0])
            wr = wr[:-1]
        inb = [(*self.translate(a, n), n) for a, n in wr]
        return Req(head, type_, sector, out, inb, status)

    def serve(self, req):
        """Carry the request out on the in-memory disk; returns (status, bytes written)."""
        pos = req.sector * 512
        if req.type == T_IN:
            n = sum(x for _, _, x in req.inb)
            if pos + n > SIZE:
                return S_IOERR, 1
            for m, off, x in req.inb:
                m[off:off + x] = self.disk[pos:pos + x]
                pos += x
            return S_OK, req.in_len
        if req.type == T_OUT:
            for m, off, x in req.out:
                if pos + x > SIZE:
                    return S_IOERR, 1
                self.disk[pos:pos + x] = m[off:off + x]
                pos += x
            return S_OK, 1
        if req.type == T_FLUSH:
            return S_OK, 1
        if req.type in (T_DISCARD, T_WRITE_ZEROES):
            m, off, _ = req.out[0]
            sector, num, _ = struct.unpack_from("<QII", m, off)
            self.server.ranges.append((req.type, sector, num))
            if sector * 512 + num * 512 > SIZE:
                return S_IOERR, 1
            if req.type == T_WRITE_ZEROES:
                self.disk[sector * 512:(sector + num) * 512] = bytes(num * 512)
            return S_OK, 1
        return S_UNSUPP, 1

    def set_status(self, req, status):
        m, off = req.status
        m[off] = status

    def push(self, vq, id_, length, idx=None, signal=True):
        """Put (id, len) in the used ring and publish used->idx (idx: publish this instead)."""
        self.write(vq.used + 4 + 8 * (vq.used_idx % vq.num), "<II", id_, length)
        vq.used_idx = (vq.used_idx + 1) & 0xffff
        self.write(vq.used + 2, "<H", vq.used_idx if idx is None else idx & 0xffff)
        if signal:
            self.signal(vq)

    def signal(self, vq):
        if vq.call is not None:
            try:
                os.eventfd_write(vq.call, 1)
            except OSError:
                pass

    def finish(self, vq, req, status=None, length=None, data=True):
        """A normal completion (status/length overridable; data=False: write nothing into the buffers)."""
        if data:
            st, n = self.serve(req)
        else:
            st, n = S_OK, req.in_len
        self.set_status(req, st if status is None else status)
        self.push(vq, req.head, n if length is None else length)

    def poll_rings(self):
        for vq in list(self.vqs.values()):
            if not vq.enabled or vq.avail is None or not self.regions:
                continue
            while True:
                req = self.take(vq)
                if req is None:
                    break
                self.log.append(f"vq{vq.index}: {req!r}")
                if self.sc.complete:
                    self.sc.complete(self, vq, req)
                else:
                    self.finish(vq, req)

    def run(self):
        while not self.server.stopping.is_set():
            fds = [self.sock] + [vq.kick for vq in self.vqs.values() if vq.kick is not None]
            r, _, _ = select.select(fds, [], [], 0.02)
            if self.sock in r:
                self.handle(*self.recv_msg())
            for fd in r:
                if fd is not self.sock:
                    try:
                        os.eventfd_read(fd)
                    except OSError:
                        pass
            self.poll_rings()

    def close(self):
        for vq in self.vqs.values():
            for fd in (vq.kick, vq.call):
                if fd is not None:
                    os.close(fd)
        self.vqs = {}
        for _, _, m, _ in self.regions:
            m.close()
        self.regions = []
        self.sock.close()


class HostileBackend:
    """Listens on path; serves connections one after the other with the scenario, in a thread."""

    def __init__(self, path, scenario):
        self.path = str(path)
        self.sc = scenario
        self.errors = []
        self.log = []
        self.requests = []     # request codes received, in order
        self.ranges = []       # (type, sector, num_sectors) of discard / write-zeroes segments
        self.connections = 0
        self.stopping = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self.srv.settimeout(0.05)
            while not self.stopping.is_set():
                try:
                    sock, _ = self.srv.accept()
                except socket.timeout:
                    continue
                sock.settimeout(None)
                self.connections += 1
                c = Conn(self, sock)
                try:
                    c.run()
                except (Closed, ConnectionResetError, BrokenPipeError):
                    pass
                finally:
                    c.close()
        except Exception as e:  # noqa: BLE001 -- reported by the fixture
            self.errors.append(repr(e))

    def stop(self):
        self.stopping.set()
        self.thread.join(10)
        self.srv.close()


def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True
