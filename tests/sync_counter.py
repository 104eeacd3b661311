"""Count the host syncs a piece of PyTorch code would make on a GPU, on any device (issue 21).

A host sync is an operation whose result the host must read, so it waits for the GPU to finish everything queued
before it: `.item()`, `int(t)`, `bool(t)` (all `aten._local_scalar_dense`), `nonzero` and `unique` (their output
size depends on the data), `masked_select`, and copies to the CPU (`.cpu()`, `.tolist()`, `.numpy()`, `.to("cpu")`).
On a CPU run the tensors never leave the host, so the copies are counted where the code asks for them (a torch
function mode sees `.cpu()`, `.tolist()` and `.to("cpu")` whatever the tensor's device) and the data-dependent
ops where they dispatch (a dispatch mode). Each sync is recorded with the first line of edgectx code on the stack,
so a count points at its sites.

    with SyncCounter() as syncs:
        engine.forward([token])
    assert syncs.total == 0, syncs.sites
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor}  # sized by the data
SCALAR_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.allclose.default}
# Python scalars from a tensor: `aten._local_scalar_dense` where it dispatches; under inference_mode a CPU tensor's
# scalar skips the dispatcher, so they are counted where the code asks, as the read-backs are.
SCALAR_METHODS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__float__,
                  torch.Tensor.__index__}
READ_BACK_METHODS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


def _where(frame) -> str:
    parts = frame.filename.replace("\\", "/").rsplit("/", 2)
    return f"{'/'.join(parts[-2:])}:{frame.lineno}"


def _site() -> str:
    """file:line of the innermost edgectx frame (the code that asked) and of its caller in edgectx
    ("model/rope.py:79 < memory/context.py:141"), else of the innermost frame outside torch."""
    frames = [f for f in traceback.extract_stack() if "sync_counter" not in f.filename]
    ours = [f for f in frames if any(part in f.filename for part in ("/edgectx/", "/quant/", "/kernels/"))]
    if ours:
        return " < ".join(_where(f) for f in reversed(ours[-2:]))
    outside_torch = [f for f in frames if "/torch/" not in f.filename]
    return _where((outside_torch or frames)[-1])


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func in DATA_DEPENDENT or name.startswith(("unique", "_unique")):
            self.counter.add(name)
        elif func in SCALAR_OPS and self.counter.active:
            self.counter.add(name)
        elif self.counter.active and _copies_to_cpu(func, args, kwargs):
            self.counter.add("copy to cpu")  # a device tensor copied to the host (seen on a GPU run only)
        return func(*args, **kwargs)


def _copies_to_cpu(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        return _is_cpu(kwargs.get("device")) and not args[0].is_cpu
    if func is aten.copy_.default:
        return args[0].is_cpu and not args[1].is_cpu
    return False


class _Function(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SCALAR_METHODS:
            kind = "_local_scalar_dense"
        elif func in READ_BACK_METHODS:
            kind = func.__name__
        else:
            kind = "to cpu" if func is torch.Tensor.to and _to_cpu(args, kwargs) else None
        if kind is None:
            return func(*args, **kwargs)
        self.counter.add(kind)
        self.counter.active = False  # its own scalar read or copy to the CPU is this one sync, not a second
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.active = True


def _to_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return _is_cpu(target)


class SyncCounter:
    """Context manager: `total`, `by_kind` ({"_local_scalar_dense": 3, ...}) and `sites` ({"model/rope.py:74": 2})."""

    def __init__(self):
        self.by_kind: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.active = True
        self._modes = (_Function(self), _Dispatch(self))

    def add(self, kind: str) -> None:
        self.by_kind[kind] += 1
        self.sites[f"{kind} @ {_site()}"] += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
