# onnxruntime speed of graphs written by `itera export --format onnx --out DIR`, single stream, as
# `itera bench` measures ours (docs/interop.md). usage: python ort_speed.py DIR [THREADS]
# decode = step.onnx one token at a time, states fed back (best of 3 x 300 steps);
# prefill = prefill.onnx over 1 x 512 and 16 x 128 random tokens (best of 3).
import json, sys, time
import numpy as np, onnxruntime as ort
d = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
cfg = json.load(open(f"{d}/config.json"))
v = cfg["model"]["vocab_size"]
so = ort.SessionOptions(); so.intra_op_num_threads = threads
def zeros(b): return {s["input"]: np.zeros([b] + [int(x) for x in s["shape"][1:]], np.float32) for s in cfg["state"]}
step = ort.InferenceSession(f"{d}/step.onnx", so)
names = [o.name for o in step.get_outputs()]
rng = np.random.default_rng(0)
toks = rng.integers(0, v, 2048)
def decode(n):
    st = zeros(1); t0 = time.perf_counter()
    for i in range(n):
        out = step.run(None, {"token": toks[i:i+1].astype(np.int64), **st})
        st = {s["input"]: out[names.index(s["output"])] for s in cfg["state"]}
    return n / (time.perf_counter() - t0)
decode(20)
dec = max(decode(300) for _ in range(3))
pre = ort.InferenceSession(f"{d}/prefill.onnx", so)
def prefill(b, t):
    x = toks[: b * t].astype(np.int64).reshape(b, t)
    pre.run(["logits"], {"tokens": x, **zeros(b)})
    best = 0
    for _ in range(3):
        t0 = time.perf_counter(); pre.run(["logits"], {"tokens": x, **zeros(b)}); best = max(best, b * t / (time.perf_counter() - t0))
    return best
print(json.dumps({"dir": d, "threads": threads, "ort": ort.__version__, "decode_tokens_per_s": dec,
                  "prefill_1x512_tokens_per_s": prefill(1, 512), "prefill_16x128_tokens_per_s": prefill(16, 128)}))
