"""--quantize int8 vs static QDQ, on the shipped model's plain export. (--quantize int8 was quantize_dynamic
until issue 19 and is 8-bit MatMulNBits since; tools/compare_int8_recipes.py compares those recipes.)

Static QDQ is calibrated on 8 windows of 256 tokens from the excerpt's tail (not among the first 16k tokens
that the perplexity is measured on). Prints perplexity at 1x, 4x, 16x the training length, then forward
ms at 256 and 1024 tokens with the three sessions interleaved in one process (median of 7), so that a
shared machine's load falls on all three alike.

usage: python tools/compare_int8_methods.py [--ppl-lengths 256,1024,4096] [--forward-lengths 256,1024]
                                            [--repeats 7] [--json F]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from harness import time_peers, write_record


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ppl-lengths", default="256,1024,4096", help="Perplexity evaluation lengths.")
    ap.add_argument("--forward-lengths", default="256,1024", help="Forward timing lengths (batch 1).")
    ap.add_argument("--repeats", type=int, default=7, help="Interleaved timings per session (median).")
    ap.add_argument("--json", help="Write the harness record here.")
    args = ap.parse_args()
    ppl_lengths = [int(x) for x in args.ppl_lengths.split(",")]
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
    results = {"ppl": {}, "forward_ms": {}}
    for name, path in paths.items():
        rows = perplexity(make_runner(path), evaluated, ppl_lengths)
        results["ppl"][name] = {n: r.ppl for n, r in zip(ppl_lengths, rows)}
        print(f"ppl {name:>8}: " + " / ".join(f"{r.ppl:.3f}" for r in rows), flush=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    for length in (int(x) for x in args.forward_lengths.split(",")):
        feeds = {"input_ids": evaluated[None, :length].astype(np.int64)}
        times = time_peers({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, warmup=1,
                           repeats=args.repeats)
        results["forward_ms"][length] = {k: v.ms for k, v in times.items()}
        print(f"forward ms at {length}: " + ", ".join(f"{k} {v.ms:.1f}" for k, v in times.items()))
    if args.json:
        write_record(args.json, results)


if __name__ == "__main__":
    main()
