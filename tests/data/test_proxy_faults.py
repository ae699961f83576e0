"""``build-proxy`` killed (SIGKILL) at any point leaves the old file or none, never a partial one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autopose.data import build_proxy, verify_proxy

INPUT = (64, 48)

# Run in a fresh interpreter: build the proxy and SIGKILL the process at one point of the write.
KILLER = """
import os, signal, sys
from pathlib import Path
import pyarrow.parquet as pq
from autopose.data import proxy

point, ann, images, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
proxy.ROWS_PER_GROUP = 2  # several row groups, so that a kill can fall between them
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point.startswith("batch"):
    wanted, seen, write = int(point.split(":")[1]), [0], pq.ParquetWriter.write_batch
    def write_then_die(self, *args, **kwargs):
        write(self, *args, **kwargs)
        seen[0] += 1
        if seen[0] == wanted:
            die()
    pq.ParquetWriter.write_batch = write_then_die
elif point == "metadata":
    pq.ParquetWriter.add_key_value_metadata = die
elif point == "rename":
    os.replace = die
proxy.build_proxy(ann, images, out, input_size=(64, 48), jpeg_quality=70, progress=False)
"""


def _killed_build(point: str, ann: Path, images: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(ann), str(images), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.parametrize("point", ["batch:1", "batch:3", "metadata", "rename"])
def test_killed_build_keeps_the_old_file(point, tmp_path, coco_ann, coco_images):
    out = tmp_path / "coco.parquet"
    old = build_proxy(coco_ann, coco_images, out, input_size=INPUT, progress=False)
    before = out.read_bytes()
    _killed_build(point, coco_ann, coco_images, out)  # other settings: a rebuild, killed midway
    assert out.read_bytes() == before
    assert verify_proxy(out).content_hash == old.content_hash


def test_killed_first_build_leaves_no_file_and_a_rerun_succeeds(tmp_path, coco_ann, coco_images):
    out = tmp_path / "coco.parquet"
    _killed_build("batch:2", coco_ann, coco_images, out)
    assert not out.exists()
    (stale,) = tmp_path.glob(".coco.parquet.*.tmp")  # the killed build's half-written file
    # Temporaries the rerun must leave alone: a live build's (this host), another host's, not a pid.
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            kept = [
                tmp_path / f".coco.parquet.{host}.{live.pid}.tmp",
                tmp_path / f".coco.parquet.other-host.{stale.name.rsplit('.', 2)[-2]}.tmp",
                tmp_path / f".coco.parquet.{host}.notes.tmp",
            ]
            for path in kept:
                path.write_bytes(b"partial")
            report = build_proxy(coco_ann, coco_images, out, input_size=INPUT, progress=False)
        finally:
            live.kill()
    assert verify_proxy(out).num_rows == report.rows == 12
    assert not stale.exists()  # its process is gone: removed by the rerun
    assert sorted(tmp_path.iterdir()) == sorted([out, *kept])
