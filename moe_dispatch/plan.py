"""Plans: bucket -> kernel with every candidate's median time, plus the metadata that
says where the numbers hold. Saved as JSON so a restart skips measurement.

A plan is used only when its metadata equals this process's (GPU name and SM count,
torch / Triton / SGLang / triton_kernels versions, the spec, the buckets, the
candidate kernels). Otherwise it is refused with a warning naming each mismatch and
the caller measures again; a missing or corrupt file is a warning, never fatal. A plan
naming a kernel outside its own metadata's candidates (per bucket or as the eager
kernel above the largest bucket) counts as corrupt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

from moe_dispatch.spec import MoESpec

FORMAT = "moe-dispatch-plan"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class PlanMetadata:
    gpu: str
    sm_count: int
    torch: str
    triton: str
    sglang: str | None
    triton_kernels: str | None
    spec: dict
    buckets: tuple[int, ...]
    kernels: tuple[str, ...]
    world_size: int = 1

    @staticmethod
    def current(spec: MoESpec, buckets: tuple[int, ...], kernels: tuple[str, ...], world_size: int = 1) -> PlanMetadata:
        """This process's metadata (needs CUDA for the GPU fields)."""
        import torch
        import triton

        from moe_dispatch.backends.sglang_env import sglang_version
        from moe_dispatch.backends.triton_kernels_backend import triton_kernels_generation

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return PlanMetadata(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            torch=torch.__version__,
            triton=triton.__version__,
            sglang=sglang_version(),
            triton_kernels=triton_kernels_generation(),
            spec=spec.to_json(),
            buckets=tuple(buckets),
            kernels=tuple(kernels),
            world_size=world_size,
        )

    def mismatches(self, other: PlanMetadata) -> list[str]:
        """'field: plan has X, here Y' for each differing field."""
        out = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                out.append(f"{field.name}: plan has {mine!r}, here {theirs!r}")
        return out


@dataclasses.dataclass(frozen=True)
class BucketChoice:
    bucket: int
    kernel: str
    times_ms: dict[str, float]  # median replay time per candidate; empty when not measured


@dataclasses.dataclass(frozen=True)
class Plan:
    metadata: PlanMetadata
    policy: str
    choices: tuple[BucketChoice, ...]
    eager_kernel: str

    def winners(self) -> dict[int, str]:
        return {c.bucket: c.kernel for c in self.choices}

    def to_json(self) -> dict:
        meta = dataclasses.asdict(self.metadata)
        meta["buckets"] = list(self.metadata.buckets)
        meta["kernels"] = list(self.metadata.kernels)
        return {
            "format": FORMAT,
            "version": VERSION,
            "metadata": meta,
            "policy": self.policy,
            "eager_kernel": self.eager_kernel,
            "choices": [dataclasses.asdict(c) for c in self.choices],
        }

    @staticmethod
    def from_json(data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"not a moe-dispatch plan (format={data.get('format') if isinstance(data, dict) else None!r})"
            )
        if data.get("version") != VERSION:
            raise ValueError(f"plan format version {data.get('version')!r}, expected {VERSION}")
        try:
            meta = dict(data["metadata"])
            meta["buckets"] = tuple(int(b) for b in meta["buckets"])
            meta["kernels"] = tuple(meta["kernels"])
            choices = tuple(
                BucketChoice(int(c["bucket"]), str(c["kernel"]), {k: float(v) for k, v in c["times_ms"].items()})
                for c in data["choices"]
            )
            plan = Plan(PlanMetadata(**meta), str(data["policy"]), choices, str(data["eager_kernel"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed plan: {type(error).__name__}: {error}") from None
        if tuple(c.bucket for c in plan.choices) != plan.metadata.buckets:
            raise ValueError("malformed plan: choices do not cover the metadata's buckets in order")
        unknown = {c.kernel for c in plan.choices} - set(plan.metadata.kernels)
        if unknown:
            raise ValueError(f"malformed plan: chosen kernel(s) {sorted(unknown)} not among {plan.metadata.kernels}")
        # The eager kernel indexes the prepared kernels at capture; an unknown name there was a bare KeyError.
        if plan.eager_kernel not in plan.metadata.kernels:
            raise ValueError(f"malformed plan: eager kernel {plan.eager_kernel!r} not among {plan.metadata.kernels}")
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): a crash never leaves half a plan."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> Plan:
        """ValueError for a corrupt or foreign file; OSError when it cannot be read."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"plan file {path} is not valid JSON: {error}") from None
        return Plan.from_json(data)


def load_matching_plan(path: str | os.PathLike | None, expected: PlanMetadata) -> Plan | None:
    """The plan at `path` if it exists, parses and matches `expected`; else None with a warning."""
    if path is None or not Path(path).exists():
        return None
    try:
        plan = Plan.load(path)
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring plan {path}: {error}; measuring again", stacklevel=2)
        return None
    problems = plan.metadata.mismatches(expected)
    if problems:
        warnings.warn(f"ignoring stale plan {path} ({'; '.join(problems)}); measuring again", stacklevel=2)
        return None
    return plan
