"""Reading and writing result files: the public names of :mod:`subspace_jax._results`.

For scripts outside the package (``experiments/``, ``benchmarks/``): atomic JSON, append-only
JSON lines (a torn last line is skipped when read) and the PNG plots the commands draw.
"""

from subspace_jax._results import (
    append_jsonl,
    plot_accuracy_vs_dim,
    plot_lines,
    read_json,
    read_jsonl,
    write_json,
)

__all__ = [
    "append_jsonl",
    "plot_accuracy_vs_dim",
    "plot_lines",
    "read_json",
    "read_jsonl",
    "write_json",
]
