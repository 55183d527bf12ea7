"""The Nectar artifact: a directory with `heads.safetensors`, `manifest.json` and `document.txt`
(+ `retained.safetensors` when the fit kept document keys/values for some heads, retained.py).

Written atomically (a temp dir beside the target, then rename); loaded without pickle; refused
when the base model's weights differ from the ones it was fitted on.

    manifest.json = {format_version, tool_version, created, base_model: {name, sha256, family,
                     format}, document: {sha256, n_tokens, prefix_tokens, chat, source, sources: [{label,
                     sha256, chars}, ...]}, variant, spec: {...},
                     widths, param_count, artifact_bytes (all weight files), heads_sha256 (checked
                     on load), kv_bytes, fit_config, metrics, timings_s, retained: null | {modules:
                     [[layer, kv head], ...], dtype (int8 | float16), bytes, sha256,
                     heldout_error_mass_share}}
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nectar_runtime import __version__
from nectar_runtime.bundle import is_bundle_manifest, sha256_file
from nectar_runtime.errors import NectarError

from .config import RETAIN_DTYPES
from .heads import HeadsSpec, NectarHeads
from .outdir import replace_dir, temp_dir_beside
from .retained import RetainedKV, stored_shapes

FORMAT_VERSION = 1
RETAINED_FILE = "retained.safetensors"
STORE_DTYPE = torch.float16  # weights on disk; computed in fp32


def heads_state(heads: NectarHeads) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(STORE_DTYPE).contiguous() for k, v in heads.state_dict().items()}


def save_artifact(out: str | Path, heads: NectarHeads, manifest: dict, document_text: str,
                  retained: RetainedKV | None = None) -> Path:
    """Write the artifact directory atomically; an existing `out` is replaced only on success.
    `retained`: stored keys/values of retained heads (retained.safetensors; manifest["retained"]
    must then describe them)."""
    from safetensors.torch import save_file

    state = heads_state(heads)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged fit: refuse before anything is on disk
        raise NectarError(f"{out}: the fitted heads hold non-finite values ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); "
                          "nothing written: retry with a lower --lr or another --seed, and report the model and document")
    out = Path(out)
    tmp = temp_dir_beside(out)
    try:
        save_file(state, str(tmp / "heads.safetensors"))
        weight_bytes = (tmp / "heads.safetensors").stat().st_size
        if retained is not None:
            save_file(retained.state(), str(tmp / RETAINED_FILE))
            weight_bytes += (tmp / RETAINED_FILE).stat().st_size
            manifest = {**manifest, "retained": {**manifest["retained"], "sha256": sha256_file(tmp / RETAINED_FILE)}}
        # bytes, not text mode: the document must come back byte for byte (CRLF included), or its
        # sha256 and tokens would no longer match the manifest
        (tmp / "document.txt").write_bytes(document_text.encode("utf-8"))
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "spec": asdict(heads.spec),
            "artifact_bytes": weight_bytes,
            "heads_sha256": sha256_file(tmp / "heads.safetensors"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


REQUIRED = {"base_model": ("name", "sha256"), "document": ("sha256", "n_tokens"), "spec": ("widths",)}


def read_manifest(art: str | Path) -> dict:
    art = Path(art)
    if not art.is_dir():
        raise NectarError(f"{art}: no such artifact directory (make one with `nectar fit`)")
    mf = art / "manifest.json"
    if not mf.is_file():
        raise NectarError(f"{art}: not a Nectar artifact (no manifest.json)")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NectarError(f"{mf}: corrupt manifest ({e}); re-run `nectar fit`") from None
    if not isinstance(m, dict):
        raise NectarError(f"{mf}: not a Nectar artifact manifest (a JSON object expected); re-run `nectar fit`")
    if is_bundle_manifest(m):
        raise NectarError(f"{art}: is an exported bundle, not an artifact; run it with `nectar run {art} --chat QUESTION` "
                          "(ask, eval and export take the artifact `nectar fit` wrote)")
    if m.get("format_version") != FORMAT_VERSION:
        raise NectarError(f"{mf}: unsupported artifact format_version {m.get('format_version')!r} (this tool reads "
                          f"{FORMAT_VERSION}); re-run `nectar fit` with this version, or use the nectar that wrote it")
    for key, fields in REQUIRED.items():
        if not isinstance(m.get(key), dict) or any(f not in m[key] for f in fields):
            raise NectarError(f"{mf}: manifest lacks {key}.{{{', '.join(fields)}}}; the artifact is corrupt: re-run `nectar fit`")
    for f in ("heads.safetensors", "document.txt"):
        if not (art / f).is_file():
            raise NectarError(f"{art}: artifact is incomplete ({f} missing); re-run `nectar fit`")
    return m


def load_heads(art: str | Path, manifest: dict, base_sha256: str, device="cpu") -> NectarHeads:
    """Heads in fp32 on `device`, after checking the base model is the one they were fitted on."""
    from safetensors.torch import load_file

    want = manifest["base_model"]["sha256"]
    if want != base_sha256:
        raise NectarError(
            f"{art}: fitted on base model {manifest['base_model'].get('name', '?')} with weights sha256 "
            f"{want[:12]}…, but the model given has {base_sha256[:12]}…; use the same model file"
        )
    path = Path(art) / "heads.safetensors"
    if "heads_sha256" in manifest and sha256_file(path) != manifest["heads_sha256"]:  # older artifacts lack it
        raise NectarError(f"{path}: contents do not match the manifest's sha256 (corrupt or modified); re-run `nectar fit`")
    try:
        heads = NectarHeads(HeadsSpec(**{**manifest["spec"], "widths": tuple(manifest["spec"]["widths"])}))
    except (TypeError, ValueError) as e:
        raise NectarError(f"{art}/manifest.json: invalid heads spec ({e}); re-run `nectar fit`") from None
    try:
        state = load_file(str(path))
    except Exception as e:
        raise NectarError(f"{path}: unreadable ({e}); re-run `nectar fit`") from None
    missing = set(heads.state_dict()) ^ set(state)
    if missing:
        raise NectarError(f"{path}: tensors do not match the manifest's spec ({sorted(missing)[:3]})")
    want_shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    wrong = [k for k, v in state.items() if tuple(v.shape) != want_shapes[k]]
    if wrong:
        raise NectarError(f"{path}: tensor shapes do not match the manifest's spec ({', '.join(sorted(wrong)[:3])}); "
                          "the artifact is corrupt: re-run `nectar fit`")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NectarError(f"{path}: non-finite values in {', '.join(sorted(bad)[:3])}; the artifact is corrupt: re-run `nectar fit`")
    heads.load_state_dict({k: v.float() for k, v in state.items()})
    return heads.to(device).eval()


def load_retained(art: str | Path, manifest: dict, model_cfg, device="cpu") -> RetainedKV | None:
    """The retained heads' stored keys/values (decoded to fp32 on `device`), None when the artifact keeps none;
    checked against the manifest (sha256, modules, shapes) and the model (layers, heads, global layers)."""
    from safetensors.torch import load_file

    info = manifest.get("retained")
    if not info:
        return None
    path = Path(art) / RETAINED_FILE
    mf = Path(art) / "manifest.json"
    if not isinstance(info, dict) or manifest.get("variant", "mlp") != "mlp":
        raise NectarError(f"{mf}: retained heads need an mlp artifact with a retained object in the manifest; "
                          "the artifact is corrupt: re-run `nectar fit`")
    if not path.is_file():
        raise NectarError(f"{art}: artifact is incomplete ({RETAINED_FILE} missing); re-run `nectar fit`")
    if sha256_file(path) != info.get("sha256"):
        raise NectarError(f"{path}: contents do not match the manifest's sha256 (corrupt or modified); re-run `nectar fit`")
    try:
        modules = sorted((int(l), int(j)) for l, j in info["modules"])
    except (KeyError, TypeError, ValueError):
        raise NectarError(f"{mf}: retained.modules must be a list of [layer, kv_head] pairs; re-run `nectar fit`") from None
    bad = [(l, j) for l, j in modules if not (0 <= l < model_cfg.num_layers and 0 <= j < model_cfg.num_kv_heads)
           or model_cfg.layer_windows[l]]
    if bad or len(set(modules)) != len(modules):
        raise NectarError(f"{mf}: retained heads {bad or modules} do not fit the model (global-attention layers, "
                          f"{model_cfg.num_kv_heads} KV heads each); re-run `nectar fit`")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise NectarError(f"{path}: unreadable ({e}); re-run `nectar fit`") from None
    doc = manifest["document"]
    n_doc = doc["n_tokens"] - doc.get("prefix_tokens", 0)
    c = info.get("tokens", n_doc)  # per retained head: every document token, or a token budget
    if not isinstance(c, int) or not 0 < c <= n_doc:
        raise NectarError(f"{mf}: retained.tokens must be a token count in 1..{n_doc} (got {c!r}); re-run `nectar fit`")
    dtype = info.get("dtype", "float16")
    if dtype not in RETAIN_DTYPES:
        raise NectarError(f"{mf}: retained.dtype {dtype!r} is not one of {RETAIN_DTYPES}; re-run `nectar fit`")
    for l in sorted({l for l, _ in modules}):
        heads = sum(1 for m in modules if m[0] == l)
        for kind in ("key", "value"):
            for part, (shape, want_dtype) in stored_shapes(heads, c, model_cfg.head_dim, dtype).items():
                name = f"layers.{l}.{kind}" + (f".{part}" if part else "")
                t = state.get(name)
                if t is None or tuple(t.shape) != shape or t.dtype != want_dtype or not bool(torch.isfinite(t.float()).all()):
                    raise NectarError(f"{path}: {name} is missing, not {list(shape)} {str(want_dtype).removeprefix('torch.')} "
                                      "or not finite; the artifact is corrupt: re-run `nectar fit`")
        if c < n_doc:  # a token budget: the kept tokens' document indices, per head ascending and distinct
            t = state.get(f"layers.{l}.tokens")
            ok = t is not None and tuple(t.shape) == (heads, c) and t.dtype == torch.int32 and \
                bool(((t >= 0) & (t < n_doc)).all()) and bool((t.diff(dim=-1) > 0).all())
            if not ok:
                raise NectarError(f"{path}: layers.{l}.tokens is missing, not [{heads}, {c}] int32 or not ascending "
                                  f"indices below {n_doc}; the artifact is corrupt: re-run `nectar fit`")
    return RetainedKV.from_state(modules, state, doc.get("prefix_tokens", 0), dtype, device)
