"""``python -m benchmarks.embedded.train``: see the package docstring."""

from benchmarks.embedded.train.cli import main

main()
