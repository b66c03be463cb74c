"""bench.tune: tune SGLang's Triton fused_moe tile configs per batch bucket (`python -m bench.tune`).

What: for each tensor-parallel shape of a preset and each batch bucket, find the tile
configs (BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps, num_stages) of the two matmuls of
one fused_moe call (gate/up and down) that make the call fastest under CUDA-graph
replay, and store them as a `moe_dispatch.tuned_configs.TunedTable` (read by the
`triton_tuned` backend).

How, per (shape, bucket):
    default  SGLang's own config for both matmuls, timed          -> default_ms
    up       coordinate descent over the up config (down: default at its block_m)
    down     coordinate descent over the down config at the up's block_m
    confirm  default pair and best pair timed side by side (one call), 3 rounds in
             alternating order with 4x the replays; the median tuned/default ratio decides
    store    the best pair if it wins the confirm by min_gain and matches the reference,
             else the default

    space.py   what is tried: spaces (small / full), block_m per bucket, resource filters
    search.py  the descent and the confirm, driven by an injected `time_configs` (CPU-testable)
    budget.py  the time budget and its per-config estimate
    plan.py    the dry run's per-bucket plan
    state.py   the resume file: every timed point (and confirm round) appended at once, never timed twice
    gpu.py     the real `time_configs`: graphs.measure.measure_buckets over TunedTritonKernel
    report.py  Markdown + JSON report
    tables.py  tables from a run's outcomes, or rebuilt from a report JSON (--table-from-report)
    __main__   the CLI
"""
