"""Run a kernel check script under Triton's interpreter, in its own process: TRITON_INTERPRET is read when
triton_alibi is imported, so the test process (which may have a GPU) cannot switch it for itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(script: str, *args: str) -> list[dict]:
    """The JSON lines that tests/``script`` prints under TRITON_INTERPRET=1 on the CPU; fails with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
