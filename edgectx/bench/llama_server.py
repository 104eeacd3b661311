"""llama-cpp-python's OpenAI-compatible server, run as edgectx's llama.cpp reference runs: `python -m
edgectx.bench.llama_server ARGS` is `python -m llama_cpp.server ARGS`, except that on a CPU that says AMX but cannot
run it the models load with llama.cpp's extra buffer types off (edgectx.bench.reference). `bench serve` and the
tests start llama.cpp's server this way.
"""

from __future__ import annotations

from edgectx.bench.reference import extra_buffers_work, without_extra_buffers


def main() -> None:
    from llama_cpp.server.__main__ import main as serve

    with without_extra_buffers(not extra_buffers_work()):  # the server loads its model before serving
        serve()


if __name__ == "__main__":
    main()
