"""``python -m subspace_jax.bench --one SPEC.json OUT.jsonl``: one isolated worker run."""

import sys

from subspace_jax.bench._worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
