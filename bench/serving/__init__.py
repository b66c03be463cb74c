"""The serving benchmark: SGLang's own engine (its one-batch benchmark) with the plugin off and on.

`python -m bench.serving --help` (or `make bench-serving`). Modules:

- models.py: model folders (config.json) from the project's presets, per-rank shapes, depth, memory
- tokenizer.py: the small word-level tokenizer every dummy-weight folder gets
- modes.py: the configurations compared (off, measure, plan, threshold, fixed kernels) as env vars
- points.py: the (batch, input, output) points one process runs; the filter the wrapper installs
- one_batch_main.py: what each run executes: SGLang's plugin loader, then one_batch's cli_main
- driver.py: command lines, the schedule (modes alternate per repeat), subprocesses, time budget
- host.py: GPU name, memory and count from nvidia-smi (the driver never initializes CUDA)
- logparse.py: what a run printed (graph capture, plugin start-up) and its one-batch result file
- records.py: session.json and runs.jsonl, the raw data of a session
- report.py: aggregation over repeats, Markdown tables, the result JSON
- plot.py: the PNG, drawn from a saved result JSON
"""
