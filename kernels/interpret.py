"""Run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), for tests.

With numpy ≥ 2.3 the interpreter's loop bounds (scalars held as 1-element arrays) fail to convert
to Python ints; `enable()` patches that one conversion. Set TRITON_INTERPRET=1 before the
kernels are first compiled (triton_nectar builds them lazily)."""

from __future__ import annotations

import os


def enable() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interp

    if getattr(interp, "_nectar_patched", False):
        return
    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._nectar_patched = True
