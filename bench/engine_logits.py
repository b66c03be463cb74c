"""Next-token logits from SGLang's own engine, one plugin mode per process, and their comparison.

    python -m bench.engine_logits run --model-path DIR --out off.pt [--batch-sizes 1,8,64] [-- sglang flags]
        (the mode comes from the environment: SGLANG_ADAPTIVE_MOE*, as the serving benchmark sets it)
    python -m bench.engine_logits compare off.pt measure.pt triton.pt triton_kernels.pt

Dummy weights are drawn per parameter in the layout the MoE runner backend loads, so only
runs with the same weight layout hold the same model: compare the plugin's modes (which keep
the Triton layout) with stock `--moe-runner-backend triton`, not with stock `auto` (which
loads GPT-OSS in the triton_kernels layout).

`run` loads the model with SGLang's one-batch benchmark code (ModelRunner, its prefill and
decode CUDA-graph runners; dummy weights are seeded, so every process holds the same
model), prefills fixed random prompts at each batch size and takes a few greedy decode
steps on fixed tokens (the same in every mode), saving every step's next-token logits
(fp32, CPU). `compare` checks each file against the first with the bf16 tolerance of
`moe_dispatch.testing` and prints a table (with how often the argmax token agrees); it
exits 1 when a pair is out of tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.serving.driver import ENGINE_FLAGS
from moe_dispatch.sglang_plugin.settings import from_env
from moe_dispatch.testing import TOLERANCES, error_stats

DEFAULT_BATCH_SIZES = (1, 8, 64)
DEFAULT_INPUT_LEN = 64
DECODE_STEPS = 3
# The serving benchmark's engine flags (what our GPU machine's SGLang needs), on dummy weights.
STOCK_FLAGS = ("--load-format", "dummy", *ENGINE_FLAGS, "--mem-fraction-static", "0.6")


def _load(model_path: str, batch_sizes: tuple[int, ...], extra: list[str]):
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the one-batch code does not; a server (and each scheduler) does
    from sglang.benchmark.one_batch import load_model
    from sglang.srt.server_args import PortArgs, ServerArgs, prepare_server_args

    argv = ["--model-path", model_path, *STOCK_FLAGS, "--cuda-graph-max-bs", str(max(batch_sizes)), *extra]
    server_args: ServerArgs = prepare_server_args(argv)
    # The one-batch benchmark's main does this before loading: it makes the resolved MoE runner
    # backend (stock GPT-OSS: triton_kernel) the one the layers are built with.
    from sglang.srt.layers.moe import initialize_moe_config

    initialize_moe_config(server_args)
    port_args = PortArgs.init_new(server_args)
    runner, _tokenizer = load_model(server_args, port_args, gpu_id=0, tp_rank=0)
    return runner


def run(
    model_path: str, out: Path, batch_sizes: tuple[int, ...], input_len: int, extra: list[str], label: str | None = None
) -> None:
    import numpy as np
    from sglang.benchmark.one_batch import prepare_synthetic_inputs_for_latency_test

    runner = _load(model_path, batch_sizes, extra)
    settings = from_env(os.environ)
    mode = label or ("off" if not settings.enabled else settings.kernel or settings.policy)
    saved: dict[str, torch.Tensor] = {}
    for bs in batch_sizes:
        rng = np.random.default_rng(bs)
        prompts = rng.integers(0, 1000, (bs, input_len), dtype=np.int32).tolist()
        reqs = prepare_synthetic_inputs_for_latency_test(bs, input_len, custom_inputs=prompts)
        with torch.inference_mode():
            next_ids, logits, batch = runner.extend(reqs)
            saved[f"bs{bs}-prefill"] = logits.float().cpu()
            for step in range(DECODE_STEPS):
                # Fixed tokens, not the argmax: every mode then decodes the same sequence.
                fed = torch.as_tensor(rng.integers(0, 1000, bs), device=next_ids.device, dtype=next_ids.dtype)
                _ids, logits = runner.decode(fed, batch)
                saved[f"bs{bs}-decode{step + 1}"] = logits.float().cpu()
        runner.cleanup(batch)
        runner.clear()
        print(f"[engine_logits] {mode}: bs={bs} prefill + {DECODE_STEPS} decode steps", flush=True)
    torch.save({"mode": mode, "logits": saved}, out)
    print(f"[engine_logits] saved {len(saved)} logits tensors to {out}", flush=True)


def compare(paths: list[Path]) -> bool:
    """Print each file's agreement with the first; True when every pair is within bf16 tolerance."""
    tol = TOLERANCES[torch.bfloat16]
    base = torch.load(paths[0])
    ok = True
    print(f"| vs {base['mode']} | step | rms rel | max rel | argmax agree | within bf16 tol |")
    print("|---|---|--:|--:|--:|---|")
    for path in paths[1:]:
        other = torch.load(path)
        for key, want in base["logits"].items():
            got = other["logits"].get(key)
            if got is None or got.shape != want.shape:
                print(f"| {other['mode']} | {key} | missing | | | no |")
                ok = False
                continue
            stats = error_stats(got, want)
            agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
            good = stats.within(tol)
            ok = ok and good
            verdict = "yes" if good else "NO"
            print(f"| {other['mode']} | {key} | {stats.rms:.2e} | {stats.max:.2e} | {agree:.0%} | {verdict} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m bench.engine_logits", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="load the model once and save next-token logits")
    run_p.add_argument("--model-path", required=True)
    run_p.add_argument("--out", type=Path, required=True)
    run_p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    run_p.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN)
    run_p.add_argument("--label", default=None, help="name in the comparison table (default: the plugin mode)")
    cmp_p = sub.add_parser("compare", help="compare saved logits with the first file's")
    cmp_p.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        sizes = tuple(int(s) for s in args.batch_sizes.split(","))
        if not sizes or min(sizes) < 1:
            parser.error(f"--batch-sizes must be positive ints, got {args.batch_sizes!r}")
        run(args.model_path, args.out, sizes, args.input_len, extra, args.label)
        return 0
    if len(args.files) < 2:
        parser.error("compare needs at least two files")
    return 0 if compare(args.files) else 1


if __name__ == "__main__":
    sys.exit(main())
