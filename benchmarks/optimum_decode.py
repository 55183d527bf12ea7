"""Decode tokens/s of optimum's ONNX export of the full model on ONNX Runtime (CPU), for
benchmarks/ort_decode.py. Runs in its own environment (optimum-onnx needs transformers < 4.58):

    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 "transformers==4.57.*" \\
        optimum-onnx onnxruntime onnx gguf accelerate
    # HF dir from the GGUF (transformers' GGUF loader), then optimum's exporter:
    /tmp/optvenv/bin/optimum-cli export onnx --model HF_DIR --task text-generation-with-past OPT_DIR
    /tmp/optvenv/bin/python benchmarks/optimum_decode.py --model OPT_DIR --ids ids.json --steps 64

Prints one JSON object: tokens/s = G / (t[last] − t[first]) over G greedy tokens after the
prompt (document + question, the token ids given), median of --repeats runs after a warm-up.
"""

import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="JSON list of prompt token ids")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    model = ORTModelForCausalLM.from_pretrained(a.model, provider="CPUExecutionProvider", session_options=so)
    ids = torch.tensor([json.load(open(a.ids))])

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t, self.first = [], True

        def put(self, value):
            if self.first:  # the prompt itself
                self.first = False
                return
            self.t.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    for r in range(a.repeats + 1):
        st = Stamps()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.steps + 1, min_new_tokens=a.steps + 1,
                       do_sample=False, streamer=st)
        if r:
            runs.append({"prefill_s": st.t[0] - t0, "tokens_per_s": a.steps / (st.t[-1] - st.t[0]),
                         "ms_per_token_median": 1000 * statistics.median(b - c for b, c in zip(st.t[1:], st.t[:-1]))})
    print(json.dumps({"engine": f"optimum ONNX export, full model (onnxruntime {ort.__version__})",
                      "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                      "ms_per_token_median": statistics.median(x["ms_per_token_median"] for x in runs),
                      "prefill_s": statistics.median(x["prefill_s"] for x in runs), "runs": runs}))


if __name__ == "__main__":
    main()
