# SPDX-License-Identifier: GPL-2.0-or-later
"""
block_resize over the control socket: a qcow2 and a raw node grow (and the
raw one shrinks) while exported over NBD; new clients see the new size,
data is kept, qemu-img agrees afterwards; bad arguments are errors.
"""
import json

import pytest

from conftest import MiB, QMPError, have, make_raw, nbd_handle, run

pytestmark = pytest.mark.skipif(not have("qemu-img") or not have("qemu-io"), reason="needs qemu-img and qemu-io")


def qemu_img_info(path):
    return json.loads(run(["qemu-img", "info", "--output=json", "-U", str(path)]).stdout)


def test_grow_qcow2_exported(daemon_factory, tmp_path):
    img = tmp_path / "g.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 15M 1M", str(img)])
    d = daemon_factory([f"--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}",
                        "--export", "type=nbd,id=e0,node-name=q0,writable=on"])
    old = nbd_handle(d.uri("q0"))
    assert old.get_size() == 16 * MiB
    d.qmp("block_resize", node_name="q0", size=80 * MiB)
    assert {e["id"]: e for e in d.qmp("query-block-exports")}["e0"]["size"] == 80 * MiB
    h = nbd_handle(d.uri("q0"))
    assert h.get_size() == 80 * MiB
    assert h.pread(MiB, 15 * MiB) == b"\x61" * MiB
    assert h.pread(MiB, 79 * MiB) == bytes(MiB)  # the new space reads as zeroes
    h.pwrite(b"\x62" * 65536, 80 * MiB - 65536)
    h.flush()
    # The old connection keeps working within the size it was given.
    assert old.pread(4096, 15 * MiB) == b"\x61" * 4096
    old.shutdown()
    h.shutdown()
    d.stop()
    assert qemu_img_info(img)["virtual-size"] == 80 * MiB
    run(["qemu-img", "check", str(img)])
    out = run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x62 {80 * MiB - 65536} 64k", "-c",
               f"read -P 0x61 {15 * MiB} 1M", str(img)]).stdout.decode()
    assert "Pattern verification failed" not in out


def test_grow_and_shrink_raw(daemon_factory, tmp_path):
    img = make_raw(tmp_path / "r.raw", size=32 * MiB)
    head = img.read_bytes()[:MiB]
    d = daemon_factory([f"--blockdev", f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=raw,node-name=r0,file=f0",
                        "--export", "type=nbd,id=e0,node-name=r0,writable=on"])
    old = nbd_handle(d.uri("r0"))
    d.qmp("block_resize", device="r0", size=48 * MiB)
    assert img.stat().st_size == 48 * MiB
    assert nbd_handle(d.uri("r0")).get_size() == 48 * MiB
    d.qmp("block_resize", node_name="r0", size=8 * MiB)
    assert img.stat().st_size == 8 * MiB
    h = nbd_handle(d.uri("r0"))
    assert h.get_size() == 8 * MiB and h.pread(MiB, 0) == head
    # A client told the old size gets an error past the new end, not a crash.
    with pytest.raises(Exception):
        old.pread(4096, 16 * MiB)
    assert old.pread(4096, 0) == head[:4096]
    h.shutdown()
    d.stop()


def test_resize_errors(daemon_factory, tmp_path):
    img = make_raw(tmp_path / "r.raw", size=8 * MiB, pattern=False)
    d = daemon_factory([f"--blockdev", f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=raw,node-name=ro,read-only=on,file.driver=file,"
                                      f"file.filename={img},file.read-only=on"])
    cases = [
        (dict(node_name="nope", size=MiB), "Cannot find"),
        (dict(node_name="f0"), "size"),
        (dict(node_name="f0", device="f0", size=MiB), "exactly one"),
        (dict(size=MiB), "exactly one"),
        (dict(node_name="f0", size=-1), ""),
        (dict(node_name="f0", size="big"), ""),
        (dict(node_name="f0", size=MiB, extra=1), "invalid parameter"),
        (dict(node_name="ro", size=16 * MiB), "read-only"),
    ]
    for args, msg in cases:
        with pytest.raises(QMPError, match=msg):
            d.qmp("block_resize", **args)
    with pytest.raises(QMPError):
        d.qmp("block_resize", node_name="f0", size=(1 << 63) - 1)
    assert img.stat().st_size == 8 * MiB
    d.qmp("block_resize", node_name="f0", size=12 * MiB)
    assert img.stat().st_size == 12 * MiB
    d.stop()
