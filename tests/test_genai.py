"""onnxruntime-genai folders: og.Model loads them and its greedy tokens are GenerationSession's."""
import json
import shutil

import numpy as np
import pytest

from alibi_export.checkpoint import load
from alibi_export.errors import ExportError
from alibi_export.export.genai import GENAI_FILES, export_genai
from alibi_export.runtime.generate import GenerationSession

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["It was a dark and stormy night, and", "The old"]  # different lengths: genai left-pads the batch
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir)


FORMS = {"fp32": ("decomposed", None), "int4": ("decomposed", "int4"), "onnx-form-fp32": ("onnx", None)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    """Each form's folder, exported once on first use."""
    built = {}

    def get(kind):
        if kind not in built:
            attention, quantize = FORMS[kind]
            built[kind] = tmp_path_factory.mktemp("genai") / f"tiny-{kind}"
            export_genai(tiny, built[kind], kv_cache=True, dynamic_len=True, attention=attention, quantize=quantize)
        return built[kind]

    return get


@pytest.fixture(params=list(FORMS))
def folder(request, folders):
    return folders(request.param)


def genai_greedy(folder, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy ids from onnxruntime-genai for token-id prompts (it left-pads them with pad_token_id)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    width = max(map(len, rows))
    params.set_search_options(max_length=width + new_tokens, batch_size=len(rows), do_sample=False)
    generator = og.Generator(model, params)
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    generator.append_tokens(np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int32))
    out = [[] for _ in rows]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(out, generator.get_next_tokens()):
            row.append(int(token))
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_genai_greedy_equals_generation_session(folder, tiny, batch):
    rows = [tiny.tokenizer.encode(p).ids for p in PROMPTS[:batch]]
    assert len({len(r) for r in rows}) == batch  # the batch of 2 really has two lengths
    ours = GenerationSession(folder / "model.onnx").generate_ids(rows, NEW_TOKENS, stop_tokens=[]).token_ids
    theirs = genai_greedy(folder, rows, NEW_TOKENS)
    assert theirs == ours, f"{folder.name}: genai {theirs} != GenerationSession {ours}"


def test_folder_holds_only_what_genai_reads(folder):
    assert {p.name for p in folder.iterdir()} <= set(GENAI_FILES)
    tok = og.Tokenizer(og.Model(str(folder)))
    ours = load_tokenizer_ids(folder, PROMPTS[0])
    assert list(tok.encode(PROMPTS[0])) == ours  # genai's tokenizer reads our tokenizer files the same way


def load_tokenizer_ids(folder, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def _edit_config(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "genai_config.json").read_text())
    edit(cfg)
    (copy / "genai_config.json").write_text(json.dumps(cfg))
    return copy


def test_negative_controls_gpt2_type_and_shared_buffer_fail(tmp_path, tiny, folders):
    """Why the config says "decoder" and past_present_share_buffer false: the alternatives fail."""
    out = folders("fp32")
    rows = [tiny.tokenizer.encode(PROMPTS[0]).ids]
    gpt2 = _edit_config(out, tmp_path / "a", lambda c: c["model"].update(type="gpt2"))
    with pytest.raises(RuntimeError, match="Model input was not found"):  # gpt2: one combined past_%d per layer
        genai_greedy(gpt2, rows, 2)
    shared = _edit_config(out, tmp_path / "b", lambda c: c["search"].update(past_present_share_buffer=True))
    with pytest.raises(RuntimeError, match="present.0.key"):  # a fixed max_length buffer; our present grows
        genai_greedy(shared, rows, 2)


def test_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path, tiny, folders):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not written by alibi-export"):
        export_genai(tiny, user, kv_cache=True, dynamic_len=True)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]  # untouched
    ours = tmp_path / "ours"
    shutil.copytree(folders("fp32"), ours)
    export_genai(tiny, ours, kv_cache=True, dynamic_len=True, quantize="int4")  # replaced whole
    assert "MatMulNBits" in (ours / "model.onnx").read_bytes().decode("latin-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "user"]  # no temp folder left behind
    with pytest.raises(ExportError, match="--kv-cache"):
        export_genai(tiny, tmp_path / "nokv", dynamic_len=True)
    assert not (tmp_path / "nokv").exists()
