"""Which device and precision the encoder runs on, and the CUDA settings that go with them.

Everything here runs before the model is built, so a wrong choice is a one-line startup
error (ModelLoadError), never a traceback from the first forward pass."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_service.errors import ModelLoadError

log = logging.getLogger("clipsearch.encoder.device")

PRECISIONS = ("fp32", "bf16", "fp16")
# Least cosine to the fp32 reference vector each precision keeps, for every image and text
# (tests and the GPU check use these). fp32 on CUDA holds the fp32 figure only with TF32
# off (see use_exact_fp32); fp16 and bf16 keep LayerNorms and residuals in fp32.
PARITY_MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "fp16": 0.999}
# --max-batch 0 picks these. 32 suits a 2-core CPU (images/s flat from 32 to 64 here); a
# data-centre GPU needs hundreds of images in flight to fill its SMs.
DEFAULT_MAX_BATCH = {"cpu": 32, "cuda": 256}


@dataclass(frozen=True)
class DeviceChoice:
    """The device to run on and, when `auto` had to settle for the CPU, why."""

    device: torch.device
    note: str = ""


def cuda_unavailable_reason() -> str:
    """Why torch sees no usable GPU: torch's own warning (a driver too old for this
    build, no device) when it gave one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return ""
    said = "; ".join(str(w.message).strip() for w in caught)
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
    return f"no usable CUDA device ({said or 'torch.cuda.is_available() is False'}; {build})"


def resolve_device(choice: str) -> DeviceChoice:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a checked device."""
    if choice == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        note = f"device auto: {cuda_unavailable_reason()}; running on the CPU"
        log.warning("%s", note)
        return DeviceChoice(torch.device("cpu"), note)
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {choice}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return DeviceChoice(device)
    if device.type != "cuda":
        raise ModelLoadError(f"--device {choice}: expected auto, cpu, cuda or cuda:N")
    reason = cuda_unavailable_reason()
    if reason:
        raise ModelLoadError(f"--device {choice}: {reason}")
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelLoadError(f"--device {choice}: this machine has {count} CUDA device(s), "
                             f"numbered 0..{count - 1}")
    check_compute_capability(index)
    return DeviceChoice(torch.device("cuda", index))


def check_compute_capability(index: int) -> None:
    """A GPU older than every architecture this torch build carries fails its first kernel
    with 'no kernel image is available'; say so at startup instead."""
    major, minor = torch.cuda.get_device_capability(index)
    built = [int(m.group(1)) for arch in torch.cuda.get_arch_list()
             if (m := re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]?", arch))]
    if built and major * 10 + minor < min(built):
        name = torch.cuda.get_device_name(index)
        raise ModelLoadError(
            f"cuda:{index} ({name}) has compute capability {major}.{minor}; this torch build "
            f"(CUDA {torch.version.cuda}) needs {min(built) // 10}.{min(built) % 10} or newer: "
            f"install a torch build for an older CUDA (docs/deployment.md)")


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device, *,
                      allow_fp16_on_cpu: bool = False) -> str:
    """`auto` -> fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. fp16 needs CUDA
    (`allow_fp16_on_cpu` is for tests that run the CUDA layout on the CPU)."""
    if choice == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if choice not in PRECISIONS:
        raise ModelLoadError(f"--precision {choice}: expected auto, fp32, bf16 or fp16")
    if choice == "fp16" and device.type != "cuda" and not allow_fp16_on_cpu:
        raise ModelLoadError("--precision fp16 needs CUDA; on a CPU use bf16 or fp32")
    return choice


def use_exact_fp32(precision: str) -> None:
    """fp32 means IEEE fp32: torch runs fp32 convolutions on CUDA as TF32 by default
    (`torch.backends.cudnn.conv.fp32_precision == "tf32"`), which costs CLIP's patch
    embedding its fp32 parity. Only the new API is used: mixing it with the legacy
    allow_tf32 flags is an error in torch 2.14."""
    if precision == "fp32":
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # type: ignore[attr-defined]
        torch.backends.cuda.matmul.fp32_precision = "ieee"


def default_max_batch(device: torch.device) -> int:
    return DEFAULT_MAX_BATCH[device.type]
