"""The Textual terminal UI, installed as `edgectx.tui`; `edgectx` with no arguments will open it.

Not built yet: until it is, `edgectx` with no arguments starts the command-line chat.
"""
