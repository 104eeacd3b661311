"""`python -m edgectx` runs the `edgectx` command."""

from edgectx.cli import main

main()
