"""benchmarks/fa4_ptx.py on the CPU: what runs without FA4 installed (FA4 itself compiles only where
flash-attn-4 and nvidia-cutlass-dsl are, see the script)."""

import pytest

from benchmark_testing import load_benchmark


def test_ptx_is_relabelled_for_ptxas_13_0_and_loses_its_trailing_nuls():
    ptx = "//\n.version 9.4\n.target sm_90a\n.entry k() { ret; }\n\x00\x00"
    fixed = load_benchmark("fa4_ptx").for_ptxas_13_0(ptx)
    assert fixed == "//\n.version 9.0\n.target sm_90a\n.entry k() { ret; }\n"
    assert load_benchmark("fa4_ptx").for_ptxas_13_0(fixed) == fixed


def test_help_runs_without_fa4(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("fa4_ptx").main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--seq" in help_text and "--backward" in help_text
