"""`nectar profile`: argument definitions only (torch-free; the work is in profile.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nectar_runtime.cli import positive_int
from nectar_runtime.errors import NectarError
from nectar_runtime.files import check_output_file

from .shapes import DTYPES, SHAPES, ProfileConfig


def _int_list(text: str, what: str) -> tuple[int, ...]:
    example = {"n": "1024,8192", "batch": "1,16"}[what]
    try:
        vals = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise NectarError(f"--{what} {text!r}: give comma-separated positive integers, e.g. {example}") from None
    if not vals or min(vals) < 1:
        raise NectarError(f"--{what} {text!r}: give comma-separated positive integers, e.g. {example}")
    return vals


def profile_config(a: argparse.Namespace) -> ProfileConfig:
    if a.model and a.shape:
        raise NectarError("give --model or --shape, not both")
    if a.bundle and a.backend != "ort":
        raise NectarError("--bundle is for --backend ort")
    d = ProfileConfig()
    if a.bundle and (a.n != ",".join(map(str, d.n)) or a.methods != ",".join(d.methods)):
        raise NectarError("--backend ort --bundle: each bundle's method and n come from the bundle; leave out --n and --methods")
    shape = a.shape or (None if a.model else "smollm2-135m")
    if shape is not None and shape not in SHAPES:
        raise NectarError(f"--shape {shape!r}: known shapes are {', '.join(SHAPES)}")
    if a.dtype and a.backend == "ort":
        raise NectarError("--dtype is for the torch backend: --backend ort runs each bundle in the dtype it was exported in")
    dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise NectarError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    methods = tuple(m.strip() for m in a.methods.split(","))
    if not methods or any(m not in ("nectar", "full") for m in methods):
        raise NectarError(f"--methods {a.methods!r}: use nectar, full or nectar,full")
    if a.variant not in ("mlp", "quadrature"):
        raise NectarError(f"--variant {a.variant!r}: use mlp or quadrature")
    if a.steps < 100:
        raise NectarError(f"--steps {a.steps}: at least 100 timed steps")
    if a.warmup < 0:
        raise NectarError(f"--warmup {a.warmup}: must be 0 or more")
    for name in ("local_len", "width"):
        if getattr(a, name) < 1:
            raise NectarError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be positive")
    return ProfileConfig(model=a.model, shape=shape, device=a.device, backend=a.backend, n=_int_list(a.n, "n"),
                         batch=_int_list(a.batch, "batch"), dtype=dtype, methods=methods, variant=a.variant,
                         width=a.width, local_len=a.local_len, steps=a.steps, warmup=a.warmup,
                         bundles=tuple(a.bundle), threads=a.threads)


def check_plot_format(path: str) -> None:
    """Refuse a --plot file name whose extension matplotlib cannot write (or matplotlib missing)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise NectarError("--plot needs matplotlib (pip install matplotlib)") from None
    kinds = Figure().canvas.get_supported_filetypes()
    ext = Path(path).suffix.lstrip(".").lower()
    if ext not in kinds:
        raise NectarError(f"--plot {path}: {'.' + ext if ext else 'no extension'} is not an image format matplotlib "
                          f"writes; use .png (or {', '.join('.' + k for k in sorted(kinds) if k != 'png')})")


def cmd_profile(a: argparse.Namespace) -> int:
    from .profile import run_profile

    cfg = profile_config(a)  # validate everything before touching a device
    check_output_file(a.json, "--json records")
    if a.plot:
        check_output_file(a.plot, "--plot image")
        check_plot_format(a.plot)  # before minutes of measuring, not after
    run_profile(cfg, json_out=a.json, plot_out=a.plot)
    return 0


def add_profile_command(sub) -> None:
    d = ProfileConfig()
    p = sub.add_parser("profile", help="per-token decode latency of Nectar vs full attention on this device")
    p.add_argument("--model", default=None, help="a model name, .gguf or HF dir (real weights; synthetic document KV and heads)")
    p.add_argument("--shape", default=None, help=f"random weights of a known shape: {', '.join(SHAPES)} (default smollm2-135m)")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default %(default)s)")
    p.add_argument("--backend", default=d.backend, help="torch (default) or ort (needs an ONNX bundle)")
    p.add_argument("--n", default=",".join(map(str, d.n)), help="document lengths, comma-separated (default %(default)s)")
    p.add_argument("--batch", default=",".join(map(str, d.batch)), help="batch sizes sharing the document (default %(default)s)")
    p.add_argument("--dtype", default=None, help=f"{', '.join(DTYPES)} (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--methods", default=",".join(d.methods), help="nectar, full or both (default %(default)s)")
    p.add_argument("--variant", default=d.variant, help="Nectar heads: mlp or quadrature (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="Nectar head width (mlp) or nodes (quadrature) per layer (default %(default)s)")
    p.add_argument("--local-len", type=int, default=d.local_len, help="local tokens already in the cache (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed decode steps per point, >= 100 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (default %(default)s)")
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="--backend ort: an exported bundle to time (repeatable; its method and n come from it)")
    p.add_argument("--threads", type=positive_int, default=None, help="--backend ort: CPU threads (default: all cores)")
    p.add_argument("--json", required=True, metavar="OUT.json", help="write the records here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="latency vs n plot (needs matplotlib)")
    p.set_defaults(func=cmd_profile)
