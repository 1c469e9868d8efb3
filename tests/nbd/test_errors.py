# SPDX-License-Identifier: LGPL-2.1-or-later
"""Error replies, timeouts, and servers that die or stall: clean errors, never a hang."""
import re
import signal
import time

import pytest

from conftest import check_sanitizers, on, requires, run


@pytest.mark.parametrize("op,cmd,err,text", [
    ("pread", "read -P 0 0 4k", "EIO", "Input/output error"),
    ("pwrite", "write -P 1 0 4k", "ENOSPC", "No space left on device"),
    ("trim", "discard 0 64k", "EPERM", "Operation not permitted"),
    ("zero", "zero 0 64k", "EINVAL", "Invalid argument"),
])
def test_server_error_reply_becomes_errno(nbdkit, io, op, cmd, err, text):
    s = nbdkit("memory", "1M", f"error-{op}={err}", f"error-{op}-rate=1", filters=["error"])
    p = io(on(s), cmd, check=1)
    assert f"server replied: {text} ({text})" in p.stderr
    io(on(s), "write -P 1 64k 4k" if op != "pwrite" else "read -P 0 64k 4k")  # other commands still work


def test_error_in_one_piece_of_a_split_request(nbdkit, io, tmp_path):
    """A 3 GiB discard is 3 NBD commands; one failing fails the request (once)."""
    flag = tmp_path / "fail-now"
    flag.touch()
    s = nbdkit("memory", "3G", "error-trim=EIO", "error-trim-rate=0.5", f"error-trim-file={flag}",
               filters=["error"])
    for _ in range(5):
        p = io(on(s), "discard 0 3g", check=None)
        if p.returncode == 1:
            assert "server replied: Input/output error" in p.stderr
            break
    else:
        pytest.fail("no discard failed in 5 tries at a 50% error rate per command")


def test_do_io_timeout_is_etime_and_request_completes_later(nbdkit, nbd_queues):
    s = nbdkit("memory", "1M", "rdelay=1", filters=["delay"])
    p = run([nbd_queues, "--set", f"path={s.sock}", "timeout"], check=0)
    assert "-ETIME after" in p.stdout and "request completed" in p.stdout


def hammer_and_kill(nbd_queues, server, sig, after=1.0):
    import subprocess
    h = subprocess.Popen([str(nbd_queues), "--set", f"path={server.sock}", "hammer", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    server.kill(sig)
    try:
        out, err = h.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        h.kill()
        out, err = h.communicate()
        pytest.fail(f"HANG: client still running 60 s after the server died\n{out}\n{err}")
    check_sanitizers("nbd-queues hammer", err)
    assert h.returncode == 0, f"exit {h.returncode}\n{out}\n{err}"
    return out


def clean_error(ret, msg):
    """The two clean outcomes: -EIO for a lost connection, or -ESHUTDOWN from a server shutting down."""
    if ret == -108:  # nbdkit on SIGTERM answers what it still receives with ESHUTDOWN
        return "the server is shutting down" in msg
    return ret == -5 and "connection to the NBD server lost" in msg


def check_clean_failure(out):
    m = re.search(r"first-error ret=(-?\d+) msg=(.*)", out)
    assert m and clean_error(int(m.group(1)), m.group(2)), out
    assert int(re.search(r"ok-before-error=(\d+)", out).group(1)) > 0  # I/O was really running
    after = re.search(r"after ret=(-?\d+) ms=(\d+) msg=(.*)", out)
    assert after and int(after.group(2)) < 1000, out
    assert clean_error(int(after.group(1)), after.group(3)), out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nbdkit_dies_mid_io(nbdkit, nbd_queues, sig):
    s = nbdkit("memory", "64M", "rdelay=2ms", "wdelay=2ms", filters=["delay"])
    check_clean_failure(hammer_and_kill(nbd_queues, s, sig))


@requires("qemu-nbd")
def test_qemu_nbd_dies_mid_io(tmp_path, qemu_nbd, nbd_queues):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 << 20))
    s = qemu_nbd(img)
    check_clean_failure(hammer_and_kill(nbd_queues, s, signal.SIGKILL))


def test_destroy_with_requests_on_a_stalled_server_returns(nbdkit, nbd_queues):
    """Requests in flight to a server that answers nothing: vdisk_destroy() gives up after ~2 s."""
    import subprocess
    s = nbdkit("memory", "1M")
    h = subprocess.Popen([str(nbd_queues), "--set", f"path={s.sock}", "abandon"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert h.stdout.readline().strip() == "ready"
        s.proc.send_signal(signal.SIGSTOP)
        out, err = h.communicate("go\n", timeout=30)
    finally:
        s.proc.send_signal(signal.SIGCONT)
    check_sanitizers("nbd-queues abandon", err)
    assert h.returncode == 0, err
    ms = int(re.search(r"destroy took (\d+) ms", out).group(1))
    assert 1000 < ms < 5000, out  # the bounded goodbye, not a hang (and not skipped)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_server_dies_while_connection_idle(nbdkit, nbd_queues, sig):
    """Connected and idle, then the server goes: the next request fails at once, cleanly."""
    import subprocess
    s = nbdkit("memory", "1M")
    h = subprocess.Popen([str(nbd_queues), "--set", f"path={s.sock}", "idle"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert h.stdout.readline().strip() == "ready"
    s.proc.send_signal(sig)  # SIGTERM: nbdkit stays until we leave, answering ESHUTDOWN
    time.sleep(0.3)
    out, err = h.communicate("go\n", timeout=60)
    check_sanitizers("nbd-queues idle", err)
    assert h.returncode == 0, err
    m = re.search(r"after ret=(-?\d+) ms=(\d+) msg=(.*)", out)
    assert m and int(m.group(2)) < 1000, out
    assert clean_error(int(m.group(1)), m.group(3)), out
    if sig == signal.SIGKILL:
        assert int(m.group(1)) == -5, out
