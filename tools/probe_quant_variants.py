"""Two probes behind the int8 choices in docs/llamacpp.md and BENCHMARKS.md (issue 23 section 3), kept so that
their numbers can be re-made:

- ``rounding F32.onnx``: the RMS error per weight of the 8-bit blocks of 32 as ONNX Runtime's quantizer rounds
  them (scale max|w| / 128 with the largest magnitude's sign, codes -128..127) and as llama.cpp's q8_0 does
  (max|w| / 127, -127..127), emulated in numpy over the file's largest weight matrices.
- ``accuracy-level QUANTIZED.onnx LEVEL OUT.onnx``: a copy of a MatMulNBits file with every node's
  ``accuracy_level`` set to LEVEL (0: float products), to time against the original with
  ``tools/bench_llamacpp.py --stage child --engine ours --file OUT.onnx --task time``.

Usage (repo root): python tools/probe_quant_variants.py rounding F32.onnx [--matrices 12]
                   python tools/probe_quant_variants.py accuracy-level IN.onnx 0 OUT.onnx
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def rounding_rms(path: str, matrices: int) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2]
    weights = sorted(weights, key=lambda w: -w.size)[:matrices]
    sums, count = {"onnxruntime": 0.0, "q8_0": 0.0}, 0
    for w in weights:
        blocks = w.T.reshape(w.shape[1], -1, 32).astype(np.float64)  # blocks of 32 along K, as MatMulNBits
        signed = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        step = signed / -128.0
        tool = np.clip(np.rint(blocks / np.where(step == 0, 1, step)), -128, 127) * step
        step = np.abs(blocks).max(-1, keepdims=True) / 127.0
        q8 = np.clip(np.rint(blocks / np.where(step == 0, 1, step)), -127, 127) * step
        sums["onnxruntime"] += float(((tool - blocks) ** 2).sum())
        sums["q8_0"] += float(((q8 - blocks) ** 2).sum())
        count += blocks.size
    return {k: (v / count) ** 0.5 for k, v in sums.items()} | {"matrices": len(weights), "weights": count}


def set_accuracy_level(src: str, level: int, dst: str) -> int:
    import onnx

    model = onnx.load(src)
    changed = 0
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "MatMulNBits" else ():
            if attr.name == "accuracy_level":
                attr.i, changed = level, changed + 1
    onnx.save(model, dst)
    return changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rounding")
    r.add_argument("onnx")
    r.add_argument("--matrices", type=int, default=12)
    a = sub.add_parser("accuracy-level")
    a.add_argument("onnx")
    a.add_argument("level", type=int)
    a.add_argument("out")
    args = ap.parse_args()
    if args.cmd == "rounding":
        print(rounding_rms(args.onnx, args.matrices))
    else:
        print(f"{set_accuracy_level(args.onnx, args.level, args.out)} MatMulNBits nodes set to level {args.level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
