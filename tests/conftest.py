"""Shared fixtures: the shipped model, a tiny random model, their ONNX exports (built once), and seeds.

Every random draw in a test comes from the ``seed`` fixture (``rng`` for NumPy, ``torch_rng`` for
PyTorch). The seed is derived from the test's id, so a run is reproducible and each test draws its own
numbers; ``ALIBI_TEST_SEED=N`` gives every test the seed N, and ``ALIBI_TEST_SEED=random`` a fresh one
per test (to hunt for flakes). A failing test prints its seed and the command that replays it.
"""
from __future__ import annotations

import os
import secrets
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from alibi_export import ModelConfig, AlibiLM, load, save
from alibi_export.data import train_tokenizer
from alibi_export.shipped import default_model, default_text, shipped_model

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = default_model()
SHIPPED_SINUSOIDAL = shipped_model("sinusoidal-small")
EXCERPT = default_text()
SEED_ENV = "ALIBI_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def test_seed(nodeid: str) -> int:
    """The seed of the test ``nodeid``: ALIBI_TEST_SEED if set, else a stable hash of the id."""
    chosen = os.environ.get(SEED_ENV, "").strip()
    if chosen == "random":
        return secrets.randbelow(2**32)
    if chosen:
        return int(chosen)
    return zlib.crc32(nodeid.encode())


test_seed.__test__ = False  # a helper, not a test, despite its name


@pytest.fixture
def seed(request) -> int:
    value = test_seed(request.node.nodeid)
    request.node.stash[_SEED_KEY] = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def torch_rng(seed) -> torch.Generator:
    """A CPU generator: pass it as ``generator=`` and move the tensor, so CPU and CUDA draw the same numbers."""
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, print the test's seed and how to replay it (in the report's 'random seed' section)."""
    outcome = yield
    report = outcome.get_result()
    value = item.stash.get(_SEED_KEY, None)
    if value is not None and report.failed:
        report.sections.append(("random seed", f"seed {value}; replay with {SEED_ENV}={value} "
                                               f"python -m pytest {item.nodeid!r}"))


def pytest_runtest_setup(item):
    """``gpu`` tests skip at once where torch sees no CUDA GPU (CI), before any fixture is built;
    tools/run_gpu_tests.sh runs them on a GPU machine, where a skip fails the run."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("gpu test: needs a CUDA GPU (run tools/run_gpu_tests.sh on a GPU machine)")


def losing_first_prompt_tokens(engine):
    """A broken variant of a serving engine with prefill in the decode steps (the tests' control): each request that
    joins is fed its prompt from the second token, as a join one column off would be."""
    join = engine._join_unfed

    def join_one_off():
        before = list(engine.running)
        join()
        for r in engine.running:
            if r not in before and len(r.pending) > 1:
                r.pending.pop(0)
    engine._join_unfed = join_one_off
    return engine


@pytest.fixture(scope="session")
def shipped():
    return load(SHIPPED)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    text = tmp_path_factory.mktemp("corpus") / "train.txt"
    text.write_text(EXCERPT.read_text()[:20000])
    return train_tokenizer([text], 300)


def make_tiny(tmp_path: Path, tokenizer, **overrides) -> Path:
    """A tiny random model as a checkpoint folder (6 heads: not a power of two)."""
    cfg = ModelConfig(**{**dict(vocab_size=300, n_layer=2, n_head=6, d_model=48, d_ff=96, train_len=32,
                                max_positions=32), **overrides})
    with torch.random.fork_rng(devices=[]):  # fixed weights, and the global generator left as it was
        torch.manual_seed(0)
        model = AlibiLM(cfg)
    with torch.no_grad():  # random init gives near-zero logits; widen them so parity checks mean something
        model.wte.weight.mul_(20)
    save(model, tokenizer, tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return make_tiny(tmp_path_factory.mktemp("tiny"), tiny_tokenizer)


@pytest.fixture(scope="session")
def shipped_onnx(tmp_path_factory, shipped):
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("onnx") / "alibi-small.onnx").path


@pytest.fixture(scope="session")
def shipped_onnx_fp16(tmp_path_factory, shipped):
    from alibi_export.export.onnx import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("onnx16") / "alibi-small-fp16.onnx", dtype="float16").path


@pytest.fixture(scope="session")
def tiny_kv_export(tmp_path_factory, tiny_dir):
    """The tiny model as a KV-cache decoder (an ExportResult): the artifact tests and the bad-input table share it."""
    from alibi_export.export.onnx import export_onnx

    return export_onnx(load(tiny_dir), tmp_path_factory.mktemp("tiny-kv") / "tiny.onnx", kv_cache=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small training corpus (train.txt, valid.txt) cut from the shipped excerpt, for the training tests."""
    d = tmp_path_factory.mktemp("corpus")
    text = EXCERPT.read_text()
    (d / "train.txt").write_text(text[:60000])
    (d / "valid.txt").write_text(text[60000:70000])
    return d
