"""The one mechanism behind moe-dispatch's scoped swaps of a library's module-level function
(matmul_ogs' `make_opt_flags` and `reduce`, SGLang's triton_kernels `routing`).

Inside the block the module's global is a wrapper around the original; on exit, even on an
error, the original is back. A module global is process-wide: this suits one thread issuing
MoE calls (a server's forward thread), not two threads launching the library at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def swapped_global(module: object | None, name: str, wrap: Callable[[Any], Any]) -> Iterator[Any]:
    """Inside the block `module.<name>` is `wrap(original)`; yields that, or None (nothing
    swapped) when `module` is None."""
    if module is None:
        yield None
        return
    original = getattr(module, name)
    installed = wrap(original)
    setattr(module, name, installed)
    try:
        yield installed
    finally:
        setattr(module, name, original)
