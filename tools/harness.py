"""The one benchmark harness: a timer and a JSON record, used by every benchmark in tools/.

Why one: a number in BENCHMARKS.md is only worth what it says about how it was taken. Every tool times
the same way (warm-up, repeats, median, peers interleaved so that a shared machine's load falls on all of
them alike) and writes the same record (commit and whether the tree was dirty, the device with the CPU's
ISA flags, the versions of the runtimes, the exact command line), so any claim can be rerun and compared.

Tools import this module by name (``from harness import ...``): ``python tools/x.py`` puts tools/ on the
path. Tools never import the tests; ``tests/test_tools.py`` checks both.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed

PRODUCER = "alibi-export tools/harness.py"
# Distributions whose versions decide a benchmark's numbers (None in the record when not installed).
VERSIONED = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "triton", "transformers",
             "numpy", "tensorrt", "tensorrt-rtx-cu13-bindings")
RECORD_FIELDS = ("producer", "tool", "command", "timestamp", "commit", "dirty", "device", "versions", "results")


# ------------------------------------------------------------------------------------------------ timer
@dataclasses.dataclass
class Timing:
    """Seconds per call of one peer, every sample kept (the median is the number reported)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def ms(self) -> float:
        return 1e3 * self.median


def wall_clock(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """One call's wall time in seconds; ``sync`` (e.g. torch.cuda.synchronize) runs before and after it."""
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def time_peers(peers: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
               sync: Callable[[], None] | None = None, measure: Callable[[Callable], float] | None = None,
               budget_s: float | None = None) -> dict[str, Timing]:
    """Times each peer ``repeats`` times, interleaved (round r times every peer once), after ``warmup``
    untimed calls of each. ``measure(fn) -> seconds`` replaces the wall clock for one sample (e.g. a GPU
    timer that runs the kernel many times, triton.testing.do_bench). ``budget_s`` stops after the round
    in which the budget ran out, once every peer has two samples (slow points on a slow device)."""
    measure = measure or (lambda fn: wall_clock(fn, sync))
    for fn in peers.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    out = {name: Timing([]) for name in peers}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in peers.items():
            out[name].samples.append(measure(fn))
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return out


def time_one(fn: Callable[[], object], **kwargs) -> Timing:
    """``time_peers`` for a single callable."""
    return time_peers({"fn": fn}, **kwargs)["fn"]


def cuda_kernel_times(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[dict, dict]:
    """One call of ``fn`` (after one unprofiled call) under CUPTI, through torch.profiler: {kernel name: device
    µs} and {kernel name: launches}, kernels of a CUDA-graph replay included. The profile tools' one way to say
    where a step's GPU time goes."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    total, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            total[e.name[:120]] += e.device_time
            count[e.name[:120]] += 1
    return dict(total), dict(count)


# ------------------------------------------------------------------------------------------------ record
def git_state(root: Path = ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty): dirty when a tracked file differs from the commit (untracked files do not count)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def cpu_info() -> dict:
    """CPU model and the ISA flags that change ONNX Runtime's kernels (int8 on VNNI, AVX-512 paths)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}


def gpu_name() -> str | None:
    """The first CUDA device's name, asked of torch only if this process already imported it (a CPU
    benchmark of ONNX Runtime need not pay for importing torch)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # a broken CUDA setup is a record without a GPU, not a failed benchmark
        return None
    return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def record(results, *, tool: str | None = None, argv: list[str] | None = None) -> dict:
    """The JSON record of one benchmark run: ``results`` (anything JSON can hold) with where and how."""
    argv = sys.argv if argv is None else argv
    commit, dirty = git_state()
    return {"producer": PRODUCER, "tool": tool or Path(argv[0]).name,
            "command": " ".join(["python", *map(shlex.quote, argv)]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "device": {"cpu": cpu_info(), "gpu": gpu_name()},
            "versions": versions(), "results": results}


def write_record(path: str | os.PathLike, results, **kwargs) -> dict:
    """Writes ``record(results)`` to ``path`` through a temporary file and a rename (a failure leaves the
    previous record). An existing file that is not JSON is not ours: refused, left as it was."""
    path = Path(path)
    if path.exists():
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise SystemExit(f"Error: {path} exists and is not a JSON record; not replacing it") from None
    rec = record(results, **kwargs)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, indent=1, default=float)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rec


def out_path(name: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """Where a tool writes its record: ``--json`` if given, else ``$OUT/name`` when $OUT is set (the GPU
    machine's return folder), else nowhere."""
    if explicit:
        return Path(explicit)
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None
