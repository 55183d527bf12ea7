"""Decode speed on CPU after a long document: ours (TorchBackend) vs transformers' `generate`.

SmolLM2-135M-Instruct (the registry GGUF, dequantized to float32), greedy, EOS ignored.
For each document length n: the first n tokens of /work/shared/data/manuals/*.txt (concatenated,
sorted by name), then a fixed question of ~20 tokens, then 1 + G new tokens.

How each side is timed (the same interval on both sides, one timestamp per new token):
  * ours: `model.prefill_document(doc)` (timed apart), then `generate_ids` over a TorchBackend
    whose context part is that document; a timestamp at every yield. The first yield ends the
    question's prefill; the G yields after it are G decode steps.
  * transformers: `generate(doc + question, max_new_tokens=1 + G)` with a streamer that
    timestamps every `put`: the first new token ends the prefill, the G puts after it are G
    decode steps. (A same-run timestamp per token is fairer than "t(1 + G) - t(1)" over two
    runs, which mixes the noise of two prefills into the decode time; that number is still
    recorded as `tokens_per_s_by_subtraction` when --subtraction is given.)
  tokens/s = G / (t[last token] - t[first token]); ms/token = median of the G gaps.
  Every measurement is repeated --repeats times (default 3) and the median taken, after one
  warm-up of each side.

Correctness: the 1 + G greedy tokens of both sides must be identical for each n.

    python benchmarks/decode_cpu.py                      # n = 512,4096, G = 64, 2 threads
    python benchmarks/decode_cpu.py --n 512 --new-tokens 16

Writes benchmarks/results/decode_cpu.json, docs/img/decode_cpu.png and the section of
docs/benchmarks.md between `<!-- decode_cpu:begin -->` and `<!-- decode_cpu:end -->`.
Needs the export extra (torch, transformers) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MANUALS = Path("/work/shared/data/manuals")
MODEL = "smollm2-135m-instruct"
QUESTION = "\n\nQuestion: Which curl option makes it follow HTTP redirects to the new location?\nAnswer:"
BEGIN, END = "<!-- decode_cpu:begin -->", "<!-- decode_cpu:end -->"


def log(msg: str) -> None:
    print(f"[decode_cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "torch_threads": threads,
    }


class CpuContention:
    """CPU time other processes used while we ran: all busy CPU time (/proc/stat) minus our own.

    Every number here assumes the cores are ours alone; load averages lag by minutes, this does not.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        t = os.times()  # ours includes finished child processes (e.g. a benchmark subprocess)
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def result(self) -> dict | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        other = max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))
        wall = end[2] - self.start[2]
        cores = os.cpu_count() or 1
        return {"other_processes_cpu_s": round(other, 2), "wall_s": round(wall, 1),
                "other_processes_share_of_cores": round(other / (wall * cores), 4)}


def load_tokens(gguf: Path) -> tuple[list[int], list[int], str]:
    """(document token ids, question token ids, which tokenizer) from the GGUF's tokenizer."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(MANUALS.glob("*.txt")))
    try:
        from nectar_runtime.tokenizer import load_tokenizer

        tok = load_tokenizer(gguf)
        enc, which = (lambda s: tok.encode(s, add_special_tokens=False)), "nectar_runtime.tokenizer"
    except ImportError:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        enc, which = (lambda s: tok(s, add_special_tokens=False).input_ids), "transformers AutoTokenizer (gguf)"
    return enc(text), enc(QUESTION), which


# ----------------------------------------------------------------------------------------- ours


def run_ours(model, doc: list[int], question: list[int], steps: int) -> dict:
    """One full run: document prefill, question prefill, `steps` timed decode steps."""
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.generate import GenerationConfig, generate_ids

    t0 = time.perf_counter()
    cache = model.prefill_document(torch.tensor([doc], dtype=torch.long))
    t_doc = time.perf_counter()
    backend = TorchBackend(model, cache.contexts(), cache.context_len)
    gen = generate_ids(backend, [question], GenerationConfig(max_new_tokens=1 + steps), set())
    stamps, toks = [], []
    t1 = time.perf_counter()
    for tok in gen:
        stamps.append(time.perf_counter())
        toks.append(int(tok[0]))
    return {
        "doc_prefill_s": t_doc - t0,
        "question_prefill_s": stamps[0] - t1,
        "prefill_s": stamps[0] - t0,
        "stamps": stamps,
        "tokens": toks,
    }


# ------------------------------------------------------------------------------- transformers


class _Stamps:
    """A generate() streamer that only records when each new token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.stamps.append(now)
        self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def _hf_generate(hf, ids: torch.Tensor, new: int, streamer=None):
    # eos_token_id=None: no stop and no EOS suppression, i.e. plain argmax like ours with an
    # empty EOS set; min_new_tokens pins the length all the same.
    return hf.generate(
        ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
        streamer=streamer, temperature=None, top_p=None, top_k=None,
    )


def run_hf(hf, doc: list[int], question: list[int], steps: int) -> dict:
    ids = torch.tensor([doc + question], dtype=torch.long)
    st = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = _hf_generate(hf, ids, 1 + steps, st)
    t_end = time.perf_counter()
    gen = out[0, ids.shape[1] :].tolist()
    assert gen == st.tokens and len(gen) == 1 + steps, "streamer and generate() disagree"
    return {"prefill_s": st.stamps[0] - t0, "total_s": t_end - t0, "stamps": st.stamps, "tokens": gen}


def hf_subtraction(hf, doc: list[int], question: list[int], steps: int) -> dict:
    """The two-run alternative: prefill = generate(1), decode = generate(1 + G) - generate(1)."""
    ids = torch.tensor([doc + question], dtype=torch.long)
    with torch.no_grad():
        t0 = time.perf_counter()
        _hf_generate(hf, ids, 1)
        t1 = time.perf_counter()
        _hf_generate(hf, ids, 1 + steps)
        t2 = time.perf_counter()
    return {"t1": t1 - t0, "t1g": t2 - t1}


# ------------------------------------------------------------------------------------ summary


def summarize(runs: list[dict], steps: int) -> dict:
    tps, mspt, pre = [], [], []
    for r in runs:
        s = np.array(r["stamps"])
        gaps = np.diff(s)  # steps gaps: one decode step each
        assert len(gaps) == steps
        tps.append(steps / (s[-1] - s[0]))
        mspt.append(float(np.median(gaps)) * 1e3)
        pre.append(r["prefill_s"])
    out = {
        "tokens_per_s": statistics.median(tps),
        "ms_per_token": statistics.median(mspt),
        "prefill_s": statistics.median(pre),
        "runs": {"tokens_per_s": tps, "ms_per_token": mspt, "prefill_s": pre},
    }
    for extra in ("doc_prefill_s", "question_prefill_s"):
        if extra in runs[0]:
            out[extra] = statistics.median(r[extra] for r in runs)
    return out


def plot(results: dict, path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ns = sorted(int(n) for n in results)
    for impl, label, marker in (("ours", "Nectar TorchBackend", "o"), ("transformers", "transformers generate", "s")):
        ax.plot(ns, [results[str(n)][impl]["tokens_per_s"] for n in ns], marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("document length n (tokens)")
    ax.set_ylabel("decode tokens/s (median of runs)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"SmolLM2-135M fp32 decode, {info['torch_threads']} threads\n{info['cpu_model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def docs_section(report: dict, png_rel: str) -> str:
    info, res, cfg = report["machine"], report["results"], report["config"]
    rows = [
        "| n | impl | decode tok/s | ms/token (median) | prefill s | greedy tokens equal |",
        "|---:|---|---:|---:|---:|:---:|",
    ]
    verdict_ok = []
    for n in sorted(res, key=int):
        r = res[n]
        for impl in ("ours", "transformers"):
            x = r[impl]
            pre = f"{x['prefill_s']:.2f}"
            if impl == "ours":
                pre += f" ({x['doc_prefill_s']:.2f} doc + {x['question_prefill_s']:.3f} question)"
            rows.append(f"| {n} | {impl} | {x['tokens_per_s']:.1f} | {x['ms_per_token']:.1f} | {pre} | "
                        f"{'yes' if r['tokens_equal'] else '**no**'} |")
        verdict_ok.append(r["ours"]["tokens_per_s"] >= r["transformers"]["tokens_per_s"])
    ratios = ", ".join(
        f"{res[n]['ours']['tokens_per_s'] / res[n]['transformers']['tokens_per_s']:.2f}x at n={n}"
        for n in sorted(res, key=int)
    )
    verdict = ("**Verdict:** ours is not slower than transformers at every n" if all(verdict_ok)
               else "**Verdict:** ours is SLOWER than transformers at some n") + f" (ours/transformers decode tok/s: {ratios})."
    ties = [n for n in sorted(res, key=int) if _overlap(res[n]["ours"], res[n]["transformers"])]
    if ties:
        verdict += (f" At n={', '.join(ties)} the two sides' per-run tok/s ranges overlap: a tie within run-to-run spread.")
    if not all(res[n]["tokens_equal"] for n in res):
        verdict += " Greedy tokens differ at some n."
    return "\n".join([
        BEGIN,
        "## Decode speed on CPU after a document (`decode_cpu`)",
        "",
        f"SmolLM2-135M-Instruct (registry GGUF, dequantized to float32), greedy, EOS ignored; document = the first n "
        f"tokens of the manual excerpts, then a {cfg['question_tokens']}-token question, then 1 + {cfg['new_tokens']} "
        f"new tokens. Decode tok/s = {cfg['new_tokens']} / (time of last token - time of first token), one timestamp "
        f"per token in the same run on both sides (ours: each `generate_ids` yield; transformers: a `generate` "
        f"streamer; chosen over generate(1 + G) - generate(1), which mixes the noise of two separate prefills "
        f"into the decode time). Prefill = time to the first new token (ours: document prefill + question prefill). Median of "
        f"{cfg['repeats']} runs after one warm-up each.",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch_version']} "
        f"({info['torch_threads']} threads), transformers {info['transformers_version']}, Python {info['python_version']}. "
        + _contention_text(report.get("contention")),
        "",
        *rows,
        "",
        f"![decode tok/s vs document length]({png_rel})",
        "",
        verdict,
        END,
    ])


def _overlap(a: dict, b: dict) -> bool:
    ra, rb = a["runs"]["tokens_per_s"], b["runs"]["tokens_per_s"]
    return min(ra) <= max(rb) and min(rb) <= max(ra)


def _contention_text(c: dict | None) -> str:
    if not c:
        return "Other processes' CPU use during the run: not measured."
    return (f"Other processes used {c['other_processes_cpu_s']:.1f} CPU-seconds during the {c['wall_s']:.0f} s run "
            f"({100 * c['other_processes_share_of_cores']:.1f}% of the cores); ours and transformers alternate run by "
            f"run, so any such disturbance falls on both.")


def write_outputs(report: dict, out: Path, png: Path, plot, section, begin: str, end: str, docs: Path) -> None:
    """A benchmark's results: `report` as JSON at `out`, `plot(report, png)`, and `section(report, png
    relative to docs/)` between the markers `begin`/`end` of `docs`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, png)
    write_docs(docs, section(report, str(png.relative_to(docs.parent))), begin, end)


def write_docs(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the part of `path` between the markers `begin` and `end` by `section` (which
    carries the markers itself), or append it when the markers are not there yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="512,4096", help="document lengths, comma separated (default 512,4096)")
    ap.add_argument("--new-tokens", type=int, default=64, help="G, timed decode steps (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--subtraction", action="store_true",
                    help="also time transformers as generate(1+G) - generate(1) over separate runs")
    ap.add_argument("--out-json", type=Path, default=REPO / "benchmarks/results/decode_cpu.json")
    ap.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    ap.add_argument("--plot", type=Path, default=REPO / "docs/img/decode_cpu.png")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.n.split(",") if x.strip()]
    steps = args.new_tokens

    torch.set_num_threads(args.threads)
    from nectar_models.loading import load_model
    from nectar_runtime.hub import model_path
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gguf = model_path(MODEL)
    if gguf is None:
        sys.exit(f"{MODEL} is not downloaded; run `nectar pull {MODEL}`")
    info = machine_info(args.threads)
    log(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch_version']}, {args.threads} threads")

    doc_all, question, which = load_tokens(gguf)
    log(f"tokenizer: {which}; {len(doc_all)} document tokens available, question = {len(question)} tokens")
    if max(ns) > len(doc_all):
        sys.exit(f"only {len(doc_all)} document tokens available, asked for n={max(ns)}")

    log("loading ours (nectar_models, float32)")
    ours = load_model(gguf, dtype=torch.float32).model.eval()
    log("loading transformers (gguf, float32)")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    meter = CpuContention()
    log(f"warm-up (n={min(ns)}, both)")
    run_ours(ours, doc_all[: min(ns)], question, steps)
    run_hf(hf, doc_all[: min(ns)], question, steps)

    results: dict[str, dict] = {}
    for n in ns:
        doc = doc_all[:n]
        o_runs, h_runs = [], []
        for rep in range(args.repeats):  # interleaved so drift hits both sides alike
            o_runs.append(run_ours(ours, doc, question, steps))
            log(f"n={n} rep {rep + 1}/{args.repeats} ours: {steps / (o_runs[-1]['stamps'][-1] - o_runs[-1]['stamps'][0]):.1f} tok/s")
            h_runs.append(run_hf(hf, doc, question, steps))
            log(f"n={n} rep {rep + 1}/{args.repeats} transformers: {steps / (h_runs[-1]['stamps'][-1] - h_runs[-1]['stamps'][0]):.1f} tok/s")
        o, h = summarize(o_runs, steps), summarize(h_runs, steps)
        h["total_s"] = statistics.median(r["total_s"] for r in h_runs)
        if args.subtraction:
            sub = [hf_subtraction(hf, doc, question, steps) for _ in range(args.repeats)]
            h["tokens_per_s_by_subtraction"] = statistics.median(steps / (s["t1g"] - s["t1"]) for s in sub)
        equal = all(r["tokens"] == h_runs[0]["tokens"] for r in o_runs + h_runs)
        first_diff = next((i for i, (a, b) in enumerate(zip(o_runs[0]["tokens"], h_runs[0]["tokens"])) if a != b), None)
        results[str(n)] = {"ours": o, "transformers": h, "tokens_equal": equal, "first_difference_at": first_diff,
                           "ours_tokens": o_runs[0]["tokens"], "transformers_tokens": h_runs[0]["tokens"]}
        log(f"n={n}: ours {o['tokens_per_s']:.1f} tok/s ({o['ms_per_token']:.1f} ms), transformers "
            f"{h['tokens_per_s']:.1f} tok/s ({h['ms_per_token']:.1f} ms), tokens equal: {equal}")

    contention = meter.result()
    if contention:
        log(f"other processes used {contention['other_processes_cpu_s']:.1f} CPU-s during the run "
            f"({100 * contention['other_processes_share_of_cores']:.1f}% of the cores)")
    cmd_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    report = {
        "benchmark": "decode_cpu",
        "command": " ".join(["python benchmarks/decode_cpu.py", *cmd_args]),
        "model": MODEL,
        "model_file": gguf.name,
        "dtype": "float32",
        "machine": info,
        "contention": contention,
        "config": {"n": ns, "new_tokens": steps, "repeats": args.repeats, "question": QUESTION,
                   "question_tokens": len(question), "tokenizer": which,
                   "timing": "one timestamp per new token in the same run; tokens/s = G / (t_last - t_first); "
                             "ms_per_token = median gap; median over repeats"},
        "results": results,
        "ours_not_slower_at_all_n": all(r["ours"]["tokens_per_s"] >= r["transformers"]["tokens_per_s"]
                                        for r in results.values()),
        "tokens_equal_at_all_n": all(r["tokens_equal"] for r in results.values()),
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.plot, info)
    png_rel = os.path.relpath(args.plot.resolve(), args.docs.resolve().parent)
    write_docs(args.docs, docs_section(report, png_rel))
    log(f"wrote {args.out_json}, {args.plot}, {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
