"""Interruptions, with real signals sent to real processes: SIGKILL and SIGTERM during training saves, ONNX
exports and genai folder switches. After each, the output is the previous complete one or the new one (a
checkpoint loads and every recorded SHA-256 matches), and the next run recovers what the dead process left.

Two ways of choosing the moment: a training run killed from outside at seeded random delays while it saves
every step, and a process that sends SIGKILL to itself at an exact point (the Nth call of a function it
wraps), for the moments a random delay would rarely hit. Each check has its negative control: a mixed set is
refused, a live process's temporaries and a user's look-alike file are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alibi_export import load
from alibi_export._io import remove_stale, sha256_file, temp_file
from alibi_export.checkpoint import STATE, current_set, set_folders
from alibi_export.errors import CheckpointError
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error, run_cli

TINY = ["--vocab-size", "300", "--layers", "1", "--d-model", "32", "--d-ff", "32", "--heads", "2",
        "--train-len", "16", "--batch-size", "2", "--eval-every", "100000"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer.save(str(path))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _train_args(corpus, out, tokenizer_file, steps, *extra):
    return [sys.executable, "-m", "alibi_export", "train", "--corpus", str(corpus), "-o", str(out), "--steps",
            str(steps), "--save-every", "1", "--tokenizer", str(tokenizer_file), *TINY, *extra]


def _wait(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def _dot_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def assert_complete(out: Path) -> int:
    """The invariant: the checkpoint loads, and every file trainer_state.json records has that SHA-256."""
    files = current_set(out)
    state = json.loads((files / STATE).read_text())
    assert state["files"] and all(sha256_file(files / n) == h for n, h in state["files"].items())
    load(out)
    return state["step"]


# ----------------------------------------------------------------------------- SIGKILL during training
@pytest.mark.slow
def test_sigkill_at_random_moments_of_save_every_step(corpus, tokenizer_file, tmp_path, rng):
    """The reported failure: `train --save-every 1` killed 5 times; twice the files did not match the SHA-256s of
    trainer_state.json, and --resume used the mixed set. Now every kill leaves a complete set, resumed."""
    out = tmp_path / "ck"
    steps_seen = []
    for i in range(4):
        extra = ["--resume"] if i else []
        proc = subprocess.Popen(_train_args(corpus, out, tokenizer_file, 100000, *extra), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = steps_seen[-1] if steps_seen else 0
        _wait(lambda: assert_step(out) > first or proc.poll() is not None)
        time.sleep(float(rng.uniform(0.0, 0.4)))  # a seeded moment, mostly inside a save (saves are most of a step)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        steps_seen.append(assert_complete(out))
    assert steps_seen == sorted(steps_seen) and steps_seen[0] >= 1
    # the next run finishes from the last complete set, and leaves no set or temporary of the killed ones
    proc = subprocess.run(_train_args(corpus, out, tokenizer_file, steps_seen[-1] + 2, "--resume"), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert assert_complete(out) == steps_seen[-1] + 2
    assert len(set_folders(out)) == 1 and _dot_files(out) == []


def assert_step(out: Path) -> int:
    try:
        return json.loads((current_set(out) / STATE).read_text())["step"]
    except (OSError, ValueError, CheckpointError):
        return 0


def test_a_mixed_set_is_refused_on_load_and_resume(corpus, tmp_path):
    """Negative control of the invariant: a set mixed as an in-place update killed between two renames left
    it (weights of one save, the rest of another) is refused in one line by load, resume and `onnx`."""
    from alibi_export.model import ModelConfig
    from alibi_export.train import TrainConfig, train

    model = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, d_ff=32, train_len=16, max_positions=16)
    cfg = TrainConfig(corpus=str(corpus), out=str(tmp_path / "ck"), model=model, batch_size=2, steps=2, warmup=1,
                      eval_every=100, eval_tokens=64, save_every=1)
    train(cfg)
    out = Path(cfg.out)
    assert_complete(out)  # the control: the set as written loads
    other = tmp_path / "other"
    train(TrainConfig(**{**cfg.__dict__, "out": str(other), "seed": 1}))
    weights = current_set(out) / "model.safetensors"
    shutil.copyfile(current_set(other) / "model.safetensors", weights)  # same shapes, other bytes
    with pytest.raises(CheckpointError, match="model.safetensors differ from the recorded SHA-256"):
        load(out)
    with pytest.raises(CheckpointError, match="does not match its trainer_state.json"):
        train(TrainConfig(**{**cfg.__dict__, "steps": 3}), resume=True)
    assert_one_line_error(run_cli("onnx", out, "-o", tmp_path / "x.onnx"), "does not match")
    assert not (tmp_path / "x.onnx").exists()


# Runs train() and sends SIGKILL to itself at the Nth call of safetensors' save_file: a moment inside a save.
_SELF_KILL_TRAIN = """
import os, signal, sys
import safetensors.torch as st
from alibi_export.model import ModelConfig
from alibi_export.train import TrainConfig, train
calls, at = [0], int(sys.argv[3])
real = st.save_file
def save_file(*a, **k):
    real(*a, **k)
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_file
model = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=32, d_ff=32, train_len=16, max_positions=16)
train(TrainConfig(corpus=sys.argv[1], out=sys.argv[2], model=model, batch_size=2, steps=3,  # as TINY says
                  eval_every=100000, eval_tokens=64, save_every=1, tokenizer=sys.argv[4]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("at", [1, 2])  # after the weights, after the optimizer state of the FIRST save
def test_a_kill_during_the_first_save_is_recovered(corpus, tokenizer_file, tmp_path, at):
    """The reported failure: a kill during a new run's first save left only .tmp files, and the plain run,
    --resume and --overwrite all refused the folder. Now the dead process's staging is recognised (its name
    and its owner's pid) and removed; --resume says there is no checkpoint."""
    out = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", _SELF_KILL_TRAIN, str(corpus), str(out), str(at), str(tokenizer_file)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and left[0].startswith(".step-000001.") and left[0].endswith(".tmp")  # a save cut short
    proc = run_cli("train", "--corpus", corpus, "-o", out, "--steps", "2", "--resume", "--tokenizer", tokenizer_file,
                   *TINY)
    assert_one_line_error(proc, "holds no training checkpoint")
    proc = run_cli("train", "--corpus", corpus, "-o", out, "--steps", "2", "--tokenizer", tokenizer_file, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert assert_complete(out) == 2 and _dot_files(out) == []


def test_a_kill_between_saves_leaves_the_previous_set(corpus, tokenizer_file, tmp_path):
    """Killed inside the third save (after its weights): the second save's set is current and complete."""
    out = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", _SELF_KILL_TRAIN, str(corpus), str(out), "5", str(tokenizer_file)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert assert_complete(out) == 2 and any(n.startswith(".step-000003.") for n in _dot_files(out))
    proc = run_cli("train", "--corpus", corpus, "-o", out, "--steps", "3", "--resume", "--tokenizer", tokenizer_file,
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    assert assert_complete(out) == 3 and _dot_files(out) == [] and len(set_folders(out)) == 1


def test_temporaries_of_an_earlier_version_are_named(corpus, tokenizer_file, tmp_path):
    """mkstemp names of earlier versions record no owner, so they cannot be proven stale: the error names them."""
    out = tmp_path / "ck"
    out.mkdir()
    (out / ".model.safetensors.k2j4_x9q.tmp").write_bytes(b"partial")
    proc = run_cli("train", "--corpus", corpus, "-o", out, "--steps", "2", "--tokenizer", tokenizer_file, *TINY)
    assert_one_line_error(proc, "holds temporary files of an interrupted save: .model.safetensors.k2j4_x9q.tmp")
    assert (out / ".model.safetensors.k2j4_x9q.tmp").read_bytes() == b"partial"


# ----------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_during_training_cleans_up_like_ctrl_c(corpus, tokenizer_file, tmp_path, rng):
    """SIGTERM (timeout, docker stop, CI cancellation) at seeded moments of a run that saves every step: the
    process exits on its own (not killed by the signal), leaving a complete set and no temporary."""
    out = tmp_path / "ck"
    for i in range(3):
        before = assert_step(out) if out.exists() else 0
        proc = subprocess.Popen(_train_args(corpus, out, tokenizer_file, 100000, *(["--resume"] if i else [])),
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait(lambda: assert_step(out) > before or proc.poll() is not None)  # this run has saved: it is training
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr  # handled: not -SIGTERM
        assert _dot_files(out) == [] and len(set_folders(out)) == 1
        assert_complete(out)


# A save that sends SIGTERM to itself at an exact moment (the handler runs right after os.kill returns).
# "control" breaks write_set the way the tests must catch: no deferral around the switch, or a staging folder
# created under a name its clean-up does not know.
_SELF_TERM_SAVE = """
import contextlib, os, signal, sys
from pathlib import Path
from alibi_export import checkpoint
from alibi_export._io import handle_sigterm
out, at, control = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "control"
handle_sigterm()
write = lambda files: files["config.json"].write_text("{}")
checkpoint.write_set(out, 1, ["config.json"], write)
if at == "switch":  # just after `current` names the new set, before the old one is removed
    if control:
        checkpoint.interrupts_deferred = contextlib.nullcontext
    real_link = checkpoint._link
    def link(path, target):
        real_link(path, target)
        if path.name == checkpoint.CURRENT:
            os.kill(os.getpid(), signal.SIGTERM)
    checkpoint._link = link
else:  # "created": just after the staging folder is made, before anything else runs
    real_mkdir = os.mkdir
    def mkdir(path, *a, **k):
        if not Path(path).name.startswith(".step-"):
            return real_mkdir(path, *a, **k)
        if control:
            path = str(path) + "x"  # a folder the write's clean-up does not know
        real_mkdir(path, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
    checkpoint.os.mkdir = mkdir
try:
    checkpoint.write_set(out, 2, ["config.json"], write)
except KeyboardInterrupt:
    sys.exit(1)
"""


@pytest.mark.parametrize("at", ["switch", "created"])
def test_sigterm_at_exact_moments_of_a_save_leaves_one_set_and_no_temporary(tmp_path, at):
    """SIGTERM right after the switch (the old set is still there) and right after the staging folder is made
    (its name not yet used by anything): the save's clean-up runs to its end, so one complete set is left and
    no temporary; the status is 1 (handled). The controls break write_set in the two ways this catches."""
    for control in (False, True):
        out = tmp_path / f"ck-{control}"
        proc = subprocess.run([sys.executable, "-c", _SELF_TERM_SAVE, str(out), at, "control" if control else "fixed"],
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (control, proc.returncode, proc.stderr)
        clean = _dot_files(out) == [] and len(set_folders(out)) == 1
        assert clean != control, (at, control, _dot_files(out), set_folders(out))
        step = json.loads((current_set(out) / "config.json").read_text()) == {} and os.readlink(out / "current")
        assert step.startswith("step-00000" + ("2" if at == "switch" else "1")), step


_HOLD_TEMPORARY = """
import sys, time
from pathlib import Path
from alibi_export._io import temp_file
print(temp_file(Path(sys.argv[1])), flush=True)
time.sleep(600)
"""


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    """A process holding a temporary dies by SIGTERM without our handler (as any crash would): its temporary
    stays until the next write of the same target, which removes it. A live process's temporary is kept."""
    target = tmp_path / "out.json"
    holders = [subprocess.Popen([sys.executable, "-c", _HOLD_TEMPORARY, str(target)], env=_env(),
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dead, live = (Path(h.stdout.readline().strip()) for h in holders)
    holders[0].send_signal(signal.SIGTERM)
    holders[0].wait()
    try:
        assert dead.exists() and live.exists()
        (tmp_path / ".out.json.notapid.tmp").write_text("a user's file")  # not our pattern: kept
        assert remove_stale(tmp_path, ["out.json"]) == [dead]
        assert not dead.exists() and live.exists() and (tmp_path / ".out.json.notapid.tmp").exists()
        ours = temp_file(target)  # this process is alive too
        assert remove_stale(tmp_path, ["out.json"]) == [] and ours.exists()
    finally:
        holders[1].kill()
        holders[1].wait()


# ----------------------------------------------------------------------------- ONNX exports
_SELF_KILL_EXPORT = """
import os, signal, sys
from pathlib import Path
from alibi_export import load
from alibi_export.export import onnx_file
from alibi_export.export.onnx import export_onnx
out, when = Path(sys.argv[2]), sys.argv[3]
real = os.replace
def replace(src, dst, *a, **k):
    if when == "before-switch" and Path(dst) == out:
        os.kill(os.getpid(), signal.SIGKILL)  # the data file is in place, the .onnx not yet switched
    return real(src, dst, *a, **k)
onnx_file.os.replace = replace
export_onnx(load(sys.argv[1]), out, external_data_threshold=0)
if when == "after":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_an_export_killed_before_its_switch_leaves_the_old_pair_and_no_orphan(tiny_dir, tmp_path):
    """Killed after the new data file is in place and before the .onnx switch: the old pair still works; the
    next export removes the new data file (provably ours: the same inode as the dead process's staging copy)
    and the staging folder, and keeps a user's file that only looks like a data file."""
    from alibi_export.artifacts import check_onnx_file
    from alibi_export.export.onnx import export_onnx
    from alibi_export.export.onnx_file import data_files_of

    out = tmp_path / "m.onnx"
    export_onnx(load(tiny_dir), out, external_data_threshold=0, dtype="float16")  # the old pair
    old = (out.read_bytes(), data_files_of(out))
    proc = subprocess.run([sys.executable, "-c", _SELF_KILL_EXPORT, str(tiny_dir), str(out), "before-switch"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out.read_bytes(), data_files_of(out)) == old
    check_onnx_file(out)
    orphans = {p for p in tmp_path.glob("m.onnx.*.data")} - old[1]
    assert len(orphans) == 1 and any(p.name.startswith(".m.onnx.") for p in tmp_path.iterdir())
    user = tmp_path / "m.onnx.0123456789abcdef.data"
    user.write_bytes(b"a user's file named like ours")
    export_onnx(load(tiny_dir), out, external_data_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", user.name, *(p.name for p in data_files_of(out))])
    assert user.read_bytes() == b"a user's file named like ours"


@pytest.mark.slow
def test_sigterm_during_an_export_leaves_no_staging(tiny_dir, tmp_path, rng):
    """SIGTERM at seeded moments while `onnx` holds its staging folder: the command exits on its own (status 1,
    no traceback), no staging folder stays, and -o is the previous file or the new one."""
    from alibi_export.export.onnx import export_onnx
    from alibi_export.export.onnx_file import written_by_alibi_export

    out = tmp_path / "m.onnx"
    export_onnx(load(tiny_dir), out)
    hit = 0
    for delay in rng.uniform(0.0, 0.2, size=3):
        proc = subprocess.Popen([sys.executable, "-m", "alibi_export", "onnx", str(tiny_dir), "-o", str(out),
                                 "--dtype", "float16"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        _wait(lambda: any(p.name.startswith(".m.onnx.") for p in tmp_path.iterdir()) or proc.poll() is not None,
              timeout=300)
        time.sleep(float(delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=300)[1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and written_by_alibi_export(out)
        # handled as Ctrl-C: "Aborted." and status 1, or 0 when it lands after the command ended (a SIGTERM
        # during the interpreter's shutdown is ignored); never the default action of SIGTERM, never Python's
        # own -SIGINT exit for an interrupt that escaped, never a traceback
        hit += proc.returncode == 1
        assert proc.returncode in (0, 1) and "Traceback" not in stderr, (proc.returncode, stderr)
    assert hit  # at least one signal landed while the staging folder existed


_INTERRUPT_IN_EXEC = """
import sys
from alibi_export import cli
if sys.argv[1] == "control":
    cli.exec = lambda code: None  # the CLI without its clearing of CPython's record
@cli.main.command("interrupted-in-exec")
def interrupted():
    exec("raise KeyboardInterrupt")  # as a SIGTERM that lands while a lazy import makes a dataclass
cli.main(["interrupted-in-exec"])
"""


def test_an_interrupt_inside_exec_code_still_exits_with_status_1(tmp_path):
    """The rare -SIGINT exit of `python -m alibi_export` under SIGTERM: a KeyboardInterrupt that escaped code
    run by exec() of a string makes CPython end a `-m` process by SIGINT after it exits, whatever status it
    chose. The CLI clears that record; the control, without the clearing, is ended by SIGINT."""
    (tmp_path / "interrupt_in_exec.py").write_text(_INTERRUPT_IN_EXEC)
    for variant, status in (("fixed", 1), ("control", -signal.SIGINT)):
        proc = subprocess.run([sys.executable, "-m", "interrupt_in_exec", variant], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == status and proc.stderr.strip() == "Aborted.", (variant, proc.returncode, proc.stderr)


# ----------------------------------------------------------------------------- the genai folder switch
_SELF_KILL_GENAI = """
import os, signal, sys
from pathlib import Path
from alibi_export import load
from alibi_export.export import genai, onnx_file
out, when = Path(sys.argv[2]), sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_exchange = os.replace, genai.exchange
if when == "writing":  # inside the export, as the model file is switched into the staging folder
    onnx_file.os.replace = lambda s, d: die() if Path(d).name == "model.onnx" else real_replace(s, d)
if when == "after-exchange":  # the new folder is in, the old one not yet removed
    genai.exchange = lambda a, b: (real_exchange(a, b), die())[0]
if when == "no-exchange":  # a file system without renameat2: killed between moving the old folder aside and the new in
    genai.exchange = lambda a, b: False
    calls = []
    def replace(s, d):
        real_replace(s, d)
        calls.append(d)
        if Path(s) == out:
            die()
    genai.os.replace = replace
genai.export_genai(load(sys.argv[1]), out, kv_cache=True, dynamic_len=True, dtype=sys.argv[4])
"""


def _genai_state(folder: Path) -> str:
    """Which complete folder is at ``folder``: the model file's SHA-256, after checking that all is there."""
    from alibi_export.export.genai import GENAI_FILES
    from alibi_export.export.onnx_file import written_by_alibi_export

    assert sorted(p.name for p in folder.iterdir()) == sorted(GENAI_FILES)
    assert written_by_alibi_export(folder / "model.onnx") and json.loads((folder / "genai_config.json").read_text())
    return sha256_file(folder / "model.onnx")


@pytest.mark.slow
def test_genai_switch_killed_at_each_moment(tiny_dir, tmp_path):
    """SIGKILL inside the export, right after the swap, and (where the file system cannot swap) between the two
    renames: the -o folder is the old complete folder or the new one, or, in the last case, the next export
    puts the old one back first. Nothing of the dead processes stays after the next export."""
    from alibi_export.export.genai import export_genai

    out = tmp_path / "g"
    export_genai(load(tiny_dir), out, kv_cache=True, dynamic_len=True)
    old = _genai_state(out)
    new = None
    for when in ("writing", "after-exchange", "no-exchange"):
        proc = subprocess.run([sys.executable, "-c", _SELF_KILL_GENAI, str(tiny_dir), str(out), when, "float16"],
                              env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if when == "writing":
            assert _genai_state(out) == old
        elif when == "after-exchange":
            new = _genai_state(out)
            assert new != old
        else:  # the fallback's window: -o is gone until the next export restores it
            assert not out.exists() and any(p.name.startswith(".g.old.") for p in tmp_path.iterdir())
    assert any(p.name.startswith(".g.") for p in tmp_path.iterdir())  # the dead processes' staging
    export_genai(load(tiny_dir), out, kv_cache=True, dynamic_len=True, dtype="float16")
    assert _genai_state(out) == new and sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_genai_reexport_keeps_a_file_only_named_like_its_data(tiny_dir, tmp_path):
    """The reported failure: a genai re-export deleted a user's `model.onnx.<16 hex>.data`. Only data files the
    folder's own model.onnx records are ours; control: a folder whose data file is recorded is replaced."""
    from alibi_export.errors import ExportError
    from alibi_export.export.genai import export_genai
    from alibi_export.export.onnx_file import data_files_of

    ck = load(tiny_dir)
    out = tmp_path / "g"
    export_genai(ck, out, kv_cache=True, dynamic_len=True, external_data_threshold=0)
    (recorded,) = data_files_of(out / "model.onnx")
    export_genai(ck, out, kv_cache=True, dynamic_len=True)  # control: ours, with its recorded data file
    assert not recorded.exists() and data_files_of(out / "model.onnx") == set()
    user = out / "model.onnx.0123456789abcdef.data"
    user.write_bytes(b"mine")
    with pytest.raises(ExportError, match="model.onnx.0123456789abcdef.data, which no export of ours recorded"):
        export_genai(ck, out, kv_cache=True, dynamic_len=True)
    assert user.read_bytes() == b"mine"


def test_sigterm_handler_is_installed_only_over_the_default(monkeypatch):
    """In the main thread, over the default action: SIGTERM raises KeyboardInterrupt inside the block, and the
    default is back after it. A program's own handler is kept (control)."""
    from alibi_export._io import sigterm_as_interrupt

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt(), sigterm_as_interrupt():  # nested: one handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    mine = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: mine.append(s))
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert mine == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_in_process_cli_call_leaves_the_sigterm_handler_alone(tmp_path):
    """The CLI installs its SIGTERM handler at the process's entry point, not in the command group: an in-process
    caller (click's CliRunner, a test) keeps SIGTERM's default, so later code is not interrupted by a handler it
    never asked for. Control: the entry point's own installer does change it."""
    from click.testing import CliRunner

    from alibi_export._io import handle_sigterm
    from alibi_export.cli import main

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "missing.onnx")])
    assert result.exit_code != 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    try:
        handle_sigterm()
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
