"""The devices KVarN serves on; every other one is refused when the server starts.

On a GPU the pool quantizes and attends with the Triton kernels (``kvarn_sglang.kernels``),
which read packed codes through NVIDIA PTX inline assembly (``kernels.codes``) and take their
dot products on tensor cores in the model's dtype. So they need an NVIDIA GPU of at least
``kernels.validate.MIN_CAPABILITY`` for the model's dtype: compute capability 8.0 for both
(bf16 tensor-core dots and conversions need it; Triton supports no older NVIDIA GPU). A ROCm
build of torch calls its AMD GPUs "cuda" too (``torch.version.hip`` is set), and other
accelerators would run the slow torch reference; without this check such a server started and
failed at the first kernel compile, mid-request.
``--device cpu`` serves with the torch reference (the test bed).

``device_facts`` reads what torch knows about the GPUs a server will use; it is the one place
tests fake. ``refuse_device`` raises ``ValueError`` naming what is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceFacts:
    """What a server's device is.

    Attributes:
        device: SGLang's ``--device`` (``cuda``, ``cpu``, ``xpu``, ...).
        hip: torch's ROCm version (``torch.version.hip``), None on NVIDIA builds.
        gpus: ``(index, name, (major, minor))`` of every GPU the server uses (CUDA only).
    """

    device: str
    hip: str | None = None
    gpus: tuple[tuple[int, str, tuple[int, int]], ...] = ()


def device_facts(device: str, gpu_ids: list[int]) -> DeviceFacts:
    """Ask torch about ``device`` and the GPUs ``gpu_ids`` (those that exist)."""
    hip = getattr(torch.version, "hip", None)
    if device != "cuda" or not torch.cuda.is_available():
        return DeviceFacts(device, hip)
    count = torch.cuda.device_count()
    gpus = tuple(
        (i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
        for i in gpu_ids
        if 0 <= i < count
    )
    return DeviceFacts(device, hip, gpus)


def facts_of(device: torch.device) -> DeviceFacts:
    """``device_facts`` of the one device a process serves on (its current GPU if unnamed)."""
    index = device.index
    if index is None:
        cuda = device.type == "cuda" and torch.cuda.is_available()
        index = torch.cuda.current_device() if cuda else 0
    return device_facts(device.type, [index])


def refuse_device(facts: DeviceFacts, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless KVarN can serve a ``dtype`` model on ``facts``' device."""
    from kvarn_sglang.kernels.validate import MIN_CAPABILITY

    if facts.device == "cpu":
        return
    serve = "serve this model without --kv-cache kvarn"
    if facts.device != "cuda":
        raise ValueError(
            f"--kv-cache kvarn runs on NVIDIA GPUs (--device cuda) or, as a reference, on "
            f"--device cpu; got --device {facts.device}: {serve}"
        )
    if facts.hip is not None:
        raise ValueError(
            f"--kv-cache kvarn needs an NVIDIA GPU: its kernels use NVIDIA PTX, and this torch "
            f"is a ROCm build (HIP {facts.hip}); {serve}"
        )
    need = MIN_CAPABILITY[dtype]
    for index, name, capability in facts.gpus:
        if tuple(capability) < need:
            raise ValueError(
                f"--kv-cache kvarn needs an NVIDIA GPU of compute capability "
                f"{need[0]}.{need[1]} or newer for a {str(dtype).replace('torch.', '')} model "
                f"(tensor-core dots in that dtype); GPU {index} ({name}) is "
                f"{capability[0]}.{capability[1]}: {serve}"
            )
