"""`validate` and `ppl` on every kind of file `onnx` writes (issue 19 §2): one runner_for and one check_export,
chosen by the file's metadata, so that a KV-cache file, a quantized file and a genai folder are each run the way
they take their inputs. Tiny models: the point is that each kind runs and is judged, not the numbers."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alibi_export import load, save
from alibi_export.cli import main
from alibi_export.export.genai import export_genai
from alibi_export.export.onnx import export_onnx
from tests.conftest import EXCERPT

pytestmark = pytest.mark.slow  # nine exports of a tiny model: about a minute on 2 cores

KINDS = {
    "dynamic": dict(),
    "fixed": dict(dynamic_len=False),
    "plugin": dict(attention="plugin"),
    "onnx-form": dict(attention="onnx"),
    "kv-cache": dict(kv_cache=True),
    "int8": dict(quantize="int8"),
    "int4": dict(quantize="int4"),
    "kv-cache-int8": dict(kv_cache=True, quantize="int8"),
    "genai": dict(kv_cache=True, genai=True),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dir):
    ck = load(tiny_dir)
    d = tmp_path_factory.mktemp("every-export")
    paths = {}
    for kind, options in KINDS.items():
        options = dict(options)
        if options.pop("genai", False):
            paths[kind] = d / "tiny-genai"
            export_genai(ck, paths[kind], **options)
        else:
            paths[kind] = export_onnx(ck, d / f"{kind}.onnx", **options).path
    return paths


@pytest.fixture(scope="module")
def blank_dir(tmp_path_factory, tiny_dir):
    """The tiny model with its (tied) embedding zeroed: uniform logits, perplexity = the vocabulary (300) where the
    tiny model's is ~1e8. Every check must tell it from the model the exports came from."""
    ck = load(tiny_dir)
    with torch.no_grad():
        ck.model.wte.weight.zero_()
    folder = tmp_path_factory.mktemp("blank") / "blank"
    save(ck.model, ck.tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(EXCERPT.read_text()[:4000])
    return path


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("kind", KINDS)
def test_validate_runs_every_kind_and_tells_the_source_from_another_model(kind, exports, tiny_dir, blank_dir, text,
                                                                         seed):
    lengths = [] if kind == "fixed" else ["--lengths", "1x,2x"]  # a fixed-length file: its own length by default
    ok = _invoke("validate", exports[kind], tiny_dir, *lengths, "--text", text, "--seed", seed)
    assert ok.exit_code == 0, ok.output
    verdict = "accuracy gate PASS" if "int" in kind else "parity PASS"
    assert verdict in ok.output, ok.output
    if kind.startswith("kv-cache") and "int" not in kind or kind == "genai":
        assert "KV-cache parity" in ok.output  # through the cache, not one prefill
    bad = _invoke("validate", exports[kind], blank_dir, *lengths, "--text", text, "--seed", seed)
    assert bad.exit_code == 1, bad.output  # control: the same check against another model fails
    assert ("accuracy gate failed" if "int" in kind else "parity check failed") in bad.output, bad.output


@pytest.mark.parametrize("kind", KINDS)
def test_ppl_runs_every_kind_and_matches_pytorch(kind, exports, tiny_dir, blank_dir, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("ppl", exports[kind], tiny_dir, blank_dir, "--text", text, "--lengths", "1x", "--max-tokens",
                     200, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    got, ref, blank = (rows[k][0]["ppl"] for k in (exports[kind].name, tiny_dir.name, blank_dir.name))
    # float32 exports agree with PyTorch to rounding; quantized ones within their gate's ratio
    tolerance = 1.1 if "int" in kind else 1e-3
    assert abs(math.log(got / ref)) < math.log1p(tolerance) if "int" in kind else abs(got / ref - 1) < tolerance
    assert abs(blank / ref - 1) > 0.5  # control: another model's perplexity is told apart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]  # nothing but what was asked for


def test_the_plain_runner_cannot_run_a_kv_cache_file(exports, rng):
    """Why the runner is chosen by metadata: a KV-cache file fed input_ids alone (what validate did) fails, and
    runner_for's runner gives the plain file's logits."""
    from alibi_export.runtime import runner_for
    from alibi_export.runtime.onnxruntime import OrtRunner

    ids = rng.integers(0, 300, size=(1, 20), dtype=np.int64)
    with OrtRunner(exports["kv-cache"]) as plain, pytest.raises(Exception, match="attention_mask|past_key_values"):
        plain.infer({"input_ids": ids})
    with runner_for(exports["kv-cache"], steps=4) as kv, runner_for(exports["dynamic"]) as dyn:
        np.testing.assert_allclose(kv.infer({"input_ids": ids})["logits"], dyn.infer({"input_ids": ids})["logits"],
                                   atol=1e-3, rtol=1e-3)


def test_validate_finds_the_checkpoint_beside_a_genai_folder(exports, tiny_dir, tmp_path, seed):
    """A genai folder is the artifact: its source checkpoint is looked for beside the folder, not inside it."""
    shutil.copytree(exports["genai"], tmp_path / "g")
    alone = _invoke("validate", tmp_path / "g", "--lengths", "1x")
    assert alone.exit_code == 1 and "pass the checkpoint folder as MODEL" in alone.output  # control: not beside it
    shutil.copytree(tiny_dir, tmp_path / tiny_dir.name)
    found = _invoke("validate", tmp_path / "g", "--lengths", "1x", "--seed", seed)
    assert found.exit_code == 0 and "parity PASS" in found.output, found.output
