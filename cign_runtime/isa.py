"""Run a process as on another x86-64 CPU kind: the AVX2-only instruction set on an AVX-512 host.

Deployment CPUs differ: some have AVX-512 VNNI / AMX (integer dot products in one instruction),
others only AVX2, where onnxruntime's u8 x s8 kernels multiply with ``vpmaddubsw`` into saturating
16-bit sums (``calibration.quantize``). Latency ratios and INT8 accuracy differ between the two,
so ``cign-bench --cpu-isa avx2`` measures the AVX2 case on an AVX-512 machine: the child process
is started with ``cpuid_mask.c`` preloaded, which makes CPUID report no AVX-512, AVX-VNNI,
AVX512-BF16 or AMX, and onnxruntime (MLAS), torch (ATen, oneDNN) and numpy pick their AVX2 + FMA
kernels. The core stays the host's (its caches and clocks), so the result is the AVX2 code path
on this core, not a given AVX2 CPU model. Needs Linux with CPUID faulting (``cpuid_fault`` in
/proc/cpuinfo: Intel CPUs since Ivy Bridge, KVM guests) and a C compiler; the shared object is
built once into ``~/.cache/cign-edge``.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

#: ``--cpu-isa`` choices: the host's own instruction set, or AVX2 + FMA only.
ISAS = ("native", "avx2")
#: Set in a masked process's environment (with LD_PRELOAD): which instruction set it runs.
ENV = "CIGN_CPU_ISA"
#: /proc/cpuinfo flags the mask hides (what ``cign_runtime.bench.environment`` then leaves out).
MASKED_FLAGS = frozenset({
    "avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
    "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_4vnniw",
    "avx512_4fmaps", "avx512_vp2intersect", "amx_bf16", "avx512_fp16", "amx_tile", "amx_int8", "avx_vnni",
    "avx512_bf16", "amx_fp16", "avx_ifma", "avx_vnni_int8", "avx_ne_convert", "amx_complex", "avx_vnni_int16",
})
SOURCE = Path(__file__).with_name("cpuid_mask.c")


def current() -> str:
    """The instruction set this process runs with: "avx2" under the mask, else "native"."""
    masked = os.environ.get(ENV) == "avx2" and "cpuid_mask" in os.environ.get("LD_PRELOAD", "")
    return "avx2" if masked else "native"


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's /proc/cpuinfo flags as this process's libraries see them (the masked ones removed)."""
    flags = set(cpuinfo().get("flags", "").split())
    return flags - MASKED_FLAGS if current() != "native" else flags


def unavailable(isa: str) -> str | None:
    """Why a process cannot run with ``isa`` here, or None when it can."""
    if isa not in ISAS:
        raise ValueError(f"unknown CPU instruction set {isa!r}; choose from {ISAS}")
    if isa == "native":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"--cpu-isa avx2 needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    flags = set(cpuinfo().get("flags", "").split())
    if "avx2" not in flags:
        return "this CPU has no AVX2"
    if "cpuid_fault" not in flags:
        return "this CPU / kernel has no CPUID faulting (no 'cpuid_fault' in /proc/cpuinfo), so CPUID cannot be masked"
    if _compiler() is None:
        return "no C compiler (cc, gcc or clang) to build the CPUID mask; install gcc"
    return None


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def shim(cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled CPUID mask (built from ``cpuid_mask.c`` on first use, keyed by its hash)."""
    cache = Path(cache_dir or Path.home() / ".cache" / "cign-edge")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    path = cache / f"cpuid_mask-{digest}.so"
    if path.is_file():
        return path
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) to build the CPUID mask; install gcc")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {SOURCE} with {compiler} failed:\n{done.stderr}")
    tmp.replace(path)
    return path


def environ(isa: str, base: dict[str, str] | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for a child process that runs with ``isa`` (raises RuntimeError when it cannot)."""
    env = dict(os.environ if base is None else base)
    preload = [p for p in env.get("LD_PRELOAD", "").split() if "cpuid_mask" not in p]
    env.pop(ENV, None)
    if isa != "native":
        reason = unavailable(isa)
        if reason:
            raise RuntimeError(reason)
        preload.insert(0, str(shim(cache_dir)))
        env[ENV] = isa
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env
