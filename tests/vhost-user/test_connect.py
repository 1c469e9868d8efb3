# SPDX-License-Identifier: LGPL-2.1-or-later
"""Connecting: limits from the virtio-blk config space, read-only exports, bad targets."""
import os
import socket
import struct
import threading

import pytest

from conftest import DRIVER, MiB, info, run


def test_limits_from_config_space(qsd, image, io):
    b = qsd(image(64 * MiB), num_queues=2)
    i = info(io(b, "info"))
    assert i["capacity"] == str(64 * MiB)
    assert i["request-alignment"] == "512"
    assert i["buf-alignment"] == "1"
    assert i["max-queues"] == "2"
    assert i["needs-mem-regions"] == "true"
    assert i["mem-region-alignment"] == str(os.sysconf("SC_PAGESIZE"))
    assert int(i["max-segments"]) >= 1  # QEMU: seg_max = 126
    # QEMU's back-end negotiates CONFIGURE_MEM_SLOTS: its slots minus our rings region.
    assert int(i["max-mem-regions"]) >= 7
    assert i["can-flush"] == i["can-discard"] == i["can-write-zeroes"] == "true"


def test_logical_block_size_4k(qsd, image, io):
    b = qsd(image(16 * MiB), opts="logical-block-size=4096")
    i = info(io(b, "info"))
    assert i["request-alignment"] == "4096"
    io(b, "write -P 0x5a 4096 8192", "read -P 0x5a 4096 8192")
    p = io(b, "read 512 4096", check=1)
    assert "request-alignment 4096" in p.stderr


def test_read_only_export_needs_read_only(qsd, image, io):
    img = image(16 * MiB)
    with open(img, "r+b") as f:
        f.write(b"\x42" * 65536)
    b = qsd(img, writable=False)
    p = io(b, "info", check=1)
    assert "exports the disk read-only; set read-only=true" in p.stderr
    io(b, "read -P 0x42 0 64k", extra=["--read-only"])
    p = io(b, "write -P 1 0 4k", extra=["--read-only"], check=1)
    assert "read-only" in p.stderr


def test_queues_beyond_max(qsd, image, client):
    b = qsd(image(16 * MiB), num_queues=2)
    p = client(b, "--queues", "3", "multiq", "1", check=1)
    assert "max-queues (2)" in p.stderr


def test_missing_socket(tmp_path, vdisk_io):
    p = run([vdisk_io, f"--driver={DRIVER}", f"--path={tmp_path / 'nope.sock'}", "-c", "info"], check=1)
    assert "cannot connect to the vhost-user socket" in p.stderr and "No such file" in p.stderr


def test_path_or_fd_required(vdisk_io):
    p = run([vdisk_io, f"--driver={DRIVER}", "-c", "info"], check=1)
    assert "set 'path'" in p.stderr


def test_connected_fd(qsd, image, vu_client):
    b = qsd(image(16 * MiB))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b.sock)
    fd = s.fileno()
    p = run([vu_client, "--set", f"fd={fd}", "pattern", "9", "0", "2", "8"], check=0, pass_fds=[fd])
    assert "verified" in p.stdout
    s.close()


def fake_backend(path, handler):
    """A minimal vhost-user back-end in a thread: handler(sock) talks to one client."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            handler(conn)
        finally:
            conn.close()
            srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def recv_msg(conn):
    hdr = b""
    while len(hdr) < 12:
        chunk = conn.recv(12 - len(hdr))
        if not chunk:
            return None
        hdr += chunk
    req, flags, size = struct.unpack("<III", hdr)
    payload = b""
    while len(payload) < size:
        payload += conn.recv(size - len(payload))
    return req, flags, payload


def reply(conn, req, payload):
    conn.sendall(struct.pack("<III", req, 0x1 | 0x4, len(payload)) + payload)


def test_backend_hangs_up_during_handshake(tmp_path, vdisk_io):
    sock = tmp_path / "fake.sock"

    def handler(conn):
        recv_msg(conn)  # SET_OWNER
        recv_msg(conn)  # GET_FEATURES: no answer, hang up

    t = fake_backend(sock, handler)
    p = run([vdisk_io, f"--driver={DRIVER}", f"--path={sock}", "-c", "info"], check=1, timeout=20)
    assert "GET_FEATURES" in p.stderr and "closed the connection" in p.stderr
    t.join(5)


def test_backend_without_config_space(tmp_path, vdisk_io):
    """No VHOST_USER_F_PROTOCOL_FEATURES: no GET_CONFIG, so no capacity: -ENOTSUP."""
    sock = tmp_path / "fake.sock"

    def handler(conn):
        while True:
            m = recv_msg(conn)
            if m is None:
                return
            if m[0] == 1:  # GET_FEATURES: VERSION_1 | FLUSH only
                reply(conn, 1, struct.pack("<Q", (1 << 32) | (1 << 9)))

    t = fake_backend(sock, handler)
    p = run([vdisk_io, f"--driver={DRIVER}", f"--path={sock}", "-c", "info"], check=1, timeout=20)
    assert "configuration space" in p.stderr and "disk size is unknown" in p.stderr
    t.join(5)


def test_backend_sends_garbage_reply(tmp_path, vdisk_io):
    sock = tmp_path / "fake.sock"

    def handler(conn):
        recv_msg(conn)  # SET_OWNER
        recv_msg(conn)  # GET_FEATURES
        reply(conn, 17, struct.pack("<Q", 0))  # answers another request
        recv_msg(conn)

    t = fake_backend(sock, handler)
    p = run([vdisk_io, f"--driver={DRIVER}", f"--path={sock}", "-c", "info"], check=1, timeout=20)
    assert "GET_FEATURES" in p.stderr and "reply for request 17" in p.stderr
    t.join(5)


@pytest.mark.parametrize("props", [(), ("event-idx=false",), ("indirect-desc=false",),
                                   ("event-idx=false", "indirect-desc=false")],
                         ids=["default", "no-event-idx", "no-indirect", "neither"])
def test_ring_feature_variants(qsd, image, client, props):
    b = qsd(image(64 * MiB), num_queues=2)
    sets = [a for p in props for a in ("--set", p)]
    p = client(b, *sets, "--queues", "1", "--poll-queues", "1", "multiq", "8")
    assert "2 queues verified" in p.stdout
    p = client(b, *sets, "--queue-size", "256", "pattern", "4", "16", "16", "256")
    assert "verified" in p.stdout


@pytest.mark.parametrize("qs", [1, 2, 1024, 4096])
def test_queue_sizes(qsd, image, client, qs):
    """4096 > the 1024-entry ring: the driver holds the excess back (-EAGAIN to the core)."""
    b = qsd(image(64 * MiB))
    p = client(b, "--queue-size", str(qs), "pattern", str(qs), "0", "16", str(qs))
    assert "verified" in p.stdout


def test_reconnect_after_destroy(qsd, image, io):
    """The export accepts one front-end at a time: destroy must release it."""
    b = qsd(image(16 * MiB))
    for i in range(5):
        io(b, f"write -P {i} 0 4k", f"read -P {i} 0 4k")
