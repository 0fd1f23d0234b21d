"""onnxruntime-genai folders: og.Model loads them and its greedy tokens are GenerationSession's."""
import json
import shutil

import numpy as np
import pytest

from alibi_export.errors import ExportError
from alibi_export.export.genai import GENAI_FILES, export_genai
from alibi_export.runtime.generate import GenerationSession

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["It was a dark and stormy night, and", "The old"]  # different lengths: genai right-pads the batch
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def trained(shipped):
    """The shipped model: a trained one, whose greedy text depends on its context (a random tiny model's
    repeats one token whatever it attends, so it could not show whether genai's padding is masked)."""
    return shipped


FORMS = {"fp32": ("decomposed", None), "int4": ("decomposed", "int4"), "onnx-form-fp32": ("onnx", None)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, trained):
    """Each form's folder, exported once on first use."""
    built = {}

    def get(kind):
        if kind not in built:
            attention, quantize = FORMS[kind]
            built[kind] = tmp_path_factory.mktemp("genai") / f"shipped-{kind}"
            export_genai(trained, built[kind], kv_cache=True, dynamic_len=True, attention=attention, quantize=quantize)
        return built[kind]

    return get


@pytest.fixture(params=list(FORMS))
def folder(request, folders):
    return folders(request.param)


def genai_greedy(folder, prompts: list[str], new_tokens: int) -> tuple[np.ndarray, list[list[int]]]:
    """onnxruntime-genai's own batch (its tokenizer pads each prompt on the right with pad_token_id; its mask
    masks that padding and keeps the hole as generation goes on) and its greedy ids after each prompt."""
    model = og.Model(str(folder))
    batch = og.Tokenizer(model).encode_batch(prompts)
    padded = batch.as_numpy()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=padded.shape[1] + new_tokens, batch_size=len(prompts), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    out = [[] for _ in prompts]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(out, generator.get_next_tokens()):
            row.append(int(token))
    return padded, out


def greedy_attending_padding(path, padded: np.ndarray, lengths: list[int], new_tokens: int) -> list[list[int]]:
    """Negative control: genai's right-padded batch through our decoder with an all-ones mask (the padding
    attended as if it were text); each row's first token from its last real position, as genai reads it."""
    session = GenerationSession(path)
    mask = np.ones_like(padded, dtype=np.int64)
    logits, cache = session.step(padded.astype(np.int64), mask, session.new_cache(len(padded)))
    nxt = np.array([logits[i, n - 1].argmax() for i, n in enumerate(lengths)])
    out = [nxt]
    for _ in range(new_tokens - 1):
        mask = np.concatenate([mask, np.ones((len(padded), 1), np.int64)], 1)
        logits, cache = session.step(nxt[:, None], mask, cache)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
    return np.stack(out, 1).tolist()


def check_genai_batch(folder, prompts: list[str], ours: list[list[int]], rows: list[list[int]]):
    """genai's greedy ids equal ``ours`` (GenerationSession's for ``rows``, our tokenizer's ids of ``prompts``);
    for a batch of different lengths, genai padded on the right and attending that padding changes the ids."""
    padded, theirs = genai_greedy(folder, prompts, NEW_TOKENS)
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    for row, got in zip(rows, padded.tolist()):
        assert got == row + [pad] * (padded.shape[1] - len(row))  # genai's ids are ours, padded on the right
    assert theirs == ours, f"{folder.name}: genai {theirs} != GenerationSession {ours}"
    if len(rows) > 1:
        unmasked = greedy_attending_padding(folder / "model.onnx", padded, [len(r) for r in rows], NEW_TOKENS)
        assert unmasked != ours, "negative control: these prompts do not show whether the padding is masked"


@pytest.mark.parametrize("batch", [1, 2])
def test_genai_greedy_equals_generation_session(folder, trained, batch):
    rows = [trained.tokenizer.encode(p).ids for p in PROMPTS[:batch]]
    assert len({len(r) for r in rows}) == batch  # the batch of 2 really has two lengths
    ours = GenerationSession(folder / "model.onnx").generate_ids(rows, NEW_TOKENS, stop_tokens=[]).token_ids
    check_genai_batch(folder, PROMPTS[:batch], ours, rows)


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


def test_negative_controls_gpt2_type_and_shared_buffer_fail(tmp_path, trained, folders):
    """Why the config says "decoder" and past_present_share_buffer false: the alternatives fail."""
    out = folders("fp32")
    gpt2 = _edit_config(out, tmp_path / "a", lambda c: c["model"].update(type="gpt2"))
    with pytest.raises(RuntimeError, match="Model input was not found"):  # gpt2: one combined past_%d per layer
        genai_greedy(gpt2, PROMPTS[:1], 2)
    shared = _edit_config(out, tmp_path / "b", lambda c: c["search"].update(past_present_share_buffer=True))
    with pytest.raises(RuntimeError, match="present.0.key"):  # a fixed max_length buffer; our present grows
        genai_greedy(shared, PROMPTS[:1], 2)


def test_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path, trained, folders):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not written by alibi-export"):
        export_genai(trained, user, kv_cache=True, dynamic_len=True)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]  # untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(ExportError, match="symbolic link"):  # even to an empty folder: the link is not ours
        export_genai(trained, tmp_path / "link", kv_cache=True, dynamic_len=True)
    assert (tmp_path / "link").is_symlink() and not any(empty.iterdir())
    (tmp_path / "link").unlink()
    empty.rmdir()
    ours = tmp_path / "ours"
    shutil.copytree(folders("fp32"), ours)
    export_genai(trained, ours, kv_cache=True, dynamic_len=True, quantize="int4")  # replaced whole
    assert "MatMulNBits" in (ours / "model.onnx").read_bytes().decode("latin-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "user"]  # no temp folder left behind
    with pytest.raises(ExportError, match="--kv-cache"):
        export_genai(trained, tmp_path / "nokv", dynamic_len=True)
    assert not (tmp_path / "nokv").exists()
