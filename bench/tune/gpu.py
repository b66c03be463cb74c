"""The real `time_configs` and `check` for search.py: SGLang's Triton fused_moe on a CUDA GPU.

One `GpuTuner` per shape holds the random weights and one set of static inputs (fixed
seeds; bucket b reads the first b rows). A candidate pair (up, down) is a
`TunedTritonKernel` whose config_for returns that pair, so graph capture bakes it in.
Per chunk of pairs (`time_configs`; `replays` overrides the timed replays for one call):
    each kernel runs once eagerly (Triton compiles here; a config it cannot build fails
    here with its own error and is not captured)
    -> graphs.measure.measure_buckets(the rest, at the one bucket, a fresh graph pool)
    -> median replay ms per pair; a pair whose capture failed is reported as `dropped`
    -> the Measurement is dropped and the cache emptied, so memory stays flat
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from bench.tune.search import Pair, StopTuning
from graphs.measure import TimingPlan, measure_buckets
from moe_dispatch.spec import MoESpec
from moe_dispatch.tuned_configs import BucketConfig, TileConfig

MAX_ERROR_CHARS = 300  # Triton errors can carry whole IR dumps
TUNE_TIMING = TimingPlan(warmup=5, replays=50)


def _short(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _device_error() -> str | None:
    """None while the CUDA context still works; after a sticky error (e.g. an illegal address) why not."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception as error:
        return _short(error)
    return None


class SetupError(RuntimeError):
    """The GPU side cannot start: no CUDA GPU, no SGLang, or a spec its Triton fused_moe cannot run."""


class GpuTuner:
    """Times candidate pairs for one spec at any bucket up to `max_bucket`."""

    def __init__(
        self,
        spec: MoESpec,
        max_bucket: int,
        seed: int = 0,
        timing: TimingPlan = TUNE_TIMING,
    ) -> None:
        from graphs.capture import require_cuda
        from moe_dispatch import ExpertWeights, random_inputs
        from moe_dispatch.backends.sglang_triton import SGLangTritonBackend
        from moe_dispatch.backends.sglang_triton_tuned import SGLangTritonTunedBackend

        try:
            require_cuda("bench.tune")
        except RuntimeError as error:
            raise SetupError(str(error)) from None
        self.backend = SGLangTritonTunedBackend()
        for answer in (self.backend.availability(), SGLangTritonBackend.supports(self.backend, spec)):
            if not answer:
                raise SetupError(
                    f"bench.tune cannot run SGLang's Triton fused_moe for {spec.describe()}: {answer.reason}"
                )
        self.spec, self.timing = spec, timing
        self.weights = ExpertWeights.random(spec, device="cuda", seed=seed)
        self.inputs = random_inputs(spec, max_bucket, device="cuda", seed=seed)
        self.stream = torch.cuda.Stream()

    def kernel(self, up: TileConfig, down: TileConfig):
        config = BucketConfig(up, down)
        return self.backend.build(self.spec, self.weights, lambda _num_tokens: config)

    def _args(self, bucket: int) -> tuple[torch.Tensor, ...]:
        if bucket > self.inputs[0].shape[0]:
            raise ValueError(f"bucket {bucket} exceeds the static inputs' {self.inputs[0].shape[0]} rows")
        return tuple(t[:bucket] for t in self.inputs)

    def time_configs(
        self, bucket: int, pairs: Mapping[str, Pair], replays: int | None = None
    ) -> dict[str, float | str | None]:
        """{label: median replay ms, or why the pair failed}. The pairs are captured and timed
        one after another in their order; `replays`: timed replays per pair for this call
        (None: the tuner's TimingPlan; the confirm phase asks for more)."""
        timing = self.timing if replays is None else TimingPlan(self.timing.warmup, replays)
        args = self._args(bucket)
        results: dict[str, float | str | None] = {}
        variants = {}
        for label, (up, down) in pairs.items():
            kernel = self.kernel(up, down)
            try:
                kernel(*args)  # compiles both configs; a refused config fails here, alone
                torch.cuda.synchronize()
            except Exception as error:
                results[label] = _short(error)
                broken = _device_error()
                if broken is not None:  # nothing more can run in this process; record the culprit
                    raise StopTuning(f"the CUDA context broke running {label}: {broken}", results) from error
                continue
            variants[label] = kernel
        if variants:
            results.update(self._measure(bucket, variants, args, timing))
        torch.cuda.empty_cache()
        return results

    def _measure(
        self, bucket: int, variants: Mapping, args: tuple, timing: TimingPlan
    ) -> dict[str, float | str | None]:
        pool = torch.cuda.graph_pool_handle()
        try:
            with warnings.catch_warnings():  # dropped variants come back in `dropped`; no warning each
                warnings.filterwarnings("ignore", message="dropping variant", category=RuntimeWarning)
                measurement = measure_buckets(variants, args, [bucket], pool, self.stream, timing=timing)
        except RuntimeError as error:  # every variant of the chunk failed to capture
            failed: dict[str, float | str | None] = dict.fromkeys(variants, _short(error))
            broken = _device_error()
            if broken is not None:  # the culprit is one of these; all are recorded failed, never retried
                raise StopTuning(f"the CUDA context broke capturing {sorted(variants)}: {broken}", failed) from error
            return failed
        (result,) = measurement.results
        out: dict[str, float | str | None] = {}
        for label in variants:
            if label in result.dropped:
                out[label] = _short(result.dropped[label])
            else:
                out[label] = result.timings_ms[label].median_ms
        del measurement, result
        return out

    def check(self, bucket: int, up: TileConfig, down: TileConfig) -> str | None:
        """None when the pair's output at `bucket` matches the torch reference, else why not."""
        from moe_dispatch import reference_moe
        from moe_dispatch.testing import TOLERANCES, error_stats

        x, logits = self._args(bucket)
        try:
            out = self.kernel(up, down)(x, logits)
        except Exception as error:
            return _short(error)
        stats = error_stats(out, reference_moe(self.spec, self.weights, x, logits))
        tol = TOLERANCES[self.spec.dtype]
        del out
        torch.cuda.empty_cache()
        if stats.within(tol):
            return None
        return f"{stats.describe()} exceeds tolerance rms<={tol.rms:g} max<={tol.max:g}"
