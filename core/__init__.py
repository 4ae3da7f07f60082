"""The ground layer: settings, durable file I/O, logging, metrics and probes, the shared types (study manifest,
analysis result, state enums) and the on-disk layout of a study and its episodes.

It imports nothing of the project outside itself; every other package may import it (pyproject.toml,
``[tool.importlinter]``).
"""
