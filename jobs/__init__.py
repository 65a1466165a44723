"""Ray job entrypoints: `python -m jobs.<name> --recipe ...`, locally or via `ray job submit`."""
