"""Probe: can ONNX Runtime update a KV cache in place, and what does one decode step cost that way?

One decode step of attention over NL layers (each with its own cache), three graphs:
- concat: today's --kv-cache form, present = Concat(past, new), K transposed over the whole cache, MatMul,
  ALiBi bias Add, Softmax, MatMul;
- attention24: a preallocated (B, H, Lmax, D) buffer updated by TensorScatter (opset 24) and read by the
  opset-24 Attention op with a float ALiBi mask and nonpad_kv_seqlen;
- gqa: ONNX Runtime's contrib GroupQueryAttention with past and present sharing the buffer
  (past_present_share_buffer, as onnxruntime-genai uses it) and the ALiBi bias as its attention_bias.
The buffers are bound through IO binding as the same OrtValue for the past input and the present output.
Each graph's output is checked against a numpy reference, and whether the present output is the input buffer.

    python tools/probe_kv_buffer.py                          # CPU, fp32
    python tools/probe_kv_buffer.py --provider cuda --dtype float16   # the GPU (onnxruntime-gpu)

Prints one line per (batch, context): median ms per step of each graph (interleaved), max abs error against
float64 numpy, and whether each buffer graph updated in place.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, D = 16, 64


def _vi(name, shape, t):
    return helper.make_tensor_value_info(name, t, shape)


def _model(nodes, inputs, outputs):
    ops = [helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(helper.make_graph(nodes, "probe", inputs, outputs), opset_imports=ops, ir_version=10)


def concat_graph(n_layer, t):
    n = helper.make_node
    ins, nodes, outs = [_vi("q", ["B", H, 1, D], t), _vi("bias", ["B", H, 1, "T"], t)], [], []
    for i in range(n_layer):
        ins += [_vi(f"pk{i}", ["B", H, "P", D], t), _vi(f"pv{i}", ["B", H, "P", D], t)]
        nodes += [n("Concat", [f"pk{i}", "q"], [f"k{i}"], axis=2), n("Concat", [f"pv{i}", "q"], [f"v{i}"], axis=2),
                  n("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]), n("MatMul", ["q", f"kt{i}"], [f"s{i}"]),
                  n("Mul", [f"s{i}", "scale"], [f"ss{i}"]), n("Add", [f"ss{i}", "bias"], [f"sb{i}"]),
                  n("Softmax", [f"sb{i}"], [f"p{i}"], axis=-1), n("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"])]
        outs += [_vi(f"o{i}", None, t), _vi(f"k{i}", None, t), _vi(f"v{i}", None, t)]
    nodes.insert(0, n("Constant", [], ["scale"], value=helper.make_tensor("scale", t, [], [D ** -0.5])))
    return _model(nodes, ins, outs)


def attention24_graph(n_layer, t):
    n = helper.make_node
    ins = [_vi("q", ["B", H, 1, D], t), _vi("bias", ["B", H, 1, "M"], t), _vi("w", ["B"], TensorProto.INT64),
           _vi("nonpad", ["B"], TensorProto.INT64)]
    nodes, outs = [], []
    for i in range(n_layer):
        ins += [_vi(f"pk{i}", ["B", H, "M", D], t), _vi(f"pv{i}", ["B", H, "M", D], t)]
        nodes += [n("TensorScatter", [f"pk{i}", "q", "w"], [f"k{i}"]), n("TensorScatter", [f"pv{i}", "q", "w"], [f"v{i}"]),
                  n("Attention", ["q", f"k{i}", f"v{i}", "bias", "", "", "nonpad"], [f"o{i}"])]
        outs += [_vi(f"o{i}", None, t), _vi(f"k{i}", None, t), _vi(f"v{i}", None, t)]
    return _model(nodes, ins, outs)


def gqa_graph(n_layer, t):
    n = helper.make_node
    ins = [_vi("q", ["B", 1, H * D], t), _vi("bias", ["B", H, 1, "T"], t), _vi("seqlens_k", ["B"], TensorProto.INT32),
           _vi("total", [], TensorProto.INT32)]
    nodes, outs = [], []
    for i in range(n_layer):
        ins += [_vi(f"pk{i}", ["B", H, "M", D], t), _vi(f"pv{i}", ["B", H, "M", D], t)]
        nodes.append(n("GroupQueryAttention", ["q", "q", "q", f"pk{i}", f"pv{i}", "seqlens_k", "total", "", "", "", "bias"],
                       [f"o{i}", f"k{i}", f"v{i}"], domain="com.microsoft", num_heads=H, kv_num_heads=H))
        outs += [_vi(f"o{i}", None, t), _vi(f"k{i}", None, t), _vi(f"v{i}", None, t)]
    return _model(nodes, ins, outs)


def reference(q, k, v, bias):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5 + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)



def _run_in_place(session, feeds: dict, layers: int, bufs: list):
    """One step with each layer's K/V buffer bound as both its past input and its present output."""
    b = session.io_binding()
    for name, value in feeds.items():
        b.bind_cpu_input(name, value)
    for i in range(layers):
        b.bind_output(f"o{i}", "cpu")  # small; read on the host
        for j, kv in enumerate("kv"):
            b.bind_ortvalue_input(f"p{kv}{i}", bufs[2 * i + j])
            b.bind_ortvalue_output(f"{kv}{i}", bufs[2 * i + j])
    session.run_with_iobinding(b)
    return b.get_outputs()

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--lmax", type=int, default=2048, help="the attention24 graph's buffer length")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graphs", default="concat,attention24,gqa")
    a = ap.parse_args()
    t = TensorProto.FLOAT if a.dtype == "float32" else TensorProto.FLOAT16
    np_t = np.float32 if a.dtype == "float32" else np.float16
    dev = a.provider
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev == "cuda" else ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = a.threads, 3
    build = {"concat": concat_graph, "attention24": attention24_graph, "gqa": gqa_graph}
    sessions = {}
    for g in a.graphs.split(","):
        try:
            sessions[g] = ort.InferenceSession(build[g](a.layers, t).SerializeToString(), so, providers=providers)
        except Exception as e:  # e.g. an op the provider lacks
            print(f"{g}: session failed: {str(e).splitlines()[0][:200]}")
    print(f"onnxruntime {ort.__version__}, {dev}, {a.dtype}, {a.layers} layers, H={H} D={D}, {a.threads} threads")
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    rng = np.random.default_rng(0)
    for B in map(int, a.batches.split(",")):
        for P in map(int, a.contexts.split(",")):
            q = rng.standard_normal((B, H, 1, D)).astype(np_t)
            past = [rng.standard_normal((B, H, P, D)).astype(np_t) for _ in range(2 * a.layers)]
            bias = np.broadcast_to(slopes[None, :, None, None] * (np.arange(P + 1) - P), (B, H, 1, P + 1)).astype(np_t)
            bias = np.ascontiguousarray(bias)
            ref = reference(q.astype(np.float64), np.concatenate([past[0], q], 2).astype(np.float64),
                            np.concatenate([past[1], q], 2).astype(np.float64), bias.astype(np.float64))

            def buffers(length):
                out = []
                for p in past:
                    full = np.zeros((B, H, length, D), np_t)
                    full[:, :, :P] = p
                    out.append(ort.OrtValue.ortvalue_from_numpy(full, dev))
                return out

            runs, bufs = {}, {}
            if "concat" in sessions:
                past_ov = [ort.OrtValue.ortvalue_from_numpy(p, dev) for p in past]

                def run_concat(s=sessions["concat"]):
                    b = s.io_binding()
                    b.bind_cpu_input("q", q)
                    b.bind_cpu_input("bias", bias)
                    for i in range(a.layers):
                        b.bind_ortvalue_input(f"pk{i}", past_ov[2 * i])
                        b.bind_ortvalue_input(f"pv{i}", past_ov[2 * i + 1])
                    for o in s.get_outputs():
                        b.bind_output(o.name, "cpu" if o.name.startswith("o") else dev)
                    s.run_with_iobinding(b)
                    return b.get_outputs()
                runs["concat"] = run_concat
            if "attention24" in sessions:
                bufs["attention24"] = bufs24 = buffers(a.lmax)
                bias24 = np.full((B, H, 1, a.lmax), np.finfo(np_t).min, np_t)
                bias24[..., :P + 1] = bias

                feeds24 = {"q": q, "bias": bias24, "w": np.full(B, P, np.int64), "nonpad": np.full(B, P + 1, np.int64)}
                runs["attention24"] = lambda: _run_in_place(sessions["attention24"], feeds24, a.layers, bufs24)
            if "gqa" in sessions:
                bufs["gqa"] = bufs_g = buffers(P + 1 + 64)  # room for the step (and a few more)
                q3 = np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(B, 1, H * D))

                feeds_g = {"q": q3, "bias": bias, "seqlens_k": np.full(B, P, np.int32),
                           "total": np.array(P + 1, np.int32)}
                runs["gqa"] = lambda: _run_in_place(sessions["gqa"], feeds_g, a.layers, bufs_g)
            notes = {}
            for g, run in runs.items():
                try:
                    outs = run()
                except Exception as e:
                    notes[g] = f"failed: {str(e).splitlines()[0][:160]}"
                    continue
                o = outs[0].numpy().astype(np.float64).reshape(B, 1, H, D).transpose(0, 2, 1, 3) if g == "gqa" \
                    else outs[0].numpy().astype(np.float64)
                err = float(np.abs(o - ref).max())
                inplace = "" if g == "concat" else f" inplace={outs[1].data_ptr() == bufs[g][0].data_ptr()}"
                notes[g] = f"err={err:.1e}{inplace}"
            live = {g: r for g, r in runs.items() if not notes[g].startswith("failed")}
            times = {g: [] for g in live}
            for _ in range(a.repeats):  # interleaved: load falls on every graph alike
                for g, run in live.items():
                    t0 = time.perf_counter()
                    run()
                    times[g].append(time.perf_counter() - t0)
            cells = [f"{g} {1e3 * np.median(times[g]):.2f} ms ({notes[g]})" if g in times else f"{g} {notes[g]}"
                     for g in runs]
            print(f"B={B} context={P}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
