"""What the CPU this process runs on can do: its model name and the instruction sets that set
the speed of float32 and bfloat16 matmuls (read from /proc/cpuinfo on Linux).

bfloat16 matmuls are fast only with native bfloat16 units: AVX-512 BF16 (avx512_bf16) or AMX
(amx_bf16). Without them oneDNN converts to float32 and back, and mixed_bfloat16 training is
slower than float32 (docs/performance.md).

Threads: on two cores or fewer the train step runs fastest with one thread per op and one op
per core at once (`default_threads`); programs use that unless their thread flags say otherwise.
"""

import os
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


def describe() -> str:
    """The CPU for a benchmark table's first line: its model and reported flags."""
    return f"{model_name()} ({', '.join(reported_flags()) or 'flags unknown'})"


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


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(available: int | None = None) -> tuple[int, int]:
    """(intra_op, inter_op) threads for this CPU (0: TensorFlow's choice), `available` cores
    (default: `cores()`).

    On two cores or fewer, one thread per op and one op per core at once: the step's six
    networks give independent ops, and two single-threaded ops beat each op split over both
    cores (8-15% more examples/s at paper size on 2-core AVX-512 machines, 4-12% on AMX; on
    an AVX2-only EPYC 2-21% fewer at paper size in four runs but level, 0.98x, when the two
    settings alternated over six rounds, and 1-18% more at 500/256 in three;
    docs/performance.md). On more cores this is unmeasured: TensorFlow's choice.
    """
    n = cores() if available is None else available
    return (1, n) if n <= 2 else (0, 0)


def threads(intra: int | None, inter: int | None,
            available: int | None = None) -> tuple[int, int]:
    """The (intra_op, inter_op) threads to set: those given, `default_threads` for None."""
    default = default_threads(available)
    return (default[0] if intra is None else intra, default[1] if inter is None else inter)
