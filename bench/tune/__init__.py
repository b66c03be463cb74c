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
    store    the best pair if it beats default_ms and matches the reference, else the default

    space.py   what is tried: spaces (small / full), block_m per bucket, resource filters
    search.py  the descent, driven by an injected `time_configs` (CPU-testable), and the budget
    state.py   the resume file: every timed point appended at once, never timed twice
    gpu.py     the real `time_configs`: graphs.measure.measure_buckets over TunedTritonKernel
    report.py  Markdown + JSON report
    __main__   the CLI
"""
