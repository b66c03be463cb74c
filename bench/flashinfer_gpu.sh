# FlashInfer's fused MoE on the GPU machine (no network): install the carried wheels, point the
# JIT build and its cache into the checkout, then run bench/flashinfer_probe.py.
#
# From the checkout root, after `source .gpu-deps/env.sh` (SGLang: the triton / triton_kernels
# columns and SGLang's router; without it the probe still runs flashinfer_cutlass):
#     source .gpu-deps/env.sh && bash bench/flashinfer_gpu.sh --out "$OUT/fi" --jit-budget 420
#     source .gpu-deps/env.sh && source bench/flashinfer_gpu.sh --env-only && python3 -m pytest -m gpu tests/test_flashinfer_gpu.py
# The call carries `.gpu-deps` and `.whl` (flashinfer_python-0.6.15.post1-py3-none-any.whl, made
# here with the device README's `pip download` line; apache-tvm-ffi comes from
# .gpu-deps/whl-engine unless .whl holds one).
#
# What it sets (each can be set before instead):
#   FI_SITE                   where the wheels go: .fi-cache/site. Not /tmp: FlashInfer's ninja file
#                             names the package's source files by path and ninja compares their
#                             mtimes, so they must stay put (and are reinstalled only when the wheel
#                             list changes) for a build to resume in a later call on the same machine.
#   FLASHINFER_WORKSPACE_BASE .fi-cache: the JIT cache is .fi-cache/.cache/flashinfer/0.6.15.post1/90a/
#                             (cached_ops/fused_moe_90/ objects and .so, generated/ kernel sources).
#   FLASHINFER_CUDA_ARCH_LIST 9.0a: names that folder; the SM90 MoE module is built for sm_90a only
#                             whatever it says (its nvcc flags are fixed in flashinfer/jit/fused_moe.py).
#   MAX_JOBS                  ninja jobs: the CPU count (`nproc`); one nvcc of these sources peaks
#                             near 6 GB, so 16 jobs fit the 128 GiB of an nvidia-h200 machine.
#   TVM_FFI_CACHE_DIR         .fi-cache/tvm-ffi, in case tvm-ffi builds its torch DLPack add-on.
#   CUDA_HOME                 the toolkit of the nvcc on PATH (FlashInfer would take nvcc's folder's parent).
#   FLASHINFER_EXTRA_{CUDAFLAGS,CFLAGS,LDFLAGS}
#                             only when the toolkit lacks what TensorRT-LLM's sources include or link
#                             (cublasLt.h, cublas_v2.h, nvrtc.h, curand_kernel.h; libnvrtc, libcudart,
#                             libcuda): found in the pip `nvidia-*` packages or the driver, libraries
#                             linked from .fi-cache/lib.

_fi_setup() {
  local root py site want whls tvm stamp helper
  root="$(pwd)"
  py="${PYTHON:-python3}"
  if ! ls "$root"/.whl/flashinfer_python-*.whl >/dev/null 2>&1; then
    echo "[fi] $root/.whl/flashinfer_python-*.whl missing: download it here and carry .whl" >&2
    return 1
  fi
  whls="$(ls "$root"/.whl/*.whl)"
  if ! printf '%s\n' $whls | grep -q '/apache_tvm_ffi-'; then
    tvm="$(ls "$root"/.gpu-deps/whl-engine/apache_tvm_ffi-*.whl 2>/dev/null | head -n 1)"
    [ -n "$tvm" ] || { echo "[fi] no apache-tvm-ffi wheel in .whl or .gpu-deps/whl-engine" >&2; return 1; }
    whls="$whls $tvm"
  fi
  site="${FI_SITE:-$root/.fi-cache/site}"
  want="$("$py" -c 'import sys; print(sys.version.split()[0])') $(printf '%s\n' $whls | xargs -n1 basename | sort | tr '\n' ' ')"
  stamp="$site/.fi-stamp"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$site" && mkdir -p "$site"
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" $whls \
      || { echo "[fi] pip install of the carried wheels into $site failed" >&2; return 1; }
    printf '%s' "$want" > "$stamp"
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"
  export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-$root/.fi-cache}"
  export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"
  export TVM_FFI_CACHE_DIR="${TVM_FFI_CACHE_DIR:-$root/.fi-cache/tvm-ffi}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if ! command -v ninja >/dev/null 2>&1; then  # pip's ninja puts its binary beside the interpreter
    PATH="$("$py" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
    export PATH
  fi
  command -v ninja >/dev/null 2>&1 || { echo "[fi] no ninja on PATH: FlashInfer's JIT needs it" >&2; return 1; }
  helper="$("$py" - "$root/.fi-cache/lib" <<'PYEOF'
import glob, os, re, shlex, subprocess, sys

libdir = sys.argv[1]
cuda = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
if not cuda:  # ask nvcc where its toolkit is: `nvcc` on PATH may be a wrapper script
    dry = subprocess.run(["nvcc", "-dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    cuda = os.path.realpath(top.group(1).strip()) if top else "/usr/local/cuda"
try:
    import nvidia  # the pip CUDA packages (torch's dependencies): a namespace package
    pip_roots = [p for path in nvidia.__path__ for p in sorted(glob.glob(os.path.join(path, "*")))]
except ImportError:
    pip_roots = []
toolkit_inc = [os.path.join(cuda, "include"), os.path.join(cuda, "targets", "x86_64-linux", "include")]
inc_flags, ld_flags, notes = [], [], []
for header in ("cuda_runtime.h", "cublasLt.h", "cublas_v2.h", "nvrtc.h", "curand_kernel.h"):
    if os.path.exists(os.path.join(cuda, "include", header)):
        continue
    found = [d for d in toolkit_inc[1:] + [os.path.join(r, "include") for r in pip_roots] + ["/usr/include"]
             if os.path.exists(os.path.join(d, header))]
    if not found:
        notes.append(f"{header} NOT FOUND: the fused-MoE build will fail")
        continue
    if f"-isystem {found[0]}" not in inc_flags:
        inc_flags.append(f"-isystem {found[0]}")
    notes.append(f"{header} from {found[0]}")
driver = [line.split("=>")[-1].strip() for line in subprocess.run(
    ["ldconfig", "-p"], capture_output=True, text=True).stdout.splitlines() if "libcuda.so.1 " in line]
for name in ("cudart", "nvrtc", "cuda"):
    if any(os.path.exists(os.path.join(cuda, d, f"lib{name}.so")) for d in ("lib64", "lib64/stubs")):
        continue
    pattern = [os.path.join(cuda, "targets", "x86_64-linux", "lib", f"lib{name}.so*")]
    pattern += [os.path.join(r, "lib", f"lib{name}.so*") for r in pip_roots]
    if name == "cuda":
        pattern = driver + ["/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                            os.path.join(cuda, "targets", "x86_64-linux", "lib", "stubs", "libcuda.so")]
    found = [f for p in pattern for f in sorted(glob.glob(p))]
    if not found:
        notes.append(f"lib{name}.so NOT FOUND: the fused-MoE link will fail")
        continue
    os.makedirs(libdir, exist_ok=True)
    link = os.path.join(libdir, f"lib{name}.so")
    if os.path.realpath(link) != os.path.realpath(found[0]):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.realpath(found[0]), link)
    if f"-L{libdir}" not in ld_flags:
        ld_flags.append(f"-L{libdir}")
    if name != "cuda":  # the driver's libcuda.so.1 is on the loader's path already
        ld_flags.append(f"-Wl,-rpath,{os.path.dirname(os.path.realpath(found[0]))}")
    notes.append(f"lib{name}.so -> {found[0]}")
print(f"export CUDA_HOME={shlex.quote(cuda)}")
for var, flags in (("FLASHINFER_EXTRA_CUDAFLAGS", inc_flags), ("FLASHINFER_EXTRA_CFLAGS", inc_flags),
                   ("FLASHINFER_EXTRA_LDFLAGS", ld_flags)):
    if flags:
        print(f"export {var}={shlex.quote(' '.join(flags))}")
print(f"echo {shlex.quote('[fi] CUDA_HOME=' + cuda + '; ' + ('; '.join(notes) or 'toolkit complete'))} >&2")
PYEOF
)" || { echo "[fi] CUDA layout check failed" >&2; return 1; }
  eval "$helper"
  echo "[fi] env ready: PYTHONPATH += $site; JIT cache $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer; MAX_JOBS=$MAX_JOBS" >&2
}

_fi_setup || { return 1 2>/dev/null || exit 1; }
if [ "${1:-}" = "--env-only" ]; then
  return 0 2>/dev/null || exit 0
fi
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" -m bench.flashinfer_probe "$@"
