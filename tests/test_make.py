"""The Make layer: stale-only re-runs, counted by what the harvest reports it computed."""

import re
import subprocess
import sys

from conftest import REPO


def make(data_dir, *args, dry=False, query=False):
    stamp = data_dir / "installed"
    stamp.touch()
    cmd = ["make", "--no-print-directory", *(["-n"] if dry else []), *(["-q"] if query else []), *args,
           f"DATA_DIR={data_dir}", "LM=tiny-llama", "CTX=32", "CHUNK_ROWS=256",
           f"INSTALLED={stamp}", f"NND={sys.executable} -m stages.cli"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def computed(proc) -> int:
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"(\d+) layer-chunks computed", proc.stdout)
    return int(m.group(1)) if m else 0


def test_make_harvest_is_cached_and_grows_incrementally(data_dir):
    assert computed(make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000")) == 2 * 9
    assert make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000", query=True).returncode == 0
    again = make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000")
    assert "nnd" not in again.stdout and "stages.cli" not in again.stdout and computed(again) == 0

    preview = make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000", dry=True)
    assert "harvest --lm tiny-llama" in preview.stdout and "--layers 0-2" in preview.stdout
    assert make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000", query=True).returncode == 1

    assert computed(make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000")) == 9  # only layer 2
    # 4030 rows -> 17 chunks: 8 new ones and the formerly partial one, for each of 3 layers
    assert computed(make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=4000")) == 3 * 9
    assert make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=4000", query=True).returncode == 0
