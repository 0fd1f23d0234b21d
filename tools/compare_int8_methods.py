"""--quantize int8 vs static QDQ, on the shipped model's plain export. (--quantize int8 was quantize_dynamic
until issue 19 and is 8-bit MatMulNBits since; tools/compare_int8_recipes.py compares those recipes.)

Static QDQ is calibrated on 8 windows of 256 tokens from the excerpt's tail (not among the first 16k tokens
that the perplexity is measured on). Prints perplexity at 1x, 4x, 16x the training length, then forward
ms at 256 and 1024 tokens with the three sessions interleaved in one process (median of 7), so that a
shared machine's load falls on all three alike.

usage: python tools/compare_int8_methods.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from alibi_export import load
    from alibi_export.data import encode_text, read_text
    from alibi_export.export.onnx import export_onnx
    from alibi_export.export.quantize import _untie_lm_head
    from alibi_export.perplexity import perplexity
    from alibi_export.runtime import make_runner

    from alibi_export.shipped import default_model, default_text

    ck = load(default_model())
    tokens = encode_text(ck.tokenizer, read_text(default_text()))
    evaluated, calib = tokens[: 4 * 4096 + 1], tokens[-8 * 256:]
    tmp = Path(tempfile.mkdtemp())
    paths = {"fp32": tmp / "fp32.onnx", "int8": tmp / "int8.onnx", "qdq": tmp / "qdq.onnx"}
    export_onnx(ck, paths["fp32"])
    export_onnx(ck, paths["int8"], quantize="int8")
    proto = onnx.load(str(paths["fp32"]))
    _untie_lm_head(proto)  # as --quantize does, so that both quantize the same products
    onnx.save(proto, str(tmp / "untied.onnx"))

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_ids": calib[None, i * 256:(i + 1) * 256].astype(np.int64)} for i in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp / "untied.onnx"), str(paths["qdq"]), Calibration(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    for name, path in paths.items():
        rows = perplexity(make_runner(path), evaluated, [256, 1024, 4096])
        print(f"ppl {name:>8}: " + " / ".join(f"{r.ppl:.3f}" for r in rows), flush=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    for length in (256, 1024):
        ids = evaluated[None, :length].astype(np.int64)
        times = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {"input_ids": ids})
        for _ in range(7):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"input_ids": ids})
                times[k].append(time.perf_counter() - t)
        print(f"forward ms at {length}: " + ", ".join(f"{k} {1e3 * np.median(v):.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
