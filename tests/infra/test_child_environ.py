"""Children of a process that imported Feast do not inherit Feast's prometheus multiprocess mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: import Feast (which sets the variables when absent), then
# start two children, one with the plain environment and one with child_environ, and
# report which value class prometheus_client picked in each.
_PARENT = r"""
import json, os, subprocess, sys
import feast.metrics  # noqa: F401 - what `import feast` does, on purpose
from infra.supervisor import child_environ

probe = "import prometheus_client.values as v; print(v.ValueClass.__name__)"

def child(env):
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.strip()

print(json.dumps({
    "inherited": child(dict(os.environ)),
    "child_environ": child(child_environ({"HISAM_X": "1"})),
    "kept_extra": child_environ({"HISAM_X": "1"}).get("HISAM_X"),
    "feast_set": os.environ.get("PROMETHEUS_MULTIPROC_DIR") is not None,
}))
"""


def _run_parent(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PARENT],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_feasts_multiprocess_dir_is_not_passed_on() -> None:
    got = _run_parent(_clean_env())
    assert got["feast_set"]  # Feast did set it in the parent
    assert got["inherited"] == "MmapedValue"  # what a plain os.environ passes on (multiprocess mode)
    assert got["child_environ"] == "MutexValue"
    assert got["kept_extra"] == "1"


def test_a_multiprocess_dir_the_user_set_is_kept(tmp_path) -> None:
    env = _clean_env()
    env["PROMETHEUS_MULTIPROC_DIR"] = env["PROMETHEUS_MULTIPROCESS_DIR"] = str(tmp_path)
    got = _run_parent(env)
    assert got["child_environ"] == "MmapedValue"
