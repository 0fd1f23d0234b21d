"""Run every ``gpu``-marked test on a GPU machine and record the run in a JSON file.

CI has no GPU, so the gpu tests skip there (tests/conftest.py); this is where they run. A gpu test that
skips here has not been run, so the run FAILS if any is skipped (a missing onnxruntime-gpu or TensorRT-RTX
counts), as it does if any fails or none is collected. Run it whenever GPU code changes (the kernels, the
CUDA runtime paths, the TensorRT plugin), and before calling such work done; commit the record.

Usage (repo root, CUDA GPU; tools/run_gpu_tests.sh is the same):
  python tools/run_gpu_tests.py [--out docs/gpu-tests.json] [--commit SHA] [-- extra pytest args]
``--commit`` names the tested commit where the tree is no git checkout (a copy sent to a GPU machine).
Exit status: 0 only when every collected gpu test passed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "onnxruntime-gpu", "onnxruntime", "onnx", "onnxscript", "polygraphy",
            "transformers", "tensorrt-rtx-cu13-bindings", "numpy", "pytest")


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout: pass --commit)"


def _versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def _device() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        info["name"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["count"] = torch.cuda.device_count()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    return info


class _Outcomes:
    """A pytest plugin that keeps each test's outcome (setup, call and teardown folded into one)."""

    def __init__(self):
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        row = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
        row["seconds"] += report.duration
        if report.skipped and row["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row.update(outcome="skipped", reason=reason)
        elif report.failed:
            row.update(outcome="failed" if report.when == "call" else "error",
                       reason=str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else "")

    def pytest_collectreport(self, report):
        if report.failed:
            self.tests[report.nodeid or "<collection>"] = {"outcome": "error", "seconds": 0.0,
                                                            "reason": str(report.longrepr)[-500:]}
        elif report.skipped and _has_gpu_tests(report.nodeid):  # a module skipped whole hides its gpu tests
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.tests[report.nodeid] = {"outcome": "skipped", "seconds": 0.0, "reason": reason}


def _has_gpu_tests(nodeid: str) -> bool:
    path = ROOT / nodeid.split("::")[0]
    return path.suffix == ".py" and path.is_file() and "mark.gpu" in path.read_text(errors="replace")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "gpu-tests.json"), help="the JSON record to write")
    ap.add_argument("--commit", help="the commit under test (default: git rev-parse HEAD)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    a = ap.parse_args(argv)
    import pytest

    outcomes = _Outcomes()
    args = ["-m", "gpu", "-p", "no:cacheprovider", "-rfEs", *a.pytest_args, str(ROOT / "tests")]
    start, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    code = pytest.main(list(args), plugins=[outcomes])  # a copy: pytest puts addopts into the list it gets
    seconds = time.perf_counter() - start
    counts = {k: sum(t["outcome"] == k for t in outcomes.tests.values()) for k in ("passed", "failed", "error",
                                                                                    "skipped")}
    ok = counts["passed"] > 0 and counts["passed"] == len(outcomes.tests)
    record = {
        "commit": _commit(a.commit), "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1), "ok": ok, "pytest_exit": int(code), "pytest_args": args[:-1],
        "counts": counts, "collected": len(outcomes.tests), "device": _device(), "versions": _versions(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "not_passed": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in outcomes.tests.items()
                       if v["outcome"] != "passed"},
        "slowest": sorted(([round(v["seconds"], 1), k] for k, v in outcomes.tests.items()), reverse=True)[:10],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)  # a broken write leaves the previous record
    print(f"gpu tests: {counts} in {seconds:.0f} s on {record['device'].get('name')}; record: {out}")
    if not ok:
        print("FAILED: every gpu test must pass here (a skip means it did not run)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
