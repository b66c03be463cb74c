"""CPU tests of the bf16-only FlashInfer module's source selection, symbol check and loader swap."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from moe_dispatch.backends import flashinfer_slim as slim

TMA_BF16 = "INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16,"
TMA_FP8 = "INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, __nv_fp8_e4m3, __nv_fp8_e4m3, __nv_bfloat16,"
SM80_BF16 = "template void sm80_generic_fused_moe_gemm_kernelLauncher<cutlass::bfloat16_t, cutlass::bfloat16_t, 16"
MIXED_BF16 = (
    "template void sm90_generic_mixed_gemm_kernelLauncher<__nv_fp8_e4m3, cutlass::uint4b_t, half, __nv_bfloat16"
)

TEXTS = {  # what each generated file holds (a few lines of what FlashInfer's generator writes)
    "gemm_grouped/90/cutlass_kernel_file_gemm_grouped_sm90_M128_group7.generated.cu": TMA_BF16,
    "gemm_grouped/90/cutlass_kernel_file_gemm_grouped_sm90_M128_group1.generated.cu": TMA_FP8,
    "gemm_grouped/80/cutlass_kernel_file_gemm_grouped_sm80_M16_group2.generated.cu": SM80_BF16 + "\n" + "half",
    "gemm/90/cutlass_kernel_file_gemm_sm90_M128_group7.generated.cu": MIXED_BF16,  # no grouped bf16 x bf16
}
HAND_WRITTEN = [
    "moe_gemm/moe_gemm_tma_warp_specialized_input.cu",
    "moe_gemm/moe_gemm_kernels_fp8_fp8.cu",
    "moe_gemm/moe_gemm_kernels_bf16_bf16.cu",
    "moe_gemm/moe_gemm_kernels_bf16_fp4.cu",
    "fp8_blockscale_gemm/fp8_blockscale_gemm.cu",
    "cutlass_backend/flashinfer_cutlass_fused_moe_binding.cu",
    "cutlass_backend/cutlass_fused_moe_instantiation.cu",
    "common/logger.cpp",
]


def _sources() -> list[Path]:
    return [Path(p) for p in HAND_WRITTEN[:4]] + [Path(p) for p in TEXTS] + [Path(p) for p in HAND_WRITTEN[4:]]


def _read(path: Path) -> str:
    return TEXTS[str(path)]


def test_keeps_bf16_kernels_and_every_hand_written_source_but_other_pairs():
    kept = [str(p) for p in slim.slim_sources(_sources(), _read)]
    assert kept == [
        "moe_gemm/moe_gemm_tma_warp_specialized_input.cu",
        "moe_gemm/moe_gemm_kernels_bf16_bf16.cu",
        "gemm_grouped/90/cutlass_kernel_file_gemm_grouped_sm90_M128_group7.generated.cu",
        "gemm_grouped/80/cutlass_kernel_file_gemm_grouped_sm80_M16_group2.generated.cu",
        *HAND_WRITTEN[4:],
    ]  # in FlashInfer's order: fp8 x fp8, bf16 x fp4, the fp8 TMA file and the mixed GEMM file are left out


def test_a_source_list_without_what_the_module_needs_is_refused():
    no_kernels = [p for p in _sources() if not p.name.endswith(".generated.cu")]
    with pytest.raises(ValueError, match="bf16 x bf16 grouped GEMM"):
        slim.slim_sources(no_kernels, _read)
    no_pair_file = [p for p in _sources() if p.name != slim.KEPT_PAIR_FILE]
    with pytest.raises(ValueError, match="another FlashInfer version"):
        slim.slim_sources(no_pair_file, _read)


@dataclasses.dataclass
class FakeSpec:  # the fields of FlashInfer's JitSpec that slim_spec touches or must keep
    name: str
    sources: list[Path]
    extra_cuda_cflags: list[str]


def test_slim_spec_renames_and_filters_but_keeps_flags(monkeypatch, tmp_path):
    files = []
    for rel, text in TEXTS.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files.append(path)
    pair_files = [tmp_path / "moe_gemm_kernels_fp16_fp16.cu", tmp_path / slim.KEPT_PAIR_FILE]
    full = FakeSpec("fused_moe_90", [*pair_files, *files], ["-DENABLE_BF16", "-DENABLE_FP8"])
    spec = slim.slim_spec(full)
    assert spec.name == slim.SLIM_NAME and spec.extra_cuda_cflags == full.extra_cuda_cflags
    assert [p.name for p in spec.sources] == [slim.KEPT_PAIR_FILE, files[0].name, files[2].name]
    assert full.name == "fused_moe_90" and len(full.sources) == 6  # FlashInfer's own spec is untouched


OWN_DATA = "_ZTVN12tensorrt_llm7kernels18CutlassMoeFCRunnerE"  # a vtable
OWN_CALL = "_ZN12tensorrt_llm7kernels13MoeGemmRunner7moeGemmEv"
LIBC = "memcpy@GLIBC_2.14"
RELOCATIONS = f"""
Relocation section '.rela.dyn' at offset 0x1000 contains 3 entries:
    Offset             Info             Type               Symbol's Value  Symbol's Name + Addend
0000000000001000  0000000100000001 R_X86_64_64            0000000000000000 {OWN_DATA} + 10
0000000000001008  0000000200000006 R_X86_64_GLOB_DAT      0000000000000000 {LIBC} + 0
0000000000001010  0000000000000008 R_X86_64_RELATIVE                         2000

Relocation section '.rela.plt' at offset 0x2000 contains 1 entry:
    Offset             Info             Type               Symbol's Value  Symbol's Name + Addend
0000000000003000  0000000300000007 R_X86_64_JUMP_SLOT     0000000000000000 {OWN_CALL} + 0
"""


def test_only_eager_undefined_symbols_of_flashinfers_code_are_reported():
    undefined = {OWN_DATA, OWN_CALL, LIBC}
    vtable = "vtable for tensorrt_llm::kernels::CutlassMoeFCRunner"
    assert slim.own_eager_undefined(RELOCATIONS, undefined) == [vtable]  # the call binds lazily; libc is not ours
    assert slim.own_eager_undefined(RELOCATIONS, {OWN_CALL, LIBC}) == []  # the vtable is defined in the library
    assert slim.demangle([OWN_CALL, LIBC])[1] == LIBC  # one c++filt run, one name per symbol


def test_install_points_flashinfers_loader_at_the_slim_spec(monkeypatch):
    cleared = []

    def get_cutlass_fused_moe_module(backend="100", use_fast_build=False):
        raise AssertionError("not called here")

    get_cutlass_fused_moe_module.cache_clear = lambda: cleared.append(True)
    core = types.ModuleType("flashinfer.fused_moe.core")
    core.gen_cutlass_fused_moe_sm90_module = lambda use_fast_build=False: "full"
    core.get_cutlass_fused_moe_module = get_cutlass_fused_moe_module
    package = types.ModuleType("flashinfer.fused_moe")
    package.core = core
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", package)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe.core", core)
    slim.install()
    assert core.gen_cutlass_fused_moe_sm90_module is slim.sm90_slim_spec and cleared == [True]
    slim.install()  # every prepare installs: the loaded module stays loaded
    assert cleared == [True]


def test_a_prebuilt_library_goes_to_the_ahead_of_time_path(tmp_path):
    built = tmp_path / "build" / f"{slim.SLIM_NAME}.so"
    built.parent.mkdir()
    built.write_bytes(b"\x7fELF slim")
    spec = types.SimpleNamespace(aot_path=tmp_path / "aot" / slim.SLIM_NAME / f"{slim.SLIM_NAME}.so")
    assert slim.place_prebuilt(built, spec) == spec.aot_path and spec.aot_path.read_bytes() == b"\x7fELF slim"
    with pytest.raises(FileNotFoundError):
        slim.place_prebuilt(tmp_path / "missing.so", spec)
    other = tmp_path / "fused_moe_90.so"
    other.write_bytes(b"full")
    with pytest.raises(ValueError, match="not the slim module"):
        slim.place_prebuilt(other, spec)


def test_cli_refuses_zero_jobs():
    with pytest.raises(SystemExit):
        slim.parse_args(["--jobs", "0"])


def test_module_choice_prefers_a_built_full_module_else_the_bf16_one():
    from moe_dispatch.backends.flashinfer_moe import MODULE_ENV, module_choice

    assert module_choice(full_built=False, environ={}) == "slim"
    assert module_choice(full_built=True, environ={}) == "full"
    assert module_choice(full_built=True, environ={MODULE_ENV: "slim"}) == "slim"
    assert module_choice(full_built=False, environ={MODULE_ENV: " full "}) == "full"
    with pytest.raises(ValueError, match="expected one of"):
        module_choice(full_built=False, environ={MODULE_ENV: "bf16"})


def test_with_the_bf16_module_in_use_fp16_is_refused_with_the_way_out(monkeypatch):
    import torch

    import moe_dispatch.backends.flashinfer_moe as fi
    from moe_dispatch import preset

    backend = fi.FlashInferCutlassBackend()
    fp16, bf16 = preset("mixtral-8x7b", dtype=torch.float16), preset("gpt-oss-120b", tp=8)
    monkeypatch.setattr(fi, "sm90_module", lambda: "slim")
    refused = backend.supports(fp16)
    assert not refused and fi.MODULE_ENV in refused.reason and slim.SLIM_NAME in refused.reason
    assert backend.supports(bf16)
    monkeypatch.setattr(fi, "sm90_module", lambda: "full")
    assert backend.supports(fp16)


class _FakeSpec:
    """A JitSpec stand-in: `build` writes the JIT library, as ninja's link step would."""

    name = slim.SLIM_NAME

    def __init__(self, root: Path, placed: bool) -> None:
        self.aot_path = root / "aot" / f"{slim.SLIM_NAME}.so"
        self.jit_library_path = root / "jit" / f"{slim.SLIM_NAME}.so"
        self.build_dir, self.sources, self.builds = root / "jit", [Path("a.cu")], 0
        if placed:
            self.aot_path.parent.mkdir(parents=True)
            self.aot_path.write_bytes(b"\x7fELF placed")

    @property
    def is_compiled(self) -> bool:
        return self.aot_path.exists() or self.jit_library_path.exists()

    def get_library_path(self) -> Path:
        return self.aot_path if self.aot_path.exists() else self.jit_library_path

    def build(self, verbose: bool) -> None:
        self.builds += 1
        self.jit_library_path.parent.mkdir(parents=True)
        self.jit_library_path.write_bytes(b"\x7fELF built")


@pytest.mark.parametrize("placed", [True, False], ids=["placed", "unbuilt"])
def test_cli_builds_only_a_missing_module_and_checks_the_one_in_use(monkeypatch, tmp_path, capsys, placed):
    spec = _FakeSpec(tmp_path, placed)
    checked: list[Path] = []
    for var in ("MAX_JOBS", "FLASHINFER_CUDA_ARCH_LIST"):  # main sets them; restored after the test
        monkeypatch.setenv(var, "unset")
    monkeypatch.setattr(slim, "sm90_slim_spec", lambda: spec)
    monkeypatch.setattr(slim, "check_library", lambda path: checked.append(path) or [])
    assert slim.main(["--jobs", "3", "--check"]) == 0
    assert spec.builds == (0 if placed else 1)
    assert checked == [spec.aot_path if placed else spec.jit_library_path]
    assert ("present" if placed else "built") in capsys.readouterr().out
