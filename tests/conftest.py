"""Shared fixtures: the shipped model, a tiny random model, and their ONNX exports (built once)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alibi_export import ModelConfig, AlibiLM, load, save
from alibi_export.data import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "alibi-small"
SHIPPED_SINUSOIDAL = ROOT / "models" / "sinusoidal-small"
EXCERPT = ROOT / "data" / "books-test-excerpt.txt"


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
