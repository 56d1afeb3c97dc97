"""What CPU this process runs on: its model, the instruction sets that decide which kernels
XLA, onnxruntime and PyTorch pick (AVX2, AVX-512 and its VNNI/BF16 extensions, AMX), and
how many cores it may use. Benchmarks record it with every measurement, so that numbers
from different machines are never compared as if they were one machine's.

Read from /proc/cpuinfo (Linux); elsewhere the model is `platform.processor()` and the
instruction sets are unknown (None).
"""

from __future__ import annotations

import os
import pathlib
import platform

# /proc/cpuinfo flag -> the name people know it by; the ones that change kernels.
KNOWN_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx_vnni": "AVX-VNNI",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX-TILE",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_info(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """{"model", "vendor", "family", "model_number" (the CPU's family and model ids: a
    virtual machine's model name may be as short as "AMD EPYC"), "flags" (KNOWN_FLAGS
    present, by their common names; None if unknown), "logical_cpus", "usable_cores",
    "machine"}."""
    info = {"model": platform.processor() or platform.machine() or None, "vendor": None, "family": None,
            "model_number": None, "flags": None, "logical_cpus": os.cpu_count(), "usable_cores": usable_cores(),
            "machine": platform.machine()}
    try:
        fields = _cpuinfo_fields(pathlib.Path(cpuinfo_path).read_text())
    except OSError:
        return info
    present = set(fields.get("flags", fields.get("Features", "")).split())
    info.update(model=fields.get("model name") or info["model"], vendor=fields.get("vendor_id"),
                family=fields.get("cpu family"), model_number=fields.get("model"),
                flags=[name for flag, name in KNOWN_FLAGS.items() if flag in present] if present else None)
    return info


def describe(info: dict | None = None) -> str:
    """One line: "AMD EPYC (family 25, model 17), x86_64, 2 of 2 CPUs usable, AVX2 FMA
    AVX-512F ... (no AMX)"."""
    info = info or cpu_info()
    flags = info["flags"]
    if flags is None:
        isa = "instruction sets unknown"
    else:
        isa = " ".join(flags) or "none of AVX2/AVX-512/AMX"
        if not any(f.startswith("AMX") for f in flags):
            isa += " (no AMX)"
    ids = f" (family {info['family']}, model {info['model_number']})" if info["family"] is not None else ""
    return (f"{info['model']}{ids}, {info['machine']}, {info['usable_cores']} of {info['logical_cpus']} CPUs usable, "
            f"{isa}")
