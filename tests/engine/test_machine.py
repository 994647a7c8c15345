"""The CPU description printed beside every benchmark report."""

from dyhead_cli.engine.machine import cpu_description, cpu_line

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm sve sve2
CPU implementer\t: 0x41
"""


def test_model_and_vector_extensions_of_the_first_processor():
    d = cpu_description(ZEN4)
    assert d["model"] == "AMD EPYC 9R14 96-Core Processor"
    assert d["vector_extensions"] == [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
    ]
    assert cpu_line(d) == f"AMD EPYC 9R14 96-Core Processor ({' '.join(d['vector_extensions'])})"


def test_arm_features_line_and_missing_model_name():
    d = cpu_description(ARM)
    assert d["vector_extensions"] == ["asimd", "sve", "sve2"]
    assert isinstance(d["model"], str)


def test_no_cpuinfo_says_extensions_are_unknown():
    d = cpu_description("")
    assert d["vector_extensions"] == []
    assert cpu_line(d).endswith("(vector extensions unknown)")
