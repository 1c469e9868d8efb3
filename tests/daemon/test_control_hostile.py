# SPDX-License-Identifier: GPL-2.0-or-later
"""The control socket against hostile input: it answers with an error and keeps serving."""
import json
import subprocess

import pytest

from conftest import VDISKD, requires, run


@pytest.fixture
def ctl_daemon(daemon_factory):
    return daemon_factory([], nbd=False)


@pytest.mark.parametrize("doc", [
    b"[" * 100000,
    b"{" * 100000,
    b'{"execute": "query-version", "id": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"execute": "query-version", "id": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
    b'{"execute": "blockdev-add", "arguments": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1500 + b"}",
], ids=["arrays", "objects", "deep-id-array", "deep-id-object", "deep-arguments"])
def test_deep_nesting_is_refused(ctl_daemon, doc):
    # Commands are parsed on a coroutine's small stack: jansson's own depth
    # limit (2048) used to overflow it and kill the daemon.
    c = ctl_daemon.ctl
    c.send_raw(doc + b"\n")
    r = c.reply()
    assert r["error"]["class"] == "GenericError" and "nesting" in r["error"]["desc"], r
    assert "vdiskd" in c.cmd("query-version")
    assert ctl_daemon.proc.poll() is None


def test_moderate_nesting_and_brackets_in_strings_still_work(ctl_daemon):
    c = ctl_daemon.ctl
    deep = [[[[[[[[[[[[[[[[{"k": "[[[[{{{{" * 1000}]]]]]]]]]]]]]]]]
    c.send_raw(b'{"execute": "query-version", "id": ' + json.dumps(deep).encode() + b"}\n")
    r = c.reply()
    assert r["id"] == deep and "return" in r, r


def test_failed_resize_says_why(ctl_daemon, tmp_path):
    # A layer that failed without a message used to leave "Cannot resize node 'r0': " bare.
    img = tmp_path / "r.img"
    img.write_bytes(b"\0" * 65536)
    c = ctl_daemon.ctl
    c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img))
    c.cmd("blockdev-add", driver="raw", node_name="r0", file="f0")
    r = c.cmd_raw("block_resize", {"node-name": "r0", "size": 2**63 - 1})
    desc = r["error"]["desc"]
    assert desc.startswith("Cannot resize node 'r0': ") and desc.split(": ", 1)[1].strip(), r
    assert c.cmd("query-version")


@requires("qemu-img")
def test_deep_json_backing_file_is_refused(ctl_daemon, tmp_path):
    # A json: backing file name comes from the image: parsed on the command's
    # coroutine stack, a deeply nested one used to kill the daemon.
    img = tmp_path / "deep.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "json:" + "[" * 1000,
                    str(img), "1M"], check=True, timeout=60)
    c = ctl_daemon.ctl
    c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img))
    r = c.cmd_raw("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"})
    assert "error" in r, r
    assert "vdiskd" in c.cmd("query-version")
    assert ctl_daemon.proc.poll() is None


@pytest.mark.parametrize("args,text", [
    (["--nbd-server", "addr.type=unix,addr.path="], "nbd-server: the socket path is empty"),
    (["--blockdev", "driver=null-co,node-name=n0",
      "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="],
     "vhost-user-blk export: the socket path is empty"),
], ids=["nbd", "vhost-user-blk"])
def test_empty_socket_path_is_refused(args, text):
    # bind() with an empty path would autobind an abstract name nobody can find.
    p = run([VDISKD] + args, check=False)
    assert p.returncode == 1 and text.encode() in p.stderr, (p.returncode, p.stderr)


def test_iothread_tuning_knobs_are_checked():
    """QEMU's iothread poll/batch knobs are accepted (no effect here), but not negative or non-numeric values."""
    p = run([VDISKD, "--object", "iothread,id=io0,poll-max-ns=-1"], check=False)
    assert p.returncode == 1 and b"poll-max-ns" in p.stderr, p.stderr
    p = run([VDISKD, "--object", "iothread,id=io0,aio-max-batch=lots"], check=False)
    assert p.returncode == 1 and b"aio-max-batch" in p.stderr, p.stderr
