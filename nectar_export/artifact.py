"""The Nectar artifact: a directory with `heads.safetensors`, `manifest.json` and `document.txt`.

Written atomically (a temp dir beside the target, then rename); loaded without pickle; refused
when the base model's weights differ from the ones it was fitted on.

    manifest.json = {format_version, tool_version, created, base_model: {name, sha256, family,
                     format}, document: {sha256, n_tokens, chat}, variant, spec: {...},
                     widths, param_count, artifact_bytes, kv_bytes, fit_config, metrics, timings}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nectar_runtime import __version__
from nectar_runtime.errors import NectarError

from .heads import HeadsSpec, NectarHeads

FORMAT_VERSION = 1
STORE_DTYPE = torch.float16  # weights on disk; computed in fp32


def heads_state(heads: NectarHeads) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(STORE_DTYPE).contiguous() for k, v in heads.state_dict().items()}


def save_artifact(out: str | Path, heads: NectarHeads, manifest: dict, document_text: str) -> Path:
    """Write the artifact directory atomically; an existing `out` is replaced only on success."""
    from safetensors.torch import save_file

    state = heads_state(heads)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged fit: refuse before anything is on disk
        raise NectarError(f"{out}: the fitted heads hold non-finite values ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); "
                          "nothing written: retry with a lower --lr or another --seed, and report the model and document")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / "heads.safetensors"))
        (tmp / "document.txt").write_text(document_text, encoding="utf-8")
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "spec": asdict(heads.spec),
            "artifact_bytes": (tmp / "heads.safetensors").stat().st_size,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing an existing `out` only now."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_manifest(art: str | Path) -> dict:
    art = Path(art)
    if not art.is_dir():
        raise NectarError(f"{art}: no such artifact directory (make one with `nectar fit`)")
    mf = art / "manifest.json"
    if not mf.is_file():
        raise NectarError(f"{art}: not a Nectar artifact (no manifest.json)")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise NectarError(f"{mf}: corrupt manifest ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise NectarError(f"{mf}: unsupported artifact format_version {m.get('format_version')!r} (this tool reads {FORMAT_VERSION})")
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
    heads = NectarHeads(HeadsSpec(**{**manifest["spec"], "widths": tuple(manifest["spec"]["widths"])}))
    try:
        state = load_file(str(Path(art) / "heads.safetensors"))
    except Exception as e:
        raise NectarError(f"{art}/heads.safetensors: unreadable ({e}); re-run `nectar fit`") from None
    missing = set(heads.state_dict()) ^ set(state)
    if missing:
        raise NectarError(f"{art}/heads.safetensors: tensors do not match the manifest's spec ({sorted(missing)[:3]})")
    heads.load_state_dict({k: v.float() for k, v in state.items()})
    return heads.to(device).eval()
