"""`python -m edgectx` runs the `edgectx` command."""

from edgectx.cli.main import main

main()
