"""What the library reads from the CPU, and the one-line bfloat16 warning."""

import pytest

from cagem_tf import cpu, training
from cagem_tf.config import Config
from cagem_tf.files import UserError

AVX2_ONLY = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
BF16 = AVX2_ONLY.replace("fma", "fma avx512f avx512_bf16")


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    def use(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(cpu._cpuinfo, "__defaults__", (str(path),))
    return use


def test_the_cpu_is_read_from_cpuinfo(cpuinfo):
    cpuinfo(BF16)
    assert cpu.model_name() == "Test CPU"
    assert cpu.reported_flags() == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert cpu.has_bfloat16() is True
    assert cpu.describe() == "Test CPU (avx2, fma, avx512f, avx512_bf16)"
    cpuinfo(AVX2_ONLY)
    assert cpu.has_bfloat16() is False
    cpuinfo("")
    assert cpu.has_bfloat16() is None and cpu.reported_flags() == []


def test_bfloat16_without_bfloat16_units_is_one_warning_line(cpuinfo):
    cpuinfo(AVX2_ONLY)
    line = cpu.precision_warning("mixed_bfloat16")
    assert "\n" not in line and line.startswith("warning: --precision mixed_bfloat16") and \
        "Test CPU" in line and "--precision float32" in line
    assert cpu.precision_warning("float32") is None
    cpuinfo(BF16)
    assert cpu.precision_warning("mixed_bfloat16") is None
    cpuinfo("")  # unknown: no guess
    assert cpu.precision_warning("mixed_bfloat16") is None


def test_training_says_so_before_anything_else(cpuinfo, tmp_path):
    cpuinfo(AVX2_ONLY)
    lines = []
    config = Config(dataset=str(tmp_path / "missing.npz"), model_dir=str(tmp_path / "run"),
                    precision="mixed_bfloat16")
    with pytest.raises(UserError):
        training.train(config, log=lines.append)
    assert lines and lines[0].startswith("warning: --precision mixed_bfloat16")
    assert not (tmp_path / "run").exists()


def test_two_cores_or_fewer_get_one_thread_per_op_and_one_op_per_core():
    assert cpu.default_threads(1) == (1, 1) and cpu.default_threads(2) == (1, 2)
    assert cpu.default_threads(8) == (0, 0)  # TensorFlow's choice: unmeasured there


def test_thread_flags_override_the_defaults_one_by_one():
    assert cpu.threads(None, None, available=2) == (1, 2)
    assert cpu.threads(0, None, available=2) == (0, 2)
    assert cpu.threads(4, 3, available=2) == (4, 3)
    assert cpu.threads(None, 0, available=16) == (0, 0)
