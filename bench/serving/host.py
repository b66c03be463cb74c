"""What the driver knows about the machine, asked without initializing CUDA in the driver process.

The driver stays off the GPU (a CUDA context there would hold memory the runs need), so GPU name,
memory and count come from `nvidia-smi` (None where it is absent), and `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata

DEFAULT_GPU_BYTES = int(139.8 * 2**30)  # an H200 as torch sees it; used when nvidia-smi cannot say


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """The first visible GPU's name and memory (bytes), and how many GPUs are visible."""

    name: str | None
    memory_bytes: int | None
    count: int


def parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` -> (name, bytes)."""
    rows = []
    for line in text.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            rows.append((name.strip(), int(mib.strip()) * 2**20))
    return rows


def visible_count(total: int, environ: Mapping[str, str]) -> int:
    """GPUs a child process will see: CUDA_VISIBLE_DEVICES when set (empty: none), else all `total`."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return total
    return len([d for d in value.split(",") if d.strip() and d.strip() != "-1"])


def gpu_info(environ: Mapping[str, str] | None = None) -> GpuInfo:
    environ = os.environ if environ is None else environ
    if shutil.which("nvidia-smi") is None:
        return GpuInfo(None, None, visible_count(0, environ))
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return GpuInfo(None, None, 0)
    rows = parse_nvidia_smi(out)
    count = visible_count(len(rows), environ)
    if not rows:
        return GpuInfo(None, None, count)
    # With CUDA_VISIBLE_DEVICES the first visible GPU may not be row 0; all GPUs of our machines match.
    return GpuInfo(rows[0][0], rows[0][1], count)


def plugin_installed() -> bool:
    """Whether SGLang's plugin loader will find moe_dispatch (entry point group sglang.srt.plugins)."""
    return any(ep.name == "moe_dispatch" for ep in metadata.entry_points(group="sglang.srt.plugins"))
