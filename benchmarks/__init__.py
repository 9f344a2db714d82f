"""Developer benchmarks and diagnostics of detkit, run from a checkout as `python -m benchmarks.<name>`.

Not part of the installed package (pyproject's packages.find takes detkit* only): these measure
detkit's own implementation choices for BENCHMARKS.md. The user-facing speed benchmark is
`detkit benchmark`. benchmarks/README.md lists the modules and their commands.
"""
