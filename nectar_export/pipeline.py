"""`nectar fit` end to end: model + document -> probes -> queries -> heads -> artifact.

Stages are timed and shown with progress bars; the closing summary reports time per stage,
artifact bytes against the document's fp16 KV bytes, and held-out attention error per layer.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nectar_runtime.errors import NectarError

from nectar_runtime.document import (DocumentContext, Source, describe_sources, make_context, read_documents,
                                     read_stored_document)
from .config import FitConfig
from .fit import FitResult, fit_heads, train_dtype
from .heads import HeadsSpec, NectarHeads, nectar_contexts
from .retained import (RetainedKV, retain_after_fit, retained_bytes, retained_contexts, subset_error,
                       token_budget_choice)
from .streaming import kv_bytes


@dataclass
class Loaded:
    """A base model ready for document work."""

    lm: object  # nectar_models.loading.LoadedModel
    tokenizer: object
    name: str  # how the user named it (registry name or path)
    device: str

    @property
    def model(self):
        return self.lm.model

    @property
    def config(self):
        return self.lm.config


def load_base(model: str | None, device: str = "cpu") -> Loaded:
    from nectar_models.loading import load_model
    from nectar_runtime.backends.torch_backend import resolve_device
    from nectar_runtime.hub import DEFAULT_MODEL, resolve_model
    from nectar_runtime.tokenizer import load_tokenizer

    device = resolve_device(device)
    path = resolve_model(model, pull_missing=True)
    return Loaded(load_model(path, device=device), load_tokenizer(path), model or DEFAULT_MODEL, device)


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, log=print):
        log(f"[nectar fit] {name} …")
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 2)
        log(f"[nectar fit] {name}: {self.seconds[name]:.1f} s")


def doc_paths(doc_path) -> list[str | Path]:
    """`nectar fit`'s DOC arguments as a list: one path, or several (files or directories)."""
    return [doc_path] if isinstance(doc_path, (str, Path)) else list(doc_path)


def read_doc_args(doc_path, out: str | Path | None = None) -> tuple[str, list[Source], str]:
    """The document of `doc_path` (a file, a directory or a list of them: read_documents; nothing under the
    artifact directory `out`) -> (text, sources, label); the label names it in messages: the path given, or
    `N files (…)` for several."""
    paths = doc_paths(doc_path)
    text, sources = read_documents(paths, exclude=out)
    return text, sources, str(paths[0]) if len(sources) == 1 and len(paths) == 1 else describe_sources(sources)


def document_context(base: Loaded, doc_path) -> DocumentContext:
    """The document of `doc_path` (read_doc_args) placed as context for base's tokenizer."""
    text, _, label = read_doc_args(doc_path)
    return make_context(base.tokenizer, text, base.config.max_position, source=label)


def split_prefix(contexts: list, prefix_len: int) -> tuple[list | None, list]:
    """Per-layer exact contexts over [template prefix | document] -> (prefix parts, document parts)."""
    n = contexts[0].length
    doc = [c.select(torch.arange(prefix_len, n, device=c.k.device)) for c in contexts]
    if prefix_len == 0:
        return None, doc
    return [c.select(torch.arange(0, prefix_len, device=c.k.device)) for c in contexts], doc


def nectar_with_prefix(model, ctx: DocumentContext, heads: NectarHeads, device, retained: RetainedKV | None = None) -> list:
    """What stands for the document at inference: exact template prefix (recomputed, tiny) + heads
    (+ attention over the retained heads' stored document KV, if any)."""
    from nectar_models.attention import CompositeContext

    served = retained_contexts(nectar_contexts(heads, model.config.layer_windows, ctx.n), retained, model.config.scale)
    if ctx.prefix_len == 0:
        return served
    prefix = model.prefill_document(torch.tensor([ctx.context_ids[: ctx.prefix_len]], device=device)).contexts()
    return [CompositeContext([p, h]) for p, h in zip(prefix, served)]


def spec_factory(cfg, variant: str):
    return lambda widths: HeadsSpec(variant, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(widths), cfg.scale)


def budget_bytes(ctx: DocumentContext, model_cfg, fit_cfg: FitConfig) -> float:
    """The artifact's whole byte budget: --budget-mb, else budget_fraction of the fp16 KV of the document's
    tokens (template opening included), counting at most `budget_tokens` of them (0: all)."""
    if fit_cfg.budget_mb:
        return fit_cfg.budget_mb * 1e6
    counted = min(ctx.n, fit_cfg.budget_tokens) if fit_cfg.budget_tokens else ctx.n
    return fit_cfg.budget_fraction * kv_bytes(counted, model_cfg)


def budget_params(ctx: DocumentContext, model_cfg, fit_cfg: FitConfig) -> tuple[int, int]:
    """(parameter budget, document fp16 KV bytes). Weights are stored as fp16 (2 bytes); the exact
    template-prefix KV kept at inference is charged to the budget too, and so are retained heads."""
    retained = retained_bytes(ctx.n - ctx.prefix_len, model_cfg.head_dim, fit_cfg.retain_heads, fit_cfg.retain_dtype,
                              fit_cfg.retain_tokens)
    budget = budget_bytes(ctx, model_cfg, fit_cfg) - retained
    return int((budget - kv_bytes(ctx.prefix_len, model_cfg)) // 2), kv_bytes(ctx.n, model_cfg)


def eligible_kv_heads(model_cfg) -> int:
    """KV heads of global-attention layers: the ones that can be retained."""
    return model_cfg.num_kv_heads * sum(1 for w in model_cfg.layer_windows if not w)


def resolve_retention(ctx: DocumentContext, model_cfg, fit_cfg: FitConfig, on_policy: bool = False) -> FitConfig:
    """`fit_cfg` with `--retain-tokens auto` and `--retain-heads auto` (None) made counts for this model and
    document (FitConfig.auto_retain_tokens, then auto_retain_heads, which needs the tokens' bytes)."""
    fit_cfg = fit_cfg.auto_retain_tokens(ctx.n - ctx.prefix_len)
    one = retained_bytes(ctx.n - ctx.prefix_len, model_cfg.head_dim, 1, fit_cfg.retain_dtype, fit_cfg.retain_tokens)
    return fit_cfg.auto_retain_heads(eligible_kv_heads(model_cfg), one, budget_bytes(ctx, model_cfg, fit_cfg), on_policy)


def smallest_heads_params(cfg, fit_cfg: FitConfig) -> int:
    """Parameters of the smallest heads: width `width_multiple` in every layer."""
    return spec_factory(cfg, fit_cfg.variant)((fit_cfg.width_multiple,) * cfg.num_layers).total_params()


def smallest_budget_mb(base: Loaded, ctx: DocumentContext, fit_cfg: FitConfig) -> float:
    """The least budget, in MB rounded up to 0.01, that holds the smallest heads (width
    `width_multiple` in every layer), the exact template prefix and `fit_cfg`'s retained heads
    (retention resolved)."""
    cfg = base.config
    least = smallest_heads_params(cfg, fit_cfg)
    kept = retained_bytes(ctx.n - ctx.prefix_len, cfg.head_dim, fit_cfg.retain_heads, fit_cfg.retain_dtype,
                          fit_cfg.retain_tokens)
    need = (2 * least + kv_bytes(ctx.prefix_len, cfg) + kept) / 1e6
    return math.ceil(need * 100) / 100  # rounded up: the figure shown and used must be enough


def settle_budget(base: Loaded, ctx: DocumentContext, fit_cfg: FitConfig, on_policy: bool = False
                  ) -> tuple[FitConfig, str | None]:
    """(`fit_cfg` with retention resolved, a note or None). For a document so short that the default budget
    (budget_fraction of its KV) cannot hold the smallest heads, `budget_mb` is raised to what they need, and
    the note says so; for one longer than `budget_tokens` the note says the default budget is capped. A
    --budget-mb the user gave is left as is (check_budget refuses it if too small)."""
    fit_cfg = resolve_retention(ctx, base.config, fit_cfg, on_policy)
    if fit_cfg.budget_mb:
        return fit_cfg, None
    given = budget_bytes(ctx, base.config, fit_cfg) / 1e6
    need = smallest_budget_mb(base, ctx, fit_cfg)
    kvb = kv_bytes(ctx.n, base.config)
    capped = bool(fit_cfg.budget_tokens) and ctx.n > fit_cfg.budget_tokens
    if given >= need:
        if not capped:
            return fit_cfg, None
        # retained heads that keep every token (or more than the cap's) still cost more per token as n grows
        bounded = not fit_cfg.retain_heads or 0 < fit_cfg.retain_tokens <= fit_cfg.budget_tokens
        return fit_cfg, (f"[nectar fit] {ctx.n} tokens with the chat template's opening: the default budget counts the first "
                         f"{fit_cfg.budget_tokens:,} (--budget-tokens), {fit_cfg.budget_fraction:g} of their fp16 KV = {given:.2f} MB "
                         f"({100 * given * 1e6 / kvb:.0f}% of the whole document's {kvb / 1e6:.2f} MB)"
                         + (f", so decode costs what it would after {fit_cfg.budget_tokens:,} tokens" if bounded else "")
                         + "; --budget-tokens 0 sizes it by the whole document")
    note = (f"[nectar fit] {ctx.n - ctx.prefix_len} document tokens (+{ctx.prefix_len} of the chat template's opening): "
            + (f"{fit_cfg.budget_fraction:g} of the fp16 KV of their first {fit_cfg.budget_tokens:,} (--budget-tokens; {given:.2f} MB) "
               if capped else f"{fit_cfg.budget_fraction:g} of their {kvb / 1e6:.2f} MB fp16 KV ({given:.2f} MB) ")
            + "cannot hold the smallest "
            f"Nectar heads; the budget, a ceiling, is raised to {need:.2f} MB ({100 * need * 1e6 / kvb:.0f}% of the KV)"
            + (" — for a document this short, plain context costs less memory" if need * 1e6 >= kvb else ""))
    return replace(fit_cfg, budget_mb=need), note


def check_budget(base: Loaded, ctx: DocumentContext, fit_cfg: FitConfig, label, on_policy: bool = False) -> None:
    """Refuse a budget below the smallest heads (width `width_multiple` in every layer), naming the
    sizes and what to do: a too small --budget-mb (a default budget is raised first: settle_budget),
    or more retained heads than the model has or the budget holds."""
    cfg = base.config
    eligible = eligible_kv_heads(cfg)
    fit_cfg = resolve_retention(ctx, cfg, fit_cfg, on_policy)
    if fit_cfg.retain_heads > eligible:
        raise NectarError(f"--retain-heads {fit_cfg.retain_heads}: {base.name} has {eligible} KV heads in global-"
                          f"attention layers; pass at most {eligible}")
    n_params, kvb = budget_params(ctx, cfg, fit_cfg)
    if n_params < smallest_heads_params(cfg, fit_cfg):
        need_mb = smallest_budget_mb(base, ctx, fit_cfg)
        given = f"--budget-mb {fit_cfg.budget_mb:g}" if fit_cfg.budget_mb else \
            f"{fit_cfg.budget_fraction:g} of its {kvb / 1e6:.2f} MB fp16 KV cache"
        kept = retained_bytes(ctx.n - ctx.prefix_len, cfg.head_dim, fit_cfg.retain_heads, fit_cfg.retain_dtype,
                              fit_cfg.retain_tokens)
        if kept:
            given += f", of which {fit_cfg.retain_heads} retained heads take {kept / 1e6:.2f} MB"
        raise NectarError(f"{label}: {ctx.n} tokens with the chat template's opening; the artifact budget ({given}) "
                          f"is below the smallest Nectar heads ({need_mb:.2f} MB with the exact template prefix): pass "
                          f"--budget-mb {need_mb:.2f} or more" + (", or fewer --retain-heads" if kept else ""))


def fit_document(base: Loaded, doc_path, out: str | Path, fit_cfg: FitConfig,
                 probe_cfg=None, on_policy: bool = False, progress: bool = True, log=print) -> dict:
    """Fit Nectar heads for one document and write the artifact. Returns the manifest. `doc_path`: a text
    file, a directory of them or a list of files and directories, joined into one document (read_documents).
    probe_cfg None: `nectar fit`'s default probes on base's device (ProbeConfig scaled by default_probe_scale)."""
    from .artifact import read_manifest, save_artifact
    from .collect import collect_queries
    from .config import default_probe_scale
    from .probes import ProbeConfig, build_probes, probe_stats, split_probes

    timer = StageTimer()
    torch.manual_seed(fit_cfg.seed)
    device_type = torch.device(base.device).type
    fit_cfg = fit_cfg.for_device(device_type)  # the manifest records the steps and batch actually trained
    if probe_cfg is None:
        probe_cfg = ProbeConfig(seed=fit_cfg.seed).scaled(default_probe_scale(device_type))
    model, cfg = base.model, base.config
    if on_policy and fit_cfg.retain_heads:
        raise NectarError("nectar fit: --on-policy with --retain-heads is not supported (the re-collection would serve "
                          "networks of heads that are then replaced); use one or the other")
    text, sources, label = read_doc_args(doc_path, out)  # bad documents fail here, before any progress output
    ctx = make_context(base.tokenizer, text, cfg.max_position, source=label)
    fit_cfg, note = settle_budget(base, ctx, fit_cfg, on_policy)  # the manifest records the counts and budget
    if note:
        log(note)
    check_budget(base, ctx, fit_cfg, label, on_policy)
    with timer.stage("prefill document", log):
        cache = model.prefill_document(torch.tensor([ctx.context_ids], device=base.device))
        full = cache.contexts()
        prefix, doc = split_prefix(full, ctx.prefix_len)
    n_params, kvb = budget_params(ctx, cfg, fit_cfg)
    note = slow_training_note(fit_cfg, torch.device(base.device))
    if note:
        log(note)
    with timer.stage("build probes", log):
        probes = build_probes(model, base.tokenizer, ctx, full, probe_cfg, progress=progress)
        train_p, held_p = split_probes(probes, probe_cfg.holdout_frac, probe_cfg.seed)
    with timer.stage("collect queries", log):
        # two collections rather than one split afterwards: no moment with both the whole set and its halves
        store = getattr(torch, fit_cfg.query_dtype)
        qs_train = collect_queries(model, doc, ctx.n, [p.ids for p in train_p], prefix_contexts=prefix, progress=progress,
                                   store_dtype=store)
        qs_held = collect_queries(model, doc, ctx.n, [p.ids for p in held_p], prefix_contexts=prefix,
                                  progress=progress, index_offset=len(train_p), store_dtype=store)
    doc_kv = [(c.k, c.v) for c in doc]
    # a token budget: the retained heads are chosen after the probe fit and their networks fitted to the rest
    # (the manifest's per-layer held-out errors then score those heads against the tokens they do not keep)
    choice = token_budget_choice(doc, fit_cfg, cfg.layer_windows)
    with timer.stage("fit heads", log):
        result = fit_heads(qs_train, qs_held, spec_factory(cfg, fit_cfg.variant), n_params, fit_cfg, doc_kv, progress,
                           retarget=choice)
    on_policy_report = None
    if on_policy:
        with timer.stage("on-policy re-collection and refit", log):
            result, on_policy_report = _refit_on_policy(base, ctx, prefix, doc, train_p, held_p, result, fit_cfg, progress)
    distill_report = None
    if fit_cfg.distill_steps:
        from .distill import distill_heads
        from .fit import layer_errors

        with timer.stage("distill heads", log):
            student = nectar_with_prefix(model, ctx, result.heads, base.device)
            distill_report = distill_heads(model, result.heads, full, student, ctx.n, [p.ids for p in train_p],
                                           [p.ids for p in held_p], fit_cfg.distill_steps, fit_cfg.distill_lr,
                                           fit_cfg.distill_tokens, seed=fit_cfg.seed, progress=progress)
            result.heldout = layer_errors(result.heads, qs_held)
    retained, retained_report = None, None
    if fit_cfg.retain_heads:
        with timer.stage("choose retained heads", log):
            retained, mass = retain_after_fit(doc, result.heads, qs_held, fit_cfg, ctx.prefix_len, cfg.layer_windows, choice)
            modules = retained.modules
            retained_report = {"modules": [list(m) for m in modules], "bytes": retained.nbytes(), "dtype": fit_cfg.retain_dtype,
                               "tokens": retained.length, "heldout_error": subset_error(result.heads, retained, qs_held),
                               "heldout_error_mass_share": float(sum(mass[l, j] for l, j in modules) / mass.sum())}
    manifest = {
        "base_model": {"name": base.name, "sha256": base.lm.weights_sha256, "family": cfg.family,
                       "format": base.lm.source_format},
        "document": {"sha256": ctx.sha256, "n_tokens": ctx.n, "prefix_tokens": ctx.prefix_len, "chat": ctx.chat,
                     "source": describe_sources(sources),
                     "sources": [{"label": x.label, "sha256": x.sha256, "chars": x.chars} for x in sources]},
        "variant": fit_cfg.variant,
        "allocation": fit_cfg.allocation,
        "widths": list(result.widths),
        "param_count": result.heads.spec.total_params(),
        "kv_bytes": kvb,
        "fit_config": fit_cfg.to_dict(),
        "probe_config": asdict(probe_cfg),
        "probes": {"train": probe_stats(train_p), "heldout": probe_stats(held_p)},
        "metrics": {"heldout": result.heldout, "allocation_probe": result.allocation_probe,
                    "train_loss_final": float(sum(result.train_curve[-20:]) / max(1, len(result.train_curve[-20:]))),
                    "on_policy": on_policy_report, "distill": distill_report},
        "retained": retained_report,
        "timings_s": timer.seconds,
    }
    with timer.stage("write artifact", log):
        art = save_artifact(out, result.heads, manifest, ctx.text, retained)
    manifest["timings_s"] = timer.seconds
    manifest["artifact_bytes"] = read_manifest(art)["artifact_bytes"]  # heads (+ retained heads' KV)
    log(fit_summary(manifest))
    return manifest


def slow_training_note(fit_cfg: FitConfig, device: torch.device) -> str | None:
    """A line for CPUs where `train_dtype="auto"` falls back to fp32 (oneDNN has no bf16 matmuls
    without AVX-512): on such a 2-core CPU (AVX2 only) the default training ran at about 1.3 s a step,
    about an hour for a 4K-token document, against 12 minutes for the whole fit on an AVX512-BF16 CPU
    (docs/benchmarks.md)."""
    if device.type != "cpu" or fit_cfg.train_dtype != "auto" or train_dtype("auto", device) != torch.float32:
        return None
    return (f"[nectar fit] note: this CPU has no bf16 matmuls (they need AVX-512), so the heads train in fp32, "
            f"several times slower ({fit_cfg.steps} steps; see docs/benchmarks.md): --device cuda or fewer --steps "
            f"shorten the fit")


def _refit_on_policy(base, ctx, prefix, doc, train_p, held_p, first: FitResult, fit_cfg, progress):
    """Re-collect queries with the first heads serving every layer, then refit from scratch."""
    from .collect import collect_queries

    serve = nectar_contexts(first.heads, base.config.layer_windows, ctx.n)
    store = getattr(torch, fit_cfg.query_dtype)
    qs_train = collect_queries(base.model, doc, ctx.n, [p.ids for p in train_p], prefix_contexts=prefix,
                               serve_contexts=serve, progress=progress, store_dtype=store)
    qs_held = collect_queries(base.model, doc, ctx.n, [p.ids for p in held_p], prefix_contexts=prefix,
                              serve_contexts=serve, progress=progress, index_offset=len(train_p), store_dtype=store)
    n_params = first.heads.spec.total_params()
    second = fit_heads(qs_train, qs_held, spec_factory(base.config, fit_cfg.variant),
                       n_params, fit_cfg, [(c.k, c.v) for c in doc], progress)
    report = {"off_policy_heldout_o_rel_error_mean": _mean(first.heldout["o_rel_error"]),
              "on_policy_heldout_o_rel_error_mean": _mean(second.heldout["o_rel_error"])}
    return second, report


def _mean(xs) -> float:
    return float(sum(xs) / max(1, len(xs)))


def fit_summary(m: dict) -> str:
    err = m["metrics"]["heldout"]
    worst = sorted(range(len(err["o_rel_error"])), key=lambda i: -err["o_rel_error"][i])[:3]
    lines = [
        "── nectar fit summary ──",
        "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["timings_s"].items()),
        f"artifact: {m['artifact_bytes'] / 1e6:.2f} MB = {100 * m['artifact_bytes'] / m['kv_bytes']:.1f}% of the "
        f"document's fp16 KV cache ({m['kv_bytes'] / 1e6:.2f} MB, n = {m['document']['n_tokens']} tokens; "
        f"the {m['document']['prefix_tokens']}-token template prefix stays exact)",
        f"heads: {m['variant']}, {m['allocation']} widths {sorted(set(m['widths']))}, {m['param_count'] / 1e6:.2f} M params"
        + (f"; {len(m['retained']['modules'])} KV heads retained ({m['retained'].get('dtype', 'float16')} document KV, "
           f"{m['retained']['bytes'] / 1e6:.2f} MB, "
           + (f"{m['retained']['tokens']} of {m['document']['n_tokens'] - m['document']['prefix_tokens']} document tokens "
              f"each, held-out error o rel {m['retained']['heldout_error']['o']:.4f}, lse {m['retained']['heldout_error']['lse']:.4f}, "
              if m["retained"].get("tokens", 0) < m["document"]["n_tokens"] - m["document"]["prefix_tokens"] else "")
           + f"{100 * m['retained']['heldout_error_mass_share']:.0f}% of the held-out error mass): "
           + " ".join(f"{l}.{j}" for l, j in m["retained"]["modules"]) if m.get("retained") else ""),
        f"held-out attention error: o rel {_mean(err['o_rel_error']):.3f} (weighted {_mean(err['o_rel_error_weighted']):.3f}), "
        f"lse abs {_mean(err['lse_abs_error']):.3f}; worst layers " + ", ".join(f"{i} ({err['o_rel_error'][i]:.3f})" for i in worst),
    ]
    dist = m["metrics"].get("distill")
    if dist:
        b, a = dist["heldout_before"], dist["heldout_after"]
        lines.append(f"distillation ({dist['steps']} steps, {dist['seconds']:.0f} s): held-out next-token KL "
                     f"(top-{dist['top_k']}) {b['kl_topk']:.4f} -> {a['kl_topk']:.4f}, agreement with full context "
                     f"{b['agreement']:.3f} -> {a['agreement']:.3f} (kept: step {dist['kept_step']})")
    if m["artifact_bytes"] >= m["kv_bytes"]:
        lines.append("note: the artifact is no smaller than the document's own KV cache: for a document this short, "
                     "keeping it as plain context costs less memory")
    return "\n".join(lines)


# ------------------------------------------------------------- using an artifact


@dataclass
class OpenArtifact:
    base: Loaded
    manifest: dict
    ctx: DocumentContext
    heads: NectarHeads
    retained: RetainedKV | None = None

    def contexts(self):
        return nectar_with_prefix(self.base.model, self.ctx, self.heads, self.base.device, self.retained)


def open_artifact(art: str | Path, device: str = "cpu", model: str | None = None) -> OpenArtifact:
    """Load the base model named in the manifest (or `model`), check its hash, load the heads."""
    from .artifact import load_heads, load_retained, read_manifest

    m = read_manifest(art)
    base = load_base(model or m["base_model"]["name"], device)  # resolves --device auto: base.device from here on
    heads = load_heads(art, m, base.lm.weights_sha256, base.device)
    retained = load_retained(art, m, base.config, base.device)
    text = read_stored_document(Path(art) / "document.txt")
    ctx = make_context(base.tokenizer, text, base.config.max_position, source=str(art))
    if ctx.sha256 != m["document"]["sha256"] or ctx.n != m["document"]["n_tokens"]:
        raise NectarError(f"{art}: document.txt does not match the manifest (sha256/tokens): it was edited or the artifact is corrupt; restore it or re-run `nectar fit`")
    return OpenArtifact(base, m, ctx, heads, retained)



def open_artifact_session(art: str | Path, device: str = "cpu", dtype: str = "float32", model: str | None = None):
    """A ChatSession answering from the artifact's heads: no document KV anywhere. On CUDA with
    Triton the fused CUDA-graph step serves it (runtime/backends/cuda_graph.py); otherwise, or
    for models it does not support, the torch backend (with a one-line notice on CUDA)."""
    import sys

    from nectar_runtime.chat_session import ChatSession
    from nectar_runtime.document import local_ids

    oa = open_artifact(art, device, model)
    if dtype != "float32":
        oa.base.model.to(getattr(torch, dtype))
    return ChatSession(oa.base.tokenizer, artifact_backend(oa, sys.stderr),
                       build_prompt=lambda turns: local_ids(oa.ctx, oa.base.tokenizer, turns), plain_qa=not oa.ctx.chat)


def artifact_backend(oa: OpenArtifact, log=None):
    """The fastest backend for an open artifact: CudaGraphBackend on CUDA when it supports the
    model (its StepOptions from the NECTAR_* environment variables), else TorchBackend (decoder +
    NectarContext). `log`: a stream for the fallback notice."""
    from nectar_runtime.backends.fast_path import fused_unavailable, notice
    from nectar_runtime.backends.torch_backend import TorchBackend

    if oa.base.model.embed_tokens.weight.device.type == "cuda":
        reason = fused_unavailable(oa.base.model)
        if reason is None:
            from nectar_runtime.backends.cuda_graph import StepOptions, nectar_backend_from_artifact

            return nectar_backend_from_artifact(oa, options=StepOptions.from_env())
        if log is not None:
            print(notice(reason), file=log)
    return TorchBackend(oa.base.model, oa.contexts(), oa.ctx.n)
