# SPDX-License-Identifier: GPL-2.0-or-later
"""block_resize on a node exported over vhost-user-blk: the config space shows the new capacity."""
import json
import socket

import vhu
from conftest import MiB


def qmp(path, execute, **args):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        f.write(json.dumps({"execute": execute, "arguments": args}).encode() + b"\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                return r


def test_resize_changes_capacity(vdiskd, image, tmp_path):
    ctl = tmp_path / "ctl.sock"
    img = image(8 * MiB)
    d = vdiskd(img, extra=("--control", f"unix:{ctl}"))
    f = vhu.Frontend(d.sock)
    f.negotiate()
    assert f.config()["capacity"] == 8 * MiB // 512
    assert "return" in qmp(ctl, "block_resize", **{"node-name": "f0", "size": 24 * MiB})
    assert f.config()["capacity"] == 24 * MiB // 512
    f.mem_table()
    f.setup_queue()
    # The new space is usable; past it is still an error.
    assert f.request(vhu.T_OUT, 24 * MiB // 512 - 1, data=b"z" * 512)[0] == vhu.S_OK
    assert f.request(vhu.T_IN, 24 * MiB // 512, in_len=512)[0] == vhu.S_IOERR
    assert "return" in qmp(ctl, "block_resize", **{"node-name": "f0", "size": 4 * MiB})
    assert f.config()["capacity"] == 4 * MiB // 512
    assert f.request(vhu.T_IN, 4 * MiB // 512, in_len=512)[0] == vhu.S_IOERR
    assert f.request(vhu.T_IN, 0, in_len=512)[0] == vhu.S_OK
    f.close()
    assert img.stat().st_size == 4 * MiB
