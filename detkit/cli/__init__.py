"""Command-line entry points: one module per task, each with `main(argv) -> exit status`.

`detkit <task>` (main.py, also `python -m detkit`), the `detkit-*` console scripts and tools/*.py
all call these `main`s through `common.run_cli`.
"""
