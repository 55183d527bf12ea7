"""Which ONNX Runtime releases run a bundle, and how closely: the deployer's compatibility table.

A Jetson or an older server may carry an older onnxruntime than the one bundles are exported
with. For each release given, this installs it into its own folder (`pip install --target`, CPU
build from PyPI; numpy < 2 for releases built against numpy 1), then, in a fresh interpreter with
that folder first on the path, loads every bundle and teacher-forces the token sequence that the
current onnxruntime (this interpreter's) greedily generates for a chat question about the bundle's
document. It records whether the release loads the graph (the error's first line if not) and, per
bundle, the largest |Δlogit| and the top-1 agreement against the current release over those tokens.

    python benchmarks/ort_versions.py --bundles DIR1,DIR2,... [--versions 1.16.3,1.20.1,...] [--tokens 16]

Writes benchmarks/results/ort_versions.json, docs/img/ort_versions.png and the docs/deploy.md
section between `<!-- ort_versions:begin -->` and `<!-- ort_versions:end -->`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

BEGIN, END = "<!-- ort_versions:begin -->", "<!-- ort_versions:end -->"
VERSIONS = "1.16.3,1.17.3,1.18.1,1.19.2,1.20.1,1.21.1,1.22.1,1.23.2,1.24.4,1.26.0,1.28.0,1.30.0"
QUESTION = "What is this document about, in one sentence?"


def install(version: str, cache: Path) -> Path:
    """onnxruntime==version in its own folder (once); numpy 1 beside releases built against it."""
    target = cache / version
    if not (target / "onnxruntime").is_dir():
        old = tuple(int(x) for x in version.split(".")[:2]) < (1, 19)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"onnxruntime=={version}"]
        subprocess.run(cmd + (["numpy<2"] if old else []), check=True, capture_output=True, timeout=900)
    return target


def forced_logits(bundle: str, tokens: list[int] | None, steps: int) -> tuple[list[int], np.ndarray]:
    """Logits [steps, V] of the question's prompt then `tokens` fed one by one (None: greedy ones)."""
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.bundle_session import open_bundle_session

    session = open_bundle_session(bundle, threads=2, provider="cpu", verify=False)
    be: OrtBackend = session.backend
    prompt = session.prompt_ids(QUESTION, chat=True)
    n = be.context_len
    be.reset(1, len(prompt) + steps + 1)
    logits = be.step(np.array([prompt]), n + np.arange(len(prompt))[None])
    out, fed = [], []
    for i in range(steps):
        out.append(np.array(logits[0], np.float32))  # a copy: the backend's bound output buffer is reused every step
        t = int(out[-1].argmax()) if tokens is None else tokens[i]
        fed.append(t)
        logits = be.step(np.array([[t]]), np.array([[n + len(prompt) + i]]))
    return fed, np.stack(out)


def worker(a: argparse.Namespace) -> int:
    """Run inside the release under test: one JSON line per bundle on stdout, logits to files."""
    import onnxruntime

    spec = json.loads(Path(a.worker).read_text())
    for i, (bundle, tokens) in enumerate(zip(spec["bundles"], spec["tokens"])):
        try:
            _, logits = forced_logits(bundle, tokens, len(tokens))
            np.save(Path(spec["out"]) / f"{i}.npy", logits)
            print(json.dumps({"bundle": bundle, "ok": True, "onnxruntime": onnxruntime.__version__}))
        except Exception as e:  # the release cannot run it: keep the reason
            reason = str(e).replace("\n", " ")
            if "needs onnxruntime" in reason:  # the runtime's own version check: what would ORT itself say?
                reason += " || onnxruntime alone: " + _ort_alone(bundle)
            print(json.dumps({"bundle": bundle, "ok": False, "error": f"{type(e).__name__}: {reason[:900]}"}))
    return 0


def _ort_alone(bundle: str) -> str:
    """Whether this release's onnxruntime loads the bundle's graph when the runtime's version check is
    bypassed: "loads", or its error's first words."""
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(Path(bundle) / "model.onnx"), providers=["CPUExecutionProvider"])
        return "loads"
    except Exception as e:  # noqa: BLE001 - any load failure is the answer
        return str(e).replace("\n", " ")[:300]


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref, got: [steps, V] logits of the same forced tokens."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return {"max_abs_logit_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "mean_kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", help="comma-separated bundle directories")
    ap.add_argument("--versions", default=VERSIONS, help=f"onnxruntime releases to try (default {VERSIONS})")
    ap.add_argument("--tokens", type=int, default=16, help="forced answer tokens per bundle (default 16)")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "work" / "ort_versions"), help="where releases are installed")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ort_versions.json"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--report", action="store_true", help="only render --json's record again (table, PNG, docs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.report:
        publish(json.loads(Path(a.json).read_text()), a.no_docs)
        return 0
    if not a.bundles:
        ap.error("--bundles is required")
    import onnxruntime

    from nectar_runtime.bundle import read_bundle
    from nectar_runtime.errors import NectarError

    bundles = [str(Path(b).resolve()) for b in a.bundles.split(",")]
    for b in bundles:
        try:
            read_bundle(b)
        except NectarError as e:
            ap.error(str(e))
    ref = [forced_logits(b, None, a.tokens) for b in bundles]
    rows = {}
    versions = [v.strip() for v in a.versions.split(",") if v.strip()]
    from tqdm import tqdm

    for v in tqdm(versions, desc="onnxruntime releases", unit="release"):
        target = install(v, Path(a.cache))
        with tempfile.TemporaryDirectory() as d:
            spec = Path(d) / "spec.json"
            spec.write_text(json.dumps({"bundles": bundles, "tokens": [t for t, _ in ref], "out": d}))
            env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
            r = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True,
                               timeout=1800, env=env, cwd=str(ROOT))
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            if len(lines) != len(bundles):
                rows[v] = {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                continue
            rows[v] = {}
            for i, (b, res) in enumerate(zip(bundles, lines)):
                name = Path(b).name
                rows[v][name] = compare(ref[i][1], np.load(Path(d) / f"{i}.npy")) if res["ok"] else {"error": res["error"]}
    names = [Path(b).name for b in bundles]
    kinds = {Path(b).name: (read_bundle(b).manifest.get("quantize") or read_bundle(b).manifest.get("dtype")) for b in bundles}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu": _cpu_model()}, "reference_onnxruntime": onnxruntime.__version__,
              "question": QUESTION, "tokens": a.tokens, "bundles": names, "kinds": kinds, "results": rows,
              "argv": sys.argv[1:]}
    Path(a.json).write_text(json.dumps(record, indent=1))
    publish(record, a.no_docs)
    return 0


def publish(record: dict, no_docs: bool) -> None:
    print(table(record))
    if no_docs:
        return
    from decode_cpu import write_docs

    plot(record, ROOT / "docs" / "img" / "ort_versions.png")
    write_docs(ROOT / "docs" / "deploy.md", "\n".join([
        BEGIN, "### Which onnxruntime runs a bundle (`ort_versions`)", "",
        f"Command: `python benchmarks/ort_versions.py {' '.join(record['argv'])}` — {record['machine']['cpu']}, "
        f"CPU builds from PyPI, {record['date']}; record `benchmarks/results/ort_versions.json`. Each cell: the largest "
        f"|Δlogit| against onnxruntime {record['reference_onnxruntime']} over {record['tokens']} answer tokens teacher-forced "
        "after the question's prompt, with top-1 agreement and mean KL(current ‖ release), or why the release refused "
        "the graph.", "",
        table(record), "", "![largest |Δlogit| per release and bundle](img/ort_versions.png)", "", END]), BEGIN, END)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


def table(record: dict) -> str:
    names = record["bundles"]
    lines = ["| onnxruntime | " + " | ".join(f"{n} ({record['kinds'][n]})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for v, row in record["results"].items():
        if "error" in row:
            lines.append(f"| {v} | " + " | ".join(["not run: " + row["error"][:80]] * len(names)) + " |")
            continue
        cells = []
        for n in names:
            c = row[n]
            cells.append(_reason(c["error"]) if "error" in c else
                         f"{c['max_abs_logit_diff']:.1e} (top-1 {c['top1_agreement']:.2f}, KL {c['mean_kl']:.1e})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reason(error: str) -> str:
    """What a release lacks, from ORT's load error (as the runtime passes it on), else its first words."""
    if "needs onnxruntime" in error:  # the runtime's check, then what ORT alone does with the graph
        need = error.split("needs ", 1)[1].split(" and this one")[0]
        alone = error.split("|| onnxruntime alone: ", 1)[-1] if "|| onnxruntime alone: " in error else ""
        return f"refused by the runtime (needs {need}); ORT alone: " + (_reason(alone).removeprefix("refused: ") if alone else "?")
    if error == "loads":
        return "loads"
    if "GatherBloc" in error:
        return "refused: " + ("no GatherBlockQuantized op" if "not a regist" in error else "no 8-bit GatherBlockQuantized")
    return "refused: " + error.split(": ", 1)[-1][:60]


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, versions = record["bundles"], list(record["results"])
    grid = np.full((len(versions), len(names)), np.nan)
    for i, v in enumerate(versions):
        for j, n in enumerate(names):
            c = record["results"][v].get(n, {})
            if "max_abs_logit_diff" in c:
                grid[i, j] = max(c["max_abs_logit_diff"], 1e-7)  # 1e-7 stands for 0 (bit-identical) on the log scale
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 0.45 * len(versions) + 1.8))
    im = ax.imshow(np.log10(grid), cmap="viridis", aspect="auto")
    for i in range(len(versions)):
        for j in range(len(names)):
            g = grid[i, j]
            label = "refused" if np.isnan(g) else "0" if g <= 1e-7 else f"{g:.0e}"
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="k" if np.isnan(g) or g > 0.03 else "w")
    ax.set_xticks(range(len(names)), [f"{n}\n({record['kinds'][n]})" for n in names], fontsize=7)
    ax.set_yticks(range(len(versions)), versions)
    ax.set_ylabel("onnxruntime (CPU)")
    fig.colorbar(im, ax=ax, label=f"log10 max |Δlogit| vs {record['reference_onnxruntime']}")
    ax.set_title("Bundles on older onnxruntime releases")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
