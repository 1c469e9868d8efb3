# SPDX-License-Identifier: LGPL-2.1-or-later
"""Connecting: every way to name the server, what the handshake reports, and clear errors."""
import os
import socket
import subprocess

import pytest

from conftest import Server, free_port, info, on, requires, run


def test_connect_unix_path_reports_size_and_flags(nbdkit, io):
    s = nbdkit("memory", "64M")
    p = io(on(s), "info")
    i = info(p)
    assert i["driver"] == "nbd"
    assert i["capacity"] == str(64 << 20)
    assert i["can-flush"] == i["can-fua"] == i["can-trim"] == i["can-zero"] == "true"
    assert i["can-fast-zero"] == i["can-multi-conn"] == "true"
    assert i["max-transfer"] == str(32 << 20)
    assert i["max-queues"] == "16"
    assert i["needs-mem-regions"] == "false"


def test_connect_uri_unix(nbdkit, io):
    s = nbdkit("memory", "1M")
    p = io(["--set", f"uri={s.uri}"], "write -P 0x5a 0 4k", "read -P 0x5a 0 4k", "info")
    assert info(p)["uri"] == s.uri


def test_connect_tcp_host_port_and_uri(tmp_path, servers, io):
    port = free_port()
    s = Server(["nbdkit", "-f", "-i", "127.0.0.1", "-p", port, "memory", "1M"], port=port)
    servers.append(s)
    io(["--set", "host=127.0.0.1", "--set", f"port={port}"], "write -P 7 0 4k", "read -P 7 0 4k")
    io(["--set", f"uri=nbd://127.0.0.1:{port}/"], "read -P 7 0 4k")


@requires("qemu-nbd")
def test_export_name_selects_export(tmp_path, qemu_nbd, io):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x42" * 65536)
    s = qemu_nbd(img, "-x", "disk0")
    io(on(s, "--set", "export-name=disk0"), "read -P 0x42 0 64k")
    io(["--set", f"uri=nbd+unix:///disk0?socket={s.sock}"], "read -P 0x42 0 64k")
    p = io(on(s, "--set", "export-name=nosuch"), "info", check=1)
    assert "connecting to unix:" in p.stderr and "nosuch" in p.stderr


def test_connect_over_passed_fd(vdisk_io):
    """fd: an already connected socket (nbdkit -s serves on its stdin/stdout)."""
    ours, theirs = socket.socketpair()
    srv = subprocess.Popen(["nbdkit", "-s", "memory", "1M"], stdin=theirs, stdout=theirs,
                           stderr=subprocess.PIPE)
    theirs.close()
    try:
        fd = ours.fileno()
        p = run([vdisk_io, "--driver=nbd", "--set", f"fd={fd}", "-c", "write -P 3 0 4k", "-c", "read -P 3 0 4k",
                 "-c", "info"], pass_fds=(fd,), check=0)
        assert info(p)["max-queues"] == "1"  # one socket, one connection
    finally:
        ours.close()
        srv.wait(timeout=10)


def test_no_target_is_einval(io):
    p = io([], "info", check=1)
    assert "set 'uri', 'path' (Unix socket), 'host' (TCP) or 'fd'" in p.stderr


def test_uri_and_path_together_is_einval(tmp_path, io):
    p = io(["--path", tmp_path / "x.sock", "--set", "uri=nbd://localhost/"], "info", check=1)
    assert "are alternatives; set only one" in p.stderr


def test_uri_with_export_name_is_einval(io):
    p = io(["--set", "uri=nbd://localhost/", "--set", "export-name=a"], "info", check=1)
    assert "cannot be combined with 'uri'" in p.stderr


def test_port_without_host_is_einval(tmp_path, io):
    p = io(["--path", tmp_path / "x.sock", "--set", "port=10809"], "info", check=1)
    assert "'port' needs 'host'" in p.stderr


def test_no_server_is_a_clean_error(tmp_path, io):
    p = io(["--path", tmp_path / "absent.sock"], "info", check=1)
    assert "connecting to unix:" in p.stderr and "No such file or directory" in p.stderr


def test_properties_are_fixed_after_connect(nbdkit, io):
    s = nbdkit("memory", "1M")
    p = io(on(s), "info", extra=["--set-after-start", "uri=nbd://x/"], check=1)
    assert "may be set only when created" in p.stderr


def test_read_only_export_refuses_writable_open(nbdkit, nbd_queues):
    s = nbdkit("memory", "1M", opts=["-r"])
    p = run([nbd_queues, "--set", f"path={s.sock}", "timeout"], check=1)
    assert "read-only; set read-only=true [Read-only file system]" in p.stderr


def test_read_only_export_reads_and_rejects_writes(nbdkit, io):
    s = nbdkit("memory", "1M", opts=["-r"])
    io(on(s, "--read-only"), "read -P 0 0 64k")
    p = io(on(s, "--read-only"), "write -P 1 0 4k", check=1)
    assert "read-only" in p.stderr


@requires("qemu-nbd")
def test_qemu_nbd_read_only_export(tmp_path, qemu_nbd, io):
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x11" * 65536)
    s = qemu_nbd(img, "-r")
    io(on(s), "info", check=1)
    io(on(s, "--read-only"), "read -P 0x11 0 64k")


def test_block_size_constraints_become_limits(nbdkit, io):
    s = nbdkit("memory", "16M", "blocksize-minimum=4096", "blocksize-preferred=64K", "blocksize-maximum=1M",
               filters=["blocksize-policy"])
    i = info(io(on(s), "info"))
    assert i["request-alignment"] == "4096"
    assert i["optimal-io-size"] == str(64 << 10)
    assert i["max-transfer"] == str(1 << 20)
    io(on(s), "write -P 9 4096 1m", "read -P 9 4096 1m")
    p = io(on(s), "write -P 9 512 4k", check=1)
    assert "request-alignment 4096" in p.stderr
    p = io(on(s), "write -P 9 0 2m", check=1)
    assert "max-transfer" in p.stderr
    # discard/write-zeroes are not checked by the core: libnbd refuses them, cleanly.
    p = io(on(s), "discard 512 4096", check=1)
    assert "unaligned" in p.stderr and "Invalid argument" in p.stderr


def test_max_transfer_capped_at_32M(nbdkit, io):
    s = nbdkit("memory", "128M", "blocksize-maximum=64M", filters=["blocksize-policy"])
    assert info(io(on(s), "info"))["max-transfer"] == str(32 << 20)


def test_num_queues_above_one_needs_multi_conn(nbdkit, io, nbd_queues):
    s = nbdkit("memory", "16M", "multi-conn-mode=disable", filters=["multi-conn"])
    i = info(io(on(s), "info"))
    assert i["can-multi-conn"] == "false" and i["max-queues"] == "1"
    p = io(on(s, "--set", "num-queues=4"), "info", check=1)
    assert "max-queues (1)" in p.stderr
    p = run([nbd_queues, "--set", f"path={s.sock}", "--queues", "4", "multiq", "1"], check=1)
    assert "max-queues (1)" in p.stderr and "[Invalid argument]" in p.stderr


def test_tls_psk_uri(tmp_path, nbdkit, io, nbd_queues):
    """nbds+unix:// with a PSK file named in the URI; several TLS connections; a plain client is refused."""
    keys = tmp_path / "psk.keys"
    keys.write_text("alice:" + os.urandom(32).hex() + "\n")
    keys.chmod(0o600)
    s = nbdkit("memory", "64M", opts=["--tls=require", f"--tls-psk={keys}"])
    uri = f"nbds+unix://alice@/?socket={s.sock}&tls-psk-file={keys}"
    io(["--set", f"uri={uri}"], "write -P 0x71 0 1m", "read -v -P 0x71 0 1m")
    run([nbd_queues, "--set", f"uri={uri}", "--queues", "4", "multiq", "8"], check=0)
    run([nbd_queues, "--set", f"uri={uri}", "evloop", "64"], check=0)
    p = io(on(s), "info", check=1)
    assert "requires TLS" in p.stderr
