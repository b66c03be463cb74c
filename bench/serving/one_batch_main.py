"""What each serving-benchmark run executes: SGLang's one-batch benchmark, with SGLang's plugins loaded.

    python -m bench.serving.one_batch_main <sglang.benchmark.one_batch flags>

SGLang's one-batch benchmark does not call SGLang's plugin loader (the server, the Engine and each
scheduler process do), so this module calls `load_plugins()` itself. Both that call and the point
filter (`points.restrict_points`, enabled by MOE_DISPATCH_BENCH_POINTS) sit at module level: with
`--tp-size N` one_batch spawns one process per rank, and each re-imports this module as its main
module, so every rank loads the plugins and filters the same points. Then one_batch's own
`cli_main()` runs unchanged.
"""

import os

from sglang.srt.plugins import load_plugins

load_plugins()

if os.environ.get("MOE_DISPATCH_BENCH_POINTS"):
    from sglang.benchmark import one_batch

    from bench.serving.points import POINTS_ENV, decode_points, restrict_points

    restrict_points(one_batch, decode_points(os.environ[POINTS_ENV]))

if __name__ == "__main__":
    from sglang.benchmark.one_batch import cli_main

    cli_main()
