"""Tests of lmforge/hardware.py: the one dtype table, the quantization schemes and their bytes, the datasheet
lookup, and CPU feature detection (read from flags, nothing measured)."""

import sys

import pytest
import torch

from lmforge import hardware as hw


def test_every_spelling_of_a_dtype_has_one_name_bytes_and_torch_dtype():
    for spelling, dtype in [("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32),
                            ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
                            ("half", torch.float16), ("int8", torch.int8)]:  # fmt: skip
        assert hw.torch_dtype(spelling) is dtype
        assert hw.dtype_name(spelling) == hw.dtype_name(dtype)
        assert hw.dtype_bytes(spelling) == hw.dtype_bytes(dtype) == dtype.itemsize
    assert hw.dtype_bytes("fp8") == 1 and hw.torch_dtype("fp8").itemsize == 1
    assert hw.dtype_name(hw.torch_dtype("fp8")) == "fp8"
    assert hw.torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        hw.dtype_bytes("int4")


def test_the_tables_derived_from_dtypes():
    assert hw.COMPUTE_DTYPES == ("fp32", "bf16", "fp16")
    assert list(hw.DTYPES) == ["fp32", "bf16", "fp16", "fp8", "int8"]
    assert {k: hw.DTYPE_BYTES[k] for k in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "int8")} == {
        "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1,
    }  # fmt: skip


def test_torch_dtypes_gives_a_kv_cache_its_table():
    # lmforge.infer.kv_cache.KV_DTYPES: what a cache stores, by every name a user may give
    table = hw.torch_dtypes("fp32", "bf16", "fp16", "int8")
    assert table["fp32"] is table["float32"] is torch.float32 and table["bfloat16"] is torch.bfloat16
    assert table["float16"] is torch.float16 and table["int8"] is torch.int8 and "fp8" not in table
    assert set(hw.torch_dtypes()) == set(hw.DTYPE_BYTES)


def test_importing_hardware_does_not_import_torch():
    # the CLI's argument tables (QUANT_CHOICES, PRECISIONS) read it while `lmforge --help` stays torch-free
    import subprocess

    code = "import sys, lmforge.hardware; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quant_bytes_per_weight():
    assert hw.QUANT_SCHEMES == ("int8", "w8a8", "int4", "bf16")
    assert hw.quant_bytes_per_weight("int8") == hw.quant_bytes_per_weight("w8a8") == 1.0
    assert hw.quant_bytes_per_weight("bf16") == 2.0
    assert hw.quant_bytes_per_weight("int4", 64) == pytest.approx(0.5 + 5 / 64)
    assert hw.quant_bytes_per_weight("int4", 128) == pytest.approx(0.5 + 5 / 128)
    with pytest.raises(ValueError, match="unknown quantization scheme 'nf4'"):
        hw.quant_bytes_per_weight("nf4")


@pytest.mark.parametrize(
    "name, dtype, label, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, "H100 SXM", 989),
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "bf16", "H100 NVL", 835),
        ("NVIDIA H200", torch.bfloat16, "H200", 989),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, "A100", 312),
        ("NVIDIA A100-PCIE-40GB", torch.float32, "A100", 19.5),
        ("NVIDIA A100 80GB PCIe", "fp16", "A100", 312),
        ("NVIDIA A10G", "bf16", "A10G", 125),
        ("NVIDIA A10", "fp32", "A10", 31.2),
        ("NVIDIA L4", "bfloat16", "L4", 121),
        ("NVIDIA L40S", "bf16", "L40S", 362.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, "RTX 4090", 165.2),
    ],
)
def test_nominal_lookup_picks_the_specific_variant(name, dtype, label, tflops):
    flops, source = hw.nominal_peak(name, dtype)
    assert flops == pytest.approx(tflops * 1e12)
    assert source.startswith(f"nominal {label} ")


def test_nominal_lookup_misses_unknown_devices():
    assert hw.nominal_peak("NVIDIA GeForce GTX 1080", "bf16") is None
    assert hw.nominal_peak("NVIDIA L40", "bf16") is None  # not the L4, not the L40S


def test_nominal_table_is_dense_and_consistent():
    for label, entry in hw.NOMINAL_PEAKS.items():
        assert entry["bf16"] == entry["fp16"], label  # fp32 accumulation: the same rate
        assert entry["fp32"] < entry["bf16"], label
        assert entry["source"], label


def test_matmul_kinds():
    assert hw.matmul_kind(torch.float32) == hw.matmul_kind("float32") == hw.matmul_kind("float") == "fp32"
    assert hw.matmul_kind(torch.bfloat16) == hw.matmul_kind("BF16") == "bf16"
    assert hw.matmul_kind("tf32") == "tf32" and hw.matmul_kind("half") == "fp16"
    for bad in (torch.int8, "fp8", "int4"):
        with pytest.raises(ValueError):
            hw.matmul_kind(bad)


@pytest.mark.parametrize(
    "flags, isa, native",
    [
        ({"avx2", "fma"}, "AVX2", False),  # bf16 emulated, ~100× slower than fp32
        ({"avx2", "avx512f"}, "AVX-512", False),  # AVX-512 without its bf16 extension: still emulated
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX-512 bf16", True),
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "AMX-bf16", True),
    ],
)
def test_cpu_isa_and_native_bf16_from_the_flags(monkeypatch, flags, isa, native):
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    assert hw.cpu_isa() == isa and hw.cpu_has_native_bf16() is native


def test_cpu_detection_on_this_machine():
    assert hw.cpu_model() and hw.cpu_isa()
    assert isinstance(hw.cpu_flags(), frozenset)
    assert hw.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & hw.cpu_flags())
