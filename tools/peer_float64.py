"""Who is off at 16x in the peer table: each export and transformers' fp32 forward against float64.

The peer table (tools/peer_optimum.py) compares fp32 with fp32. This prints, for the same tiny models
(its configs, seed and token ids) at 16x = 2048 tokens, each one's max |dlogit| / max |logit| against
the float64 truth: the same transformers model in ``.double()`` with its float32 softmax casts undone
(tests/test_hf_models.py's ``_float64_softmax``). Columns: transformers fp32; this project's default
(decomposed) ONNX export in ONNX Runtime, fp32; this project's PyTorch model (AlibiLM) fp32; the export
against transformers fp32 (the peer table's number); as checks of the truth itself, our PyTorch model in
float64 under the same context, and transformers' ``.double()`` with its casts kept. Falcon runs transformers'
SDPA path (its eager one adds the ALiBi bias twice), which has no float32 cast.

    PYTHONPATH=$PWD python tools/peer_float64.py        # about a minute, CPU, this project's environment
"""
import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402

from alibi_export import load  # noqa: E402
from alibi_export.export.onnx import export_onnx  # noqa: E402
from alibi_export.runtime.onnxruntime import create_session  # noqa: E402
from tests.test_hf_models import _float64_softmax, _rel  # noqa: E402
from tools.peer_optimum import LENGTH, MULTIPLES, SEED, VOCAB, _tokenizer, tiny_configs  # noqa: E402


def row(arch: str, kwargs: dict, folder: pathlib.Path, ids: np.ndarray) -> str:
    config = transformers.AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(SEED)  # as tools/peer_optimum.py builds it
    extra = {"attn_implementation": "sdpa"} if arch == "falcon" else {}
    hf = transformers.AutoModelForCausalLM.from_config(config, **extra).eval()
    hf.save_pretrained(folder)
    _tokenizer().save(str(folder / "tokenizer.json"))
    if arch == "mpt":  # its reference past max_seq_len, as in the peer table (ALiBi's slopes do not read it)
        hf.config.max_seq_len = ids.shape[1]
    x = torch.from_numpy(ids)
    ours = load(folder).model.eval()
    with torch.no_grad():
        hf32, pt32 = hf(x).logits.numpy(), ours(x).numpy()
        hf64_cast = hf.double()(x).logits.numpy()  # transformers' .double() as it is: its casts kept
        with _float64_softmax():
            truth, pt64 = hf.double()(x).logits.numpy(), ours.double()(x).numpy()
    ort = create_session(export_onnx(load(folder), folder.with_suffix(".onnx")).path).run(None, {"input_ids": ids})[0]
    return (f"| {arch} | {_rel(hf32, truth):.1e} | {_rel(ort, truth):.1e} | {_rel(pt32, truth):.1e} | "
            f"{_rel(ort, hf32):.1e} | {_rel(pt64, truth):.1e} | {_rel(hf64_cast, truth):.1e} |")


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="peer-f64-"))
    rng = np.random.default_rng(SEED)
    print(f"transformers {transformers.__version__}; {max(MULTIPLES) * LENGTH} tokens; error vs float64")
    print("| architecture | transformers fp32 | ours ORT fp32 (default) | ours PyTorch fp32 | ours ORT vs "
          "transformers fp32 | ours PyTorch float64 | transformers .double() as is |\n"
          "|---|---|---|---|---|---|---|")
    for arch, kwargs in tiny_configs().items():
        ids = {m: rng.integers(0, VOCAB, (1, m * LENGTH), dtype=np.int64) for m in MULTIPLES}  # peer's draws
        print(row(arch, kwargs, work / arch, ids[max(MULTIPLES)]), flush=True)


if __name__ == "__main__":
    main()
