"""tools/: every script imports (a benchmark that no longer loads is a claim nobody can rerun), none imports the
tests (tools may not depend on test internals), and the harness's record says where and how a number was taken."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import harness  # noqa: E402

# Imports every module named on the command line (tools/ and the repository first on the path) and prints, as
# JSON, the modules of the ``tests`` package loaded by each, or the import's error.
_PROBE = """
import importlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
out = {}
for name in sys.argv[3:]:
    before = set(sys.modules)
    try:
        importlib.import_module(name)
        out[name] = sorted(m for m in set(sys.modules) - before if m == "tests" or m.startswith("tests."))
    except BaseException as e:
        out[name] = "error: " + repr(e)[:300]
print(json.dumps(out))
"""


def static_test_imports(path: Path) -> list[str]:
    """``import tests...`` / ``from tests... import`` anywhere in the file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [n for n in names if n == "tests" or n.startswith("tests.")]
    return found


def import_tools(folder: Path) -> dict:
    names = sorted(p.stem for p in folder.glob("*.py"))
    done = subprocess.run([sys.executable, "-c", _PROBE, str(folder), str(ROOT), *names], capture_output=True,
                          text=True, timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_tool_imports_without_the_tests():
    tools = sorted(TOOLS.glob("*.py"))
    assert len(tools) >= 10, tools
    static = {p.name: static_test_imports(p) for p in tools}
    assert not any(static.values()), f"tools importing the tests: {static}"
    loaded = import_tools(TOOLS)
    assert loaded == {p.stem: [] for p in tools}, loaded


def test_negative_control_a_tool_importing_the_tests_is_caught(tmp_path):
    """A fake tool that imports a test module, at import time and inside a function: both checks see it."""
    (tmp_path / "harness.py").write_text((TOOLS / "harness.py").read_text())
    (tmp_path / "fake_bench.py").write_text("from harness import time_one\nimport tests.conftest  # noqa\n")
    (tmp_path / "lazy_bench.py").write_text("def main():\n    from tests.test_alibi import x  # noqa\n")
    assert static_test_imports(tmp_path / "fake_bench.py") == ["tests.conftest"]
    assert static_test_imports(tmp_path / "lazy_bench.py") == ["tests.test_alibi"]
    loaded = import_tools(tmp_path)
    assert "tests.conftest" in loaded["fake_bench"] and loaded["harness"] == [], loaded


def test_record_has_commit_device_versions_and_command():
    rec = harness.record({"ms": 1.5}, argv=["tools/bench_x.py", "--lengths", "64,128", "--json", "a b.json"])
    assert set(harness.RECORD_FIELDS) <= set(rec), rec.keys()
    assert rec["producer"] == harness.PRODUCER and rec["tool"] == "bench_x.py" and rec["results"] == {"ms": 1.5}
    assert rec["command"] == "python tools/bench_x.py --lengths 64,128 --json 'a b.json'"
    if (ROOT / ".git").exists():  # a checkout (CI's is one); an unpacked sdist has no commit to name
        assert re.fullmatch(r"[0-9a-f]{40}", rec["commit"]) and isinstance(rec["dirty"], bool), rec
    cpu = rec["device"]["cpu"]
    assert cpu["model"] and {"avx2", "avx512", "vnni"} <= set(cpu) and all(
        isinstance(cpu[k], bool) for k in ("avx2", "avx512", "vnni")), cpu
    assert "gpu" in rec["device"]
    assert {"python", "torch", "onnx", "onnxruntime", "triton", "transformers"} <= set(rec["versions"])
    assert rec["versions"]["onnx"] and rec["versions"]["onnxruntime"]  # required by the package
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["timestamp"]), rec["timestamp"]
    json.dumps(rec)  # all of it JSON


def test_write_record_replaces_a_record_but_not_a_foreign_file(tmp_path):
    path = tmp_path / "r.json"
    harness.write_record(path, {"run": 1}, argv=["x.py"])
    harness.write_record(path, {"run": 2}, argv=["x.py"])
    assert json.loads(path.read_text())["results"] == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    foreign = tmp_path / "notes.json"
    foreign.write_text("my notes, not JSON")  # control: a file the harness did not write
    with pytest.raises(SystemExit, match="not a JSON record"):
        harness.write_record(foreign, {"run": 3}, argv=["x.py"])
    assert foreign.read_text() == "my notes, not JSON"


def test_timer_interleaves_peers_after_warmup_and_reports_the_median():
    calls = []
    peers = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    fake = iter([5.0, 1.0, 3.0, 2.0, 1.0, 9.0])  # a, b, a, b, a, b
    t = harness.time_peers(peers, warmup=2, repeats=3, measure=lambda fn: (fn(), next(fake))[1])
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3, calls
    assert t["a"].samples == [5.0, 3.0, 1.0] and t["a"].median == 3.0 and t["b"].median == 2.0


def test_timer_budget_stops_after_two_rounds_and_sync_brackets_each_call():
    synced = []
    t = harness.time_one(lambda: synced.append("call"), warmup=0, repeats=5, budget_s=0.0,
                         sync=lambda: synced.append("sync"))
    assert len(t.samples) == 2 and all(s >= 0 for s in t.samples), t  # the budget was spent in round 1
    assert synced == ["sync"] + ["sync", "call", "sync"] * 2, synced
    assert len(harness.time_one(lambda: None, warmup=0, repeats=5).samples) == 5  # control: no budget
