"""A table of user mistakes for every command, run as a user runs them (a subprocess: tracebacks show).

Every row must give one line `Error: ...` that contains the row's text, a non-zero exit code, no
traceback, and leave nothing behind: no new or changed file in the output folder (the working
directory) nor among the inputs. The README's bad-input paragraph lists these tables.
Cheap failures first: most rows are refused before torch is imported (well under a second each).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from alibi_export._io import sha256_file
from alibi_export.artifacts import EngineSidecar, sidecar_path
from tests.conftest import EXCERPT, ROOT
from tests.test_cli import assert_one_line_error

TIMEOUT_S = 120  # a row that opens the FIFO below would block until this and fail


def run_cli(*args, cwd, timeout=TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "alibi_export", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------- the bad inputs, built once
def _onnx_file(path: Path, metadata=None, *, location: str | None = None) -> Path:
    """A small ONNX graph (ids -> Identity -> logits, and one 4 KB initializer); with ``metadata`` (an
    OnnxMetadata) it carries alibi-export's metadata; with ``location`` its initializer is external data there."""
    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    if location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "4096")):
            weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"]), helper.make_node("Identity", ["w"], ["w_out"])],
        "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [1024])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, metadata.to_props())
    onnx.save(model, path)
    return path


def _checkpoint(src: Path, dst: Path, *, weights: bytes | None = None, tokenizer: bytes | None = None,
                config=None) -> Path:
    shutil.copytree(src, dst)
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    if tokenizer is not None:
        (dst / "tokenizer.json").write_bytes(tokenizer)
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps({**cfg, **config}))
    return dst


def _corpus(folder: Path, train: str | None, valid: str) -> Path:
    folder.mkdir()
    if train is not None:
        (folder / "train.txt").write_text(train)
    (folder / "valid.txt").write_text(valid)
    return folder


TINY_TRAIN = ["--layers", "1", "--heads", "2", "--d-model", "16", "--d-ff", "32", "--vocab-size", "300",
              "--train-len", "16", "--batch-size", "2", "--steps", "1", "--device", "cpu"]


def _trained_run(out: Path, corpus: Path) -> Path:
    """A one-step run of the tiny training options above, to --resume."""
    from alibi_export.model import PAPER_EMBED_SCALE, ModelConfig, embed_scale_of
    from alibi_export.train import TrainConfig, train

    model = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, d_ff=32, train_len=16, max_positions=16,
                        embed_scale=embed_scale_of(PAPER_EMBED_SCALE, 16))  # the paper's recipe
    train(TrainConfig(corpus=str(corpus), out=str(out), model=model, batch_size=2, steps=1, lr=1e-3, min_lr=1e-3 / 10,
                      device="cpu"))
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dir, tiny_kv_export):
    d = tmp_path_factory.mktemp("bad-inputs")
    weights, tokenizer = (tiny_dir / "model.safetensors").read_bytes(), (tiny_dir / "tokenizer.json").read_bytes()
    meta = dataclasses.replace(tiny_kv_export.metadata, kv_cache=False)
    p = dict(tiny=tiny_dir, kv=tiny_kv_export.path, missing=d / "missing")
    p["trunc_weights"] = _checkpoint(tiny_dir, d / "trunc-weights", weights=weights[: len(weights) // 2])
    p["trunc_tokenizer"] = _checkpoint(tiny_dir, d / "trunc-tokenizer", tokenizer=tokenizer[: len(tokenizer) // 2])
    p["bad_json"] = _checkpoint(tiny_dir, d / "bad-json", config='{"vocab_size": 300,')
    p["unknown_field"] = _checkpoint(tiny_dir, d / "unknown-field", config={"flash": True})
    p["contradict"] = _checkpoint(tiny_dir, d / "contradict", config={"n_head": 5})  # 48 % 5 != 0
    p["mismatch"] = _checkpoint(tiny_dir, d / "mismatch", config={"d_ff": 64})  # the weights have 96
    p["ours"] = _onnx_file(d / "ours.onnx", meta)
    p["foreign"] = _onnx_file(d / "foreign.onnx")
    p["trunc_onnx"] = d / "truncated.onnx"
    p["trunc_onnx"].write_bytes(p["ours"].read_bytes()[:3000])
    p["fixed"] = _onnx_file(d / "fixed.onnx", dataclasses.replace(meta, dynamic_len=False))
    p["nowhere"] = _onnx_file(d / "nowhere.onnx", dataclasses.replace(meta, source_name="not-beside-it"))
    p["sinusoidal"] = _onnx_file(d / "sinusoidal.onnx", dataclasses.replace(meta, position="sinusoidal"))
    p["fused"] = _onnx_file(d / "fused.onnx", dataclasses.replace(meta, attention="onnx", ort_fusions=True))
    # External data outside the file's folder: a FIFO, which blocks whoever opens it (root included).
    p["fifo"] = d / "secret.fifo"
    os.mkfifo(p["fifo"])
    (d / "esc").mkdir()
    p["escape"] = _onnx_file(d / "esc" / "escape.onnx", meta, location="../secret.fifo")
    p["escape_abs"] = _onnx_file(d / "esc" / "absolute.onnx", meta, location=str(p["fifo"]))
    (d / "eng").mkdir()
    p["engine"] = d / "eng" / "model.engine"
    p["engine"].write_bytes(b"an engine rebuilt after its sidecar was written")
    side = EngineSidecar(engine="model.engine", engine_sha256="0" * 64, created_by="alibi-export", backend="tensorrt-rtx",
                         backend_version="1.7", precision="fp32", strongly_typed=True, onnx_dtype="float32",
                         attention="native attention", plugin=None, profile={}, train_len=32, onnx="../ours.onnx",
                         onnx_sha256=sha256_file(p["ours"]), timing_cache=None, layer_types={}, build_seconds=1.0)
    sidecar_path(p["engine"]).write_text(side.to_json())
    p["lonely_engine"] = d / "eng" / "lonely.engine"
    p["lonely_engine"].write_bytes(b"no sidecar")
    p["short"] = d / "short.txt"
    p["short"].write_text("Too short to evaluate.")
    p["binary"] = d / "binary.txt"
    p["binary"].write_bytes(b"\xff\xfe\x00 not UTF-8 \xc3\x28")
    p["text"] = d / "text.txt"
    p["text"].write_text(EXCERPT.read_text()[:4000])
    p["tok_trunc"] = d / "tokenizer-truncated.json"
    p["tok_trunc"].write_bytes(tokenizer[: len(tokenizer) // 3])
    excerpt = EXCERPT.read_text()
    p["corpus"] = _corpus(d / "corpus", excerpt[:20000], excerpt[20000:24000])
    p["corpus_empty"] = _corpus(d / "corpus-empty", "", "")
    p["corpus_small"] = _corpus(d / "corpus-small", "A few words.", excerpt[20000:24000])
    p["corpus_small_valid"] = _corpus(d / "corpus-small-valid", excerpt[:20000], "Not enough.")
    p["corpus_no_train"] = _corpus(d / "corpus-no-train", None, excerpt[20000:24000])
    p["run"] = _trained_run(d / "run", p["corpus"])
    # A tokenizer whose ids are not contiguous: as many tokens as the model's vocabulary, one id far beyond it.
    tok = json.loads(tokenizer)
    vocab = tok["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 5000
    p["sparse_tok"] = _checkpoint(tiny_dir, d / "sparse-tokenizer", tokenizer=json.dumps(tok).encode())
    return {k: str(v) for k, v in p.items()} | {"root": d}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (lstat: nothing is opened)."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(os.path.join(base, name))
            out[os.path.join(base, name)] = (st.st_size, st.st_mtime_ns)
    return out


def check_row(args: list[str], match: str, bad: dict, cwd: Path) -> None:
    inputs, before = _tree(bad["root"]), _tree(cwd)
    proc = run_cli(*[a.format(**bad, out=cwd) for a in args], cwd=cwd)
    assert_one_line_error(proc, match)
    assert proc.stdout == "", proc.stdout  # nothing half-printed either (generate streams its prompt)
    assert _tree(cwd) == before, "no partial output in the output folder"
    assert _tree(bad["root"]) == inputs, "the inputs are untouched"


# ----------------------------------------------------------------------------- one table per command
ONNX_ROWS = [
    (["onnx", "{missing}", "--dynamic-len"], "not found"),
    (["onnx", "{short}", "--dynamic-len"], "not found. Note: expected a folder"),
    (["onnx", "{trunc_weights}", "--dynamic-len"], "corrupt weights"),
    (["onnx", "{trunc_tokenizer}", "--dynamic-len"], "cannot read tokenizer.json"),
    (["onnx", "{bad_json}", "--dynamic-len"], "corrupt config.json"),
    (["onnx", "{unknown_field}", "--dynamic-len"], "unknown config field"),
    (["onnx", "{contradict}", "--dynamic-len"], "must be divisible by n_head"),
    (["onnx", "{mismatch}", "--dynamic-len"], "has shape"),
    (["onnx", "{tiny}", "--dynamic-len", "--opset", "12"], "unsupported opset 12"),
    (["onnx", "{tiny}", "--dynamic-len", "--attention", "onnx", "--opset", "18"], "needs opset 23"),
    (["onnx", "{tiny}", "--dynamic-len", "--ort-fusions"], "add --attention onnx"),
    (["onnx", "{tiny}", "--fixed-len", "--kv-cache"], "needs a dynamic length"),
    (["onnx", "{tiny}", "--dynamic-len", "--lengths", "0,64"], "positive integers"),
    (["onnx", "{tiny}", "--dynamic-len", "--lengths", "abc"], "positive integers"),
    (["onnx", "{tiny}", "--dynamic-len", "-o", "{out}/no/such/dir/x.onnx"], "does not exist"),
    (["onnx", "{tiny}", "--fixed-len", "--seq-len", "0"], "0 is not in the range"),
    (["onnx", "{tiny}", "--dynamic-len", "-o", "{foreign}"], "exists and was not written by alibi-export"),
    # issue 20: every option is checked before any work, and every size has an upper bound
    (["onnx", "{tiny}", "--seed", "-1"], "-1 is not in the range"),
    (["onnx", "{tiny}", "-o", ""], "is an empty path"),
    (["onnx", "{tiny}", "--quantize", "int8", "--ppl-tolerance", "nan"], "expected a positive finite number"),
    (["onnx", "{tiny}", "--quantize", "int8", "--ppl-tolerance", "-1"], "expected a positive finite number"),
    (["onnx", "{tiny}", "--quantize", "int8", "--ppl-tolerance", "inf"], "expected a positive finite number"),
    (["onnx", "{tiny}", "--quantize", "int3"], "'int3' is not one of 'int8', 'int4'"),
    (["onnx", "{tiny}", "--text", "{missing}.txt"], "text file"),
    (["onnx", "{tiny}", "--text", "{binary}"], "as UTF-8 text"),
    (["onnx", "{tiny}", "--fixed-len", "--lengths", "16,32"], "runs at its own length (32) only"),
    (["onnx", "{tiny}", "--fixed-len", "--batch", "100000000"], "would need about"),
    (["onnx", "{tiny}", "--fixed-len", "--seq-len", "1000000000", "--no-validate"], "would need about"),
    (["onnx", "{tiny}", "--lengths", "100000000"], "would need about"),
    (["onnx", "{sparse_tok}"], "has token id 5000, outside the model's vocab_size 300"),
]

VALIDATE_ROWS = [
    (["validate", "{missing}.onnx", "{tiny}"], "not found"),
    (["validate", "{short}", "{tiny}"], "cannot read ONNX"),
    (["validate", "{trunc_onnx}", "{tiny}"], "cannot read ONNX"),
    (["validate", "{foreign}", "{tiny}"], "not written by alibi-export"),
    (["validate", "{escape}", "{tiny}"], "outside its own folder ('../secret.fifo')"),
    (["validate", "{escape_abs}", "{tiny}"], "outside its own folder"),
    (["validate", "{nowhere}"], "pass the checkpoint folder as MODEL"),
    (["validate", "{ours}", "{missing}"], "not found"),
    (["validate", "{ours}", "{tiny}", "--lengths", "0"], "positive integers"),
    (["validate", "{fixed}", "{tiny}", "--lengths", "16,32"], "fixed-length export"),
    (["validate", "{engine}", "{tiny}"], "does not match its sidecar"),
    (["validate", "{lonely_engine}", "{tiny}"], "has no sidecar"),
    (["validate", "{ours}", "{tiny}", "--batch", "0"], "0 is not in the range"),
    (["validate", "{ours}", "{tiny}", "--seed", "-1"], "-1 is not in the range"),
    (["validate", "{ours}", "{tiny}", "--lengths", "100000000"], "length 100,000,000 would need about"),
    (["validate", "{ours}", "{tiny}", "--lengths", "4y"], "multiples of the training length such as 4x"),
    (["validate", "{ours}", "{tiny}", "--text", "{binary}"], "as UTF-8 text"),
    (["validate", "{ours}", "{tiny}", "--model", "{tiny}"], "MODEL given twice"),
]

PPL_ROWS = [
    (["ppl", "{tiny}", "--text", "{short}", "--lengths", "64"], "text too short"),
    (["ppl", "{tiny}", "--text", "{missing}.txt", "--lengths", "64"], "not found"),
    (["ppl", "{tiny}", "--text", "{binary}", "--lengths", "64"], "as UTF-8 text"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "-3"], "positive integers"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "64", "--stride", "0"], "0 is not in the range"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "16,64", "--stride", "32"],
     "stride must be between 1 and the length (16)"),
    (["ppl", "{missing}", "--text", "{text}", "--lengths", "64"], "not found"),
    (["ppl", "{foreign}", "--text", "{text}", "--lengths", "64"], "not written by alibi-export"),
    (["ppl", "{engine}", "--text", "{text}", "--lengths", "64"], "does not match its sidecar"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "64", "--json", "{out}/no/dir/p.json"], "does not exist"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "64", "--json", "{text}"],
     "exists and was not written by alibi-export"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "64", "--json", "{out}/x", "--plot", "{out}/x"],
     "--json and --plot name the same file"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "64", "--json", ""], "--json is an empty path"),
    (["ppl", "{tiny}", "--text", "{text}", "--lengths", "100000000"], "would need about"),
    (["ppl", "{sparse_tok}", "--text", "{text}", "--lengths", "16"], "has token id 5000"),
    (["ppl", "{tiny}", "{kv}", "--text", "{text}", "--lengths", "0x"], "positive integers"),
]

GENERATE_ROWS = [
    (["generate", "{kv}", "-p", "Once", "-n", "0"], "0 is not in the range"),
    (["generate", "{kv}", "-p", "Once", "--temperature", "0"], "temperature must be a positive finite number"),
    (["generate", "{kv}", "-p", "Once", "--temperature", "-1"], "temperature must be a positive finite number"),
    (["generate", "{kv}", "-p", "Once", "--temperature", "nan"], "temperature must be a positive finite number"),
    (["generate", "{kv}", "-p", "Once", "--top-k", "0"], "top_k must be a positive integer"),
    (["generate", "{kv}", "-p", "Once", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "{kv}", "-p", "Once", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "{kv}", "-p", "Once", "--top-p", "nan"], "top_p must be in (0, 1]"),
    (["generate", "{kv}", "-p", ""], "prompt 0 is empty"),
    (["generate", "{ours}", "-p", "Once"], "has no KV-cache inputs"),
    (["generate", "{trunc_onnx}", "-p", "Once"], "cannot read ONNX"),
    (["generate", "{escape}", "-p", "Once"], "outside its own folder"),
    (["generate", "{kv}", "-p", "Once", "--threads", "0"], "0 is not in the range"),
    (["generate", "{kv}", "-p", "Once", "--provider", "tpu"], "'tpu' is not one of 'cpu', 'cuda'"),
    (["generate", "{kv}", "-p", "Once", "--seed", "-1"], "-1 is not in the range"),
    (["generate", "{kv}", "-p", "Once", "-n", "100000000"], "100000000 is not in the range"),
]

TRT_ROWS = [
    (["trt", "{ours}", "-o", "{out}/m.engine", "--min-len", "0"], "sizes must be positive"),
    (["trt", "{ours}", "-o", "{out}/m.engine", "--min-len", "64", "--opt-len", "32"], "min > opt"),
    (["trt", "{ours}", "-o", "{out}/m.engine", "--opt-len", "512", "--max-len", "256"], "opt > max"),
    (["trt", "{ours}", "-o", "{out}/m.engine", "--batch", "0:1:1"], "MIN:OPT:MAX positive integers"),
    (["trt", "{missing}.onnx", "-o", "{out}/m.engine"], "not found"),
    (["trt", "{foreign}", "-o", "{out}/m.engine"], "not written by alibi-export"),
    (["trt", "{sinusoidal}", "-o", "{out}/m.engine"], "has no ALiBi attention"),
    (["trt", "{fused}", "-o", "{out}/m.engine"], "export without --ort-fusions"),
    (["trt", "{kv}", "-o", "{out}/m.engine"], "is a KV-cache decoder (exported with --kv-cache)"),
    (["trt", "{escape}", "-o", "{out}/m.engine"], "outside its own folder"),
    (["trt", "{ours}", "-o", "{out}/no/dir/m.engine"], "does not exist"),
    (["trt", "{ours}", "-o", "{text}"], "exists and was not written by alibi-export"),
    (["trt", "{ours}", "-o", ""], "is an empty path"),
    (["trt", "{ours}", "-o", "{out}/m.engine", "--dtype", "float16", "--bf16"], "more than one precision"),
]

TRAIN_ROWS = [
    (["train", "--corpus", "{corpus_no_train}", "-o", "{out}/m", *TINY_TRAIN], "has no train.txt"),
    (["train", "--corpus", "{corpus_empty}", "-o", "{out}/m", *TINY_TRAIN], "corpus too small: train.txt"),
    (["train", "--corpus", "{corpus_small}", "-o", "{out}/m", *TINY_TRAIN], "corpus too small: train.txt"),
    (["train", "--corpus", "{corpus_small_valid}", "-o", "{out}/m", *TINY_TRAIN], "corpus too small: valid.txt"),
    (["train", "--corpus", "{corpus}", "-o", "{run}", "--resume", *TINY_TRAIN, "--heads", "4"],
     "the config differs from the checkpoint's in model.n_head"),
    (["train", "--corpus", "{corpus}", "-o", "{run}", "--resume", *TINY_TRAIN, "--seed", "7"],
     "the config differs from the checkpoint's in seed"),
    (["train", "--corpus", "{corpus}", "-o", "{run}", "--resume", *TINY_TRAIN, "--embed-scale", "1"],
     "the config differs from the checkpoint's in model.embed_scale (checkpoint 4.0, now 1.0)"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--embed-scale", "0"],
     "embed scale must be 'sqrt-d' or a positive number"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", "--resume", *TINY_TRAIN], "holds no training checkpoint"),
    (["train", "--corpus", "{corpus}", "-o", "{corpus}", *TINY_TRAIN], "is not empty and not a checkpoint"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--d-model", "20", "--heads", "8"],
     "must be divisible by n_head"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--position", "rotary", "--d-model", "24",
      "--heads", "8"], "rotary needs an even head dimension"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--tokenizer", "{tok_trunc}"],
     "cannot read the tokenizer"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--device", "tpu"], "device 'tpu'"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--seed", "-1"], "-1 is not in the range"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--vocab-size", "1000000000"],
     "1000000000 is not in the range 300<=x<=1048576"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--batch-size", "100000000"],
     "would need about"),
    (["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--lr", "nan"], "positive finite number"),
    (["train", "--corpus", "{corpus}", "-o", "", *TINY_TRAIN], "is an empty path"),
]


TABLES = {"onnx": ONNX_ROWS, "validate": VALIDATE_ROWS, "ppl": PPL_ROWS, "generate": GENERATE_ROWS,
          "trt": TRT_ROWS, "train": TRAIN_ROWS}


@pytest.mark.parametrize("args,match", [
    pytest.param(args, match, id=f"{command}-{i:02d}-{match[:40]}")
    for command, rows in TABLES.items() for i, (args, match) in enumerate(rows)])
def test_bad_input(args, match, bad, tmp_path):
    check_row(args, match, bad, tmp_path)


def test_cuda_device_without_cuda(bad, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    check_row(["train", "--corpus", "{corpus}", "-o", "{out}/m", *TINY_TRAIN, "--device", "cuda"],
              "CUDA is not available", bad, tmp_path)


def test_table_has_forty_rows_or_more():
    assert sum(map(len, TABLES.values())) >= 40 and all(len(t) >= 8 for t in TABLES.values())


# ----------------------------------------------------------------------------- bugs are not user mistakes
_PLANTED_BUG = """
import sys
import alibi_export.artifacts as artifacts

def read_metadata(path):
    raise ZeroDivisionError("planted bug")

artifacts.read_metadata = read_metadata
from alibi_export.cli import main
sys.argv = ["alibi-export", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_is_not_hidden(tmp_path, verbose):
    """An error that is not a user mistake says it is a bug in one line; with -v it shows its traceback."""
    args = ["-v"] * verbose + ["validate", "model.onnx", "--model", "m"]
    proc = subprocess.run([sys.executable, "-c", _PLANTED_BUG, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    if verbose:
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "ZeroDivisionError: planted bug"
        with pytest.raises(AssertionError):  # control: the table's check rejects this output
            assert_one_line_error(proc, "planted bug")
    else:
        assert_one_line_error(proc, "internal error: ZeroDivisionError: planted bug. Note: this is a bug")
        assert "run with -v" in proc.stderr


@pytest.mark.parametrize("module, expected", [
    ("polygraphy", "the package 'polygraphy', which alibi-export requires, is not installed"),
    ("not_a_dependency", "internal error: ModuleNotFoundError"),  # control: a module we do not declare is a bug
])
def test_a_missing_required_package_is_an_install_problem(tmp_path, module, expected):
    """A required package that is missing (a broken install; seen on a machine without polygraphy) is said as
    such in one line, not reported as a bug in alibi-export."""
    from alibi_export.shipped import default_model

    stub = tmp_path / "stubs" / "polygraphy"  # shadows the installed package; importing it fails
    stub.mkdir(parents=True)
    message = f"No module named {module!r}"
    (stub / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={module!r})\n")
    (tmp_path / "text.txt").write_text("Some text.")
    proc = subprocess.run([sys.executable, "-m", "alibi_export", "ppl", str(default_model()), "--text", "text.txt",
                           "--lengths", "64"], capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path / 'stubs'}{os.pathsep}{ROOT}"})
    assert_one_line_error(proc, expected)


def test_user_error_with_verbose_stays_one_line(tmp_path):
    assert_one_line_error(run_cli("-v", "validate", "missing.onnx", "--model", "m", cwd=tmp_path), "not found")


def test_generation_limits_match_the_library():
    """The CLI rows above go through check_sampling; the library's sampler refuses the same values."""
    from alibi_export.errors import AlibiExportError
    from alibi_export.runtime.generate import _Sampler

    for temperature, top_k, top_p in ((0.0, None, None), (math.nan, None, None), (1.0, 0, None), (1.0, None, 0.0),
                                      (1.0, None, 1.5), (math.inf, None, None)):
        with pytest.raises(AlibiExportError):
            _Sampler(False, temperature, top_k, top_p, seed=0)
    _Sampler(False, 0.7, 5, 1.0, seed=0)  # the edges that are allowed
