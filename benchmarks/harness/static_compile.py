"""Compile the real kernel launchers for an NVIDIA target on a machine without a GPU.

Triton compiles to PTX and a cubin without a GPU; only loading and launching need one.
``compile_for(capability)`` installs a stand-in for ``triton.runtime.driver.active`` whose
target is ``GPUTarget("cuda", capability, 32)`` and whose launcher records the launch instead
of running it. Inside it the launchers (``decode_attention``, ``commit_pages``,
``extend_attention``) take CPU tensors, validate them, compute their grids and compile every
kernel they launch; ``Capture.kernels`` lists what was compiled, with its grid.

The stand-in answers with the device id equal to the capability, so Triton's per-device
binder caches keep sm_90 and sm_80 compilations apart in one process. Kernels must be
imported without ``TRITON_INTERPRET=1`` (the interpreter replaces ``triton.jit`` at import).

Numbers that need the hardware (registers after loading, occupancy) are derived from the
cubin and ptxas' report by ``benchmarks.harness.sass``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

# Largest dynamic shared memory one program may use, by compute capability (bytes).
MAX_SHARED_PER_PROGRAM = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Launch:
    """One recorded kernel launch: the compiled kernel and its grid."""

    name: str
    grid: tuple[int, int, int]
    kernel: object  # triton CompiledKernel: .asm["ptx"], .asm["cubin"], .metadata
    error: str | None = None  # why the kernel could not be loaded (e.g. shared memory)


@dataclass
class Capture:
    """What ran inside ``compile_for``: every launch, in order."""

    capability: int
    launches: list[Launch] = field(default_factory=list)

    def kernels(self, name: str) -> list[Launch]:
        return [x for x in self.launches if x.name == name]


class _Utils:
    def __init__(self, capability: int) -> None:
        self.capability = capability

    def get_device_properties(self, device):
        shared = MAX_SHARED_PER_PROGRAM.get(self.capability, 101376)
        return {"max_shared_mem": shared, "multiprocessor_count": 132, "max_num_regs": 65536}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass


class _StandInDriver(DriverBase):
    """A CUDA 'device' that compiles for ``capability`` and records launches."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.utils = _Utils(capture.capability)
        record = capture.launches

        class _Launcher:
            def __init__(self, src, metadata) -> None:
                self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)
                self.kernel = None

            def __call__(self, gx, gy, gz, stream, function, packed, meta, enter, leave, *args):
                record.append(Launch(self.name, (gx, gy, gz), self.kernel))

        self.launcher_cls = _Launcher

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capture.capability, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self) -> int:
        return self.capture.capability

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver compiles only; nothing can be timed")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the stand-in driver compiles only")

    def clear_cache(self, cache) -> None:
        pass


@contextlib.contextmanager
def compile_for(capability: int) -> Iterator[Capture]:
    """Within the block, Triton launches compile for sm_<capability> and are recorded."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.errors import OutOfResources

    capture = Capture(capability)
    stand_in = _StandInDriver(capture)
    previous = driver._active
    original_init = CompiledKernel._init_handles

    def init_handles(self):  # the launcher needs its kernel to record it
        try:
            original_init(self)
        except OutOfResources as err:  # record it: a GPU would refuse this launch
            name, kernel, message = self.name, self, str(err)

            def refused(gx, gy, gz, *args):
                capture.launches.append(Launch(name, (gx, gy, gz), kernel, message))

            self._run = refused
            return
        if getattr(self._run, "kernel", False) is None:
            self._run.kernel = self

    driver.set_active(stand_in)
    CompiledKernel._init_handles = init_handles
    try:
        yield capture
    finally:
        CompiledKernel._init_handles = original_init
        driver._active = previous


def triton_bin(tool: str) -> str:
    """Path of a CUDA tool shipped in Triton's wheel (ptxas, nvdisasm, cuobjdump)."""
    import os

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
