"""The benchmark: each MoE kernel, the adaptive module and the old static rule, timed under
CUDA-graph replay per batch size, against a roofline floor.

    roofline.py   floor arithmetic (bytes, flops, measured ceilings)
    results.py    result records and their JSON file format
    table.py      the Markdown report
    plot.py       the PNG, drawn from a saved JSON
    runner.py     the GPU measurements; __main__.py the command line
"""
