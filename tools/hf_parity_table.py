"""Print the README's Hugging Face parity numbers: every tiny model of tests/test_hf_models.py, exported
(decomposed fp32 and fp16), against transformers' forward at 1x and 16x the model's length.

    PYTHONPATH=$PWD python tools/hf_parity_table.py

Columns: variant | fp32 rel err at 1x | at 16x | fp16 argmax agreement at 16x | min cosine | fp16 rel err.
rel err = max |dlogit| / max |logit|. Needs transformers (the reference); CPU only, about a minute.
"""
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from alibi_export.data import train_tokenizer  # noqa: E402
from alibi_export.runtime.onnxruntime import create_session  # noqa: E402
from tests.conftest import EXCERPT  # noqa: E402
from tests.test_hf_models import LEN, VARIANTS, HfModel, _ids, _rel  # noqa: E402


def main():
    root = pathlib.Path(tempfile.mkdtemp())
    (root / "corpus.txt").write_text(EXCERPT.read_text()[:20000])
    tokenizer = train_tokenizer([root / "corpus.txt"], 300)  # as the tests' tiny tokenizer
    for variant in VARIANTS:
        m = HfModel(variant, root, tokenizer)
        session = create_session(m.export())
        row = [variant]
        for seed, length in ((1, LEN), (2, 16 * LEN)):  # the seeds of the parity test
            ids = _ids(seed, (2, length))
            row.append(f"{_rel(session.run(None, {'input_ids': ids})[0], m.logits(ids)):.1e}")
        ids = _ids(6, (1, 16 * LEN))  # the fp16 test's seed
        got = create_session(m.export("fp16", dtype="float16")).run(None, {"input_ids": ids})[0].astype(np.float32)
        ref = m.logits(ids)
        cosine = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        row += [f"{(got.argmax(-1) == ref.argmax(-1)).mean():.4f}", f"{cosine.min():.5f}", f"{_rel(got, ref):.1e}"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
