"""edgectx: chat with very long local documents on one machine.

    from edgectx.engine import Engine
    engine = Engine.load(default_model_path())
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgectx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
