"""What the CPU this process runs on can do: its model name and the instruction sets that set
the speed of float32 and bfloat16 matmuls (read from /proc/cpuinfo on Linux).

bfloat16 matmuls are fast only with native bfloat16 units: AVX-512 BF16 (avx512_bf16) or AMX
(amx_bf16). Without them oneDNN converts to float32 and back, and mixed_bfloat16 training is
slower than float32 (docs/performance.md).
"""

import platform

BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    """The value of `key` for the first processor of /proc/cpuinfo, if there is one."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def model_name() -> str:
    """The CPU's model name, or what platform says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def flags() -> set[str]:
    """The CPU's instruction-set flags (empty where /proc/cpuinfo is not available)."""
    return set((_cpuinfo("flags") or "").split())


def reported_flags() -> list[str]:
    """The flags among REPORTED_FLAGS that this CPU has, for benchmark tables."""
    have = flags()
    return [f for f in REPORTED_FLAGS if f in have]


def has_bfloat16() -> bool | None:
    """Whether the CPU has native bfloat16 units; None when its flags cannot be read."""
    have = flags()
    return bool(have & set(BFLOAT16_FLAGS)) if have else None


def precision_warning(precision: str) -> str | None:
    """One line when `precision` will be slow on this CPU, else None."""
    if precision == "mixed_bfloat16" and has_bfloat16() is False:
        return (f"warning: --precision mixed_bfloat16 on a CPU without bfloat16 units "
                f"({model_name()}: no {' or '.join(BFLOAT16_FLAGS)}) runs slower than float32 "
                "(about 2x, docs/performance.md): use --precision float32 here")
    return None
