"""Command-line entry points. `tools/*.py` and the `detkit-*` console scripts call these `main`s."""
