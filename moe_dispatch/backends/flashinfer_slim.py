"""A bf16-only build of FlashInfer's CUTLASS fused-MoE module for Hopper (`fused_moe_90_bf16`).

FlashInfer builds one module for every dtype pair it supports: 182 compile units for SM90
(154 generated kernel files and 28 hand-written sources), tens of minutes of nvcc on 16 cores,
longer than one call on the GPU machine we are lent. For bf16 activations and weights the module
needs 32 of them (docs/flashinfer-slim-build.md):
  * the generated files that instantiate a bf16 x bf16 grouped GEMM: the SM90 TMA
    warp-specialized kernels and the SM80 fused gated kernels (found by their text, since the
    generator numbers its files by tile height, not dtype);
  * every hand-written source except the thirteen `moe_gemm_kernels_<a>_<b>.cu` of other pairs.
The binding and the runner instantiations still mention the other pairs, but only through calls
that resolve lazily when the library is loaded, so a non-bf16 call would fail at its first use:
`flashinfer_cutlass` refuses every dtype but bf16 when this module is the one in use.
The flags, include paths and link flags are FlashInfer's own spec's, unchanged; only the name
(hence the build folder and the .so) and the source list differ.

    python -m moe_dispatch.backends.flashinfer_slim [--jobs N] [--check] [--prebuilt SO]

builds it through FlashInfer's JIT (ninja, resumable: an interrupted build continues) and with
`--check` lists undefined symbols of FlashInfer's own code that the loader would need at once.
`--prebuilt SO` places a library built elsewhere (same FlashInfer, CUDA and tvm-ffi versions) at
the spec's ahead-of-time path, which FlashInfer loads without compiling.
`install()` makes `flashinfer.fused_moe.cutlass_fused_moe` load this module instead of the full one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

SLIM_NAME = "fused_moe_90_bf16"
KEPT_PAIR_FILE = "moe_gemm_kernels_bf16_bf16.cu"
PAIR_FILE = re.compile(r"moe_gemm_kernels_\w+\.cu")
# How a generated file instantiates a bf16 x bf16 grouped GEMM (SM90 TMA / SM80 fused gated).
BF16_MARKERS = (
    "INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, __nv_bfloat16, __nv_bfloat16",
    "sm80_generic_fused_moe_gemm_kernelLauncher<cutlass::bfloat16_t, cutlass::bfloat16_t",
)
# Namespaces of FlashInfer's compiled code: an undefined symbol of theirs in the .so is ours to build.
OWN_NAMESPACES = ("tensorrt_llm", "flashinfer")


def keeps(source: Path, read: Callable[[Path], str] = Path.read_text) -> bool:
    """Whether the slim module compiles `source` (a path from FlashInfer's SM90 spec)."""
    if source.name.endswith(".generated.cu"):
        text = read(source)
        return any(marker in text for marker in BF16_MARKERS)
    if PAIR_FILE.fullmatch(source.name):
        return source.name == KEPT_PAIR_FILE
    return True


def slim_sources(sources: Iterable[Path], read: Callable[[Path], str] = Path.read_text) -> list[Path]:
    """`sources` that the bf16 module keeps, in order; ValueError when a needed kind is missing."""
    sources = list(sources)
    kept = [s for s in sources if keeps(s, read)]
    generated = [s for s in kept if s.name.endswith(".generated.cu")]
    if not generated:
        raise ValueError(f"none of {len(sources)} sources instantiates a bf16 x bf16 grouped GEMM")
    if not any(s.name == KEPT_PAIR_FILE for s in kept):
        raise ValueError(f"{KEPT_PAIR_FILE} is not among FlashInfer's sources: another FlashInfer version?")
    return kept


def slim_spec(full_spec: object) -> object:
    """FlashInfer's SM90 JitSpec with the slim name and sources (flags and paths unchanged)."""
    return dataclasses.replace(full_spec, name=SLIM_NAME, sources=slim_sources(full_spec.sources))


def sm90_slim_spec(use_fast_build: bool = False) -> object:
    """The slim spec for this FlashInfer install (runs its kernel generator, writes no object)."""
    from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module

    return slim_spec(gen_cutlass_fused_moe_sm90_module(use_fast_build))


def install() -> None:
    """Make FlashInfer's MoE wrapper load the slim module on SM90 (from the next module load on).
    Once installed, a later call changes nothing: clearing the loader's cache again would re-run
    FlashInfer's kernel generator and reload the library at every prepare."""
    import flashinfer.fused_moe.core as core

    if core.gen_cutlass_fused_moe_sm90_module is sm90_slim_spec:
        return
    core.gen_cutlass_fused_moe_sm90_module = sm90_slim_spec
    core.get_cutlass_fused_moe_module.cache_clear()


def own_eager_undefined(relocations: str, undefined: set[str]) -> list[str]:
    """Undefined symbols of FlashInfer's namespaces that a relocation other than a PLT jump slot
    needs (`readelf -rW` text), demangled: the loader resolves those at once, so they must be in
    the .so."""
    eager = set()
    for line in relocations.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "JUMP_SLOT" not in fields[2] and fields[4] in undefined:
            eager.add(fields[4])
    names = demangle(sorted(eager))
    return sorted(name for name in names if any(ns in name for ns in OWN_NAMESPACES))


def demangle(symbols: Sequence[str]) -> list[str]:
    """The symbols demangled by one `c++filt` run (as given when binutils is missing)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return list(symbols)
    names = out.stdout.splitlines()
    return names if len(names) == len(symbols) else list(symbols)


def check_library(so_path: Path) -> list[str]:
    """`own_eager_undefined` of a built library (needs binutils' readelf and nm)."""
    relocations = subprocess.run(["readelf", "-rW", str(so_path)], capture_output=True, text=True, check=True).stdout
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(so_path)], capture_output=True, text=True, check=True)
    undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    return own_eager_undefined(relocations, undefined)


def place_prebuilt(so_path: Path, spec: object) -> Path:
    """Copy a built slim library to `spec.aot_path`, where FlashInfer loads it without building."""
    if not so_path.is_file():
        raise FileNotFoundError(f"no built library at {so_path}")
    if so_path.name != f"{SLIM_NAME}.so":
        raise ValueError(f"{so_path.name} is not the slim module's library ({SLIM_NAME}.so)")
    target = Path(spec.aot_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(so_path, target)
    return target


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_dispatch.backends.flashinfer_slim", description=__doc__)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc jobs (MAX_JOBS)")
    p.add_argument("--check", action="store_true", help="after building, list eager undefined symbols of FlashInfer's")
    p.add_argument("--prebuilt", type=Path, help="place this built library instead of building")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["MAX_JOBS"] = str(args.jobs)
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    spec = sm90_slim_spec()
    if args.prebuilt is not None:
        print(f"[slim] placed {args.prebuilt} at {place_prebuilt(args.prebuilt, spec)}", flush=True)
        return 0
    if spec.is_compiled:  # placed (ahead-of-time path) or built before: nothing to compile
        so_path = spec.get_library_path()
        print(f"[slim] {spec.name} present: {so_path} ({so_path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    else:
        print(f"[slim] {spec.name}: {len(spec.sources)} sources, {args.jobs} jobs, into {spec.build_dir}", flush=True)
        t0 = time.time()
        spec.build(verbose=True)  # ninja prints [done/total] per unit
        so_path = spec.jit_library_path
        size_mib = so_path.stat().st_size / 2**20
        print(f"[slim] built {so_path} ({size_mib:.1f} MiB) in {time.time() - t0:.0f} s", flush=True)
    if args.check:
        missing = check_library(so_path)
        print(f"[slim] eager undefined symbols of FlashInfer's own code: {len(missing)}", flush=True)
        for symbol in missing[:40]:
            print(f"  {symbol}")
        return 1 if missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
