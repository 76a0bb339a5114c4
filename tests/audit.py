"""Audits that let CPU tests see what would go wrong on a GPU.

``SyncAudit`` counts host-synchronising calls (``.item()``, ``bool(t)``, ``nonzero``, boolean
masks...). ``DeviceAudit`` goes further: it runs CPU code as if ``FAKE_GPU`` were a second
device. Tensors created on or moved to it are marked "gpu", tensors made on the CPU "cpu", and
it records

* every op that mixes a gpu and a cpu tensor (other than an explicit copy), which CUDA refuses;
* every syncing call on a gpu tensor;
* every blocking copy between the two: ``.cpu()``, ``.to()`` or ``copy_`` without
  ``non_blocking=True``, a non-blocking copy whose host side is not a pinned pool buffer (a
  pageable copy syncs the stream), and ``torch.tensor(..., device=gpu)``.

A ``TorchFunctionMode`` sees every tensor call made from Python. Two things need help: the
autograd engine's backward (run here with the mode pushed again, so Functions' backwards are
seen) and the host bank's lane thread (its jobs run under the same mode). Tensors made inside
C++ autograd carry no mark and count as neither device.
"""

from __future__ import annotations

import sys
import weakref
from contextlib import ExitStack
from unittest import mock

import torch
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode

FAKE_GPU = torch.device("meta")  # the audit's stand-in for a CUDA device; values live on the CPU

SYNCING = {
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "tolist",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
}
_FACTORIES = {
    "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint", "randperm",
    "tensor", "as_tensor", "linspace", "empty_strided", "eye", "scalar_tensor",
}  # fmt: skip
_LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}
_NEW = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}
_COPIES = {"copy_", "to", "cpu", "cuda", "_to_copy"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _has_bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncAudit(TorchFunctionMode):
    """Records the name of every host-synchronising call (all tensors are one device)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def _syncing(self, name: str, args, kwargs) -> str | None:
        if name in SYNCING or name == "cpu":
            return name
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _has_bool_index(
            args
        ):
            return f"{name}[bool]"
        if name == "where" and len(args) == 1 and not kwargs:
            return "where(cond)"
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        tensor_repeats = isinstance(repeats, torch.Tensor) and "output_size" not in kwargs
        if name == "repeat_interleave" and tensor_repeats:  # the output size is data
            return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return self._backward(args, kwargs)
        sync = self._syncing(_name(func), args, kwargs)
        if sync is not None:
            self.calls.append(sync)
        return func(*args, **kwargs)

    def _backward(self, args, kwargs):
        """Run the engine with this mode pushed, so Functions' backwards are audited too."""
        t = args[0]
        grad = kwargs.get("gradient", args[1] if len(args) > 1 else None)
        with self:
            grad = torch.ones_like(t) if grad is None else grad
            _engine_run_backward(
                (t,), (grad,), bool(kwargs.get("retain_graph")), False, (),
                allow_unreachable=True, accumulate_grad=True,
            )  # fmt: skip


class DeviceAudit(SyncAudit):
    """Marks tensors by the device they would be on and records GPU mistakes (see above)."""

    def __init__(self) -> None:
        super().__init__()
        self._marks: dict[int, tuple[weakref.ref, str]] = {}
        self._pinned: dict[int, weakref.ref] = {}
        self.mixed: list[str] = []
        self.copies: list[str] = []
        self.recording = True  # off: mark tensors, record nothing (set-up outside the step)

    # ---- marks ---------------------------------------------------------------------------

    def _set(self, t: torch.Tensor, where: str | None) -> None:
        if where is None:
            return
        key = id(t)
        self._marks[key] = (weakref.ref(t, lambda _, k=key: self._marks.pop(k, None)), where)

    def where(self, t: torch.Tensor) -> str | None:
        entry = self._marks.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def mark(self, t: torch.Tensor, where: str) -> torch.Tensor:
        self._set(t, where)
        return t

    def pin(self, t: torch.Tensor) -> None:
        """``t``'s memory is a pinned buffer (views of it, of any dtype, count as pinned)."""
        key = t.untyped_storage().data_ptr()
        self._pinned[key] = weakref.ref(t, lambda _, k=key: self._pinned.pop(k, None))

    def _is_pinned(self, t: torch.Tensor) -> bool:
        ref = self._pinned.get(t.untyped_storage().data_ptr())
        return ref is not None and ref() is not None

    @staticmethod
    def _device_of(value) -> str | None:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return None  # resolved by the caller
        d = torch.device(value)
        return "gpu" if d.type == FAKE_GPU.type else "cpu"

    @staticmethod
    def _real(value):
        if value is None or isinstance(value, torch.Tensor):
            return value
        return torch.device("cpu") if torch.device(value).type == FAKE_GPU.type else value

    # ---- the mode ------------------------------------------------------------------------

    def _where_frame(self) -> str:
        frame = sys._getframe(3)
        while frame is not None and (
            "/torch/" in frame.f_code.co_filename or frame.f_code.co_filename.endswith("audit.py")
        ):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{frame.f_code.co_filename.split('/')[-1]}:{frame.f_lineno}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _name(func)
        if func is torch.Tensor.backward:
            return self._backward(args, kwargs)
        if name == "__get__" and args and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            if isinstance(out, torch.device):  # Tensor.device: the device it would be on
                return FAKE_GPU if self.where(args[0]) == "gpu" else out
            if isinstance(out, torch.Tensor):  # .T, .mT, .data, .grad ...
                self._set(out, self.where(args[0]))
            return out
        tensors = [t for t in _tensors((args, kwargs)) if isinstance(t, torch.Tensor)]
        marks = [(t, self.where(t)) for t in tensors]
        on_gpu = any(m == "gpu" for _, m in marks)

        # What the call's result is marked, and the device arguments it really runs with.
        target = None
        if name in _FACTORIES:
            target = self._device_of(kwargs.get("device")) or "cpu"
            if name == "tensor" and target == "gpu" and self.recording:
                self.copies.append(f"tensor(device=gpu) at {self._where_frame()}")
        elif name in _LIKE or name in _NEW:
            target = self._device_of(kwargs.get("device")) or (marks[0][1] if marks else None)
        elif name in ("to", "cpu", "cuda"):
            target = self._to_target(name, args, kwargs, marks)
        if "device" in kwargs:
            kwargs["device"] = self._real(kwargs["device"])
        if name == "to":
            args = tuple(self._real(a) if isinstance(a, (str, torch.device)) else a for a in args)

        if self.recording:
            if on_gpu:
                sync = self._syncing(name, args, kwargs)
                if sync is not None and sync != "cpu":
                    self.calls.append(f"{sync} at {self._where_frame()}")
            self._check_mixing(name, args, kwargs, marks)
            self._check_copy(name, args, kwargs, marks, target)

        out = func(*args, **kwargs)
        if name in ("to", "cpu", "cuda") and isinstance(out, torch.Tensor):
            src = args[0]
            if target is not None and target != self.where(src) and out is src:
                out = src.clone()  # a real move makes a new tensor
        if target is None:
            if "out" in kwargs and isinstance(kwargs["out"], torch.Tensor):
                target = self.where(kwargs["out"])
            elif name.endswith("_") and tensors:
                target = self.where(tensors[0])
            elif on_gpu:
                target = "gpu"
            elif any(m == "cpu" for _, m in marks):
                target = "cpu"
        inputs = {id(t) for t in tensors}
        for t in _tensors(out):
            if id(t) not in inputs or self.where(t) is None:  # an input keeps its mark
                self._set(t, target)
        return out

    def _to_target(self, name, args, kwargs, marks) -> str | None:
        if name == "cpu":
            return "cpu"
        if name == "cuda":
            return "gpu"
        for value in (*args[1:], kwargs.get("device"), kwargs.get("other")):
            if isinstance(value, torch.Tensor):
                return self.where(value)
            if isinstance(value, (str, torch.device)):
                return self._device_of(value)
        return marks[0][1] if marks else None  # a dtype-only .to()

    def _check_mixing(self, name, args, kwargs, marks) -> None:
        if name in _COPIES:
            return
        # CUDA takes 0-dim CPU tensors as scalars in elementwise ops.
        kinds = {m for t, m in marks if m is not None and (m == "gpu" or t.dim() > 0)}
        if len(kinds) > 1:
            shapes = [(tuple(t.shape), m) for t, m in marks if m is not None]
            self.mixed.append(f"{name} mixes {shapes} at {self._where_frame()}")

    def _check_copy(self, name, args, kwargs, marks, target) -> None:
        nb = bool(kwargs.get("non_blocking", False))
        if name == "copy_" and len(marks) >= 2:
            (dst, d), (src, s) = marks[0], marks[1]
            if d is not None and s is not None and d != s:
                host = dst if d == "cpu" else src
                if not nb:
                    self.copies.append(f"blocking copy_ {s}->{d} at {self._where_frame()}")
                elif not self._is_pinned(host):
                    self.copies.append(f"pageable copy_ {s}->{d} at {self._where_frame()}")
        elif name in ("to", "cpu", "cuda") and marks:
            src, s = marks[0]
            if s is not None and target is not None and s != target:
                self.copies.append(f"{name} {s}->{target} at {self._where_frame()}")

    # ---- helpers ---------------------------------------------------------------------------

    def patched(self) -> ExitStack:
        """Hooks the audit needs outside the mode: the host bank's lane runs its jobs under
        it, pinned pool buffers are known, and a ``StepRng`` asked for a generator on the
        stand-in device gets a CPU one (``torch.Generator`` cannot be made on it)."""
        from pfc_ds.head import host_bank, step_rng

        audit = self
        stack = ExitStack()
        submit = host_bank.HostBank._submit
        take = host_bank.PinnedPool.take
        generator = step_rng.StepRng.generator

        def audited_submit(bank, job):
            def run():
                with audit:
                    return job()

            return submit(bank, run)

        def pinned_take(pool, shape, dtype):
            view, buf = take(pool, shape, dtype)
            audit.pin(buf)
            audit.mark(buf, "cpu")
            return view, buf

        def cpu_generator(rng, device):
            if torch.device(device).type == FAKE_GPU.type:
                device = "cpu"
            return generator(rng, device)

        stack.enter_context(mock.patch.object(host_bank.HostBank, "_submit", audited_submit))
        stack.enter_context(mock.patch.object(host_bank.PinnedPool, "take", pinned_take))
        stack.enter_context(mock.patch.object(step_rng.StepRng, "generator", cpu_generator))
        return stack
