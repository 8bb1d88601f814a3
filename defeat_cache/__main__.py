"""`python -m defeat_cache` (and `torchrun -m defeat_cache`) run the same CLI as `defeat-cache`."""

from .cli import main

main(prog_name="defeat-cache")
