"""benchmarks/wgmma_hazards.py: its PTX patterns put the one register write where each name says, its
reading of ptxas's warnings, and (where a ptxas is installed; it needs no GPU) ptxas's verdicts."""

import json
import shutil
import subprocess

import pytest

from benchmark_testing import load_benchmark


def _loop_body(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[lines.index("LOOP:") + 1 : lines.index("@%more bra LOOP;")]


def _first(body, prefix, start=0):
    return next(i for i in range(start, len(body)) if body[i].startswith(prefix))


@pytest.mark.parametrize("pattern", ["cast_in_flight", "cast_after_wait"])
def test_the_cast_of_p_sits_on_its_side_of_the_wait(pattern):
    body = _loop_body(load_benchmark("wgmma_hazards").ptx(pattern))
    cast, wait_0 = _first(body, "cvt.rn.bf16x2.f32"), body.index("wgmma.wait_group.sync.aligned 0;")
    wait_1 = body.index("wgmma.wait_group.sync.aligned 1;")
    assert (wait_1 < cast < wait_0) if pattern == "cast_in_flight" else cast > wait_0
    assert sum(line.startswith("wgmma.mma_async") for line in body) == 2  # S then P V, both in flight


def test_the_rescale_between_sits_after_the_s_issue_and_before_p_vs_fence():
    body = _loop_body(load_benchmark("wgmma_hazards").ptx("rescale_between"))
    s_issue = _first(body, "wgmma.mma_async")
    multiply = _first(body, "mul.f32 %o")
    pv_issue = _first(body, "wgmma.mma_async", s_issue + 1)
    assert s_issue < multiply < body.index("wgmma.fence.sync.aligned;", multiply) < pv_issue
    assert not any(line.startswith("mul.f32 %o") for line in body[pv_issue:])


def test_messages_keep_the_codes_and_drop_the_line_numbers():
    output = ("ptxas info    : (C7519) warpgroup.arrive is injected in around line 456 by compiler to allow use "
              "of registers in GMMA in function 'kernel'\nptxas info    : Used 168 registers\n")
    expected = "C7519 warpgroup.arrive is injected by compiler to allow use of registers in GMMA"
    assert load_benchmark("wgmma_hazards").messages(output) == [expected]


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas on PATH (the CUDA toolkit's; no GPU needed)")
def test_ptxas_serializes_only_the_writes_into_a_wgmma_in_flight(tmp_path):
    results, _ = load_benchmark("wgmma_hazards").main(["--emit", str(tmp_path)])
    codes = {name: [m.split()[0] for m in found] for name, found in results.items()}
    assert codes["cast_in_flight"] == ["C7513"] and codes["o_in_flight"] == ["C7515"]
    assert codes["cast_after_wait"] == [] and codes["p_before_fence"] == []
    assert codes["rescale_between"] == ["C7517"]  # ptxas 13.0 waits for S before O's multiply
    assert codes["bwd_fa4_step"] == []  # dQ zeroed and dS^T cast while dV runs, dQ stored while dK runs


def test_the_fa4_backward_step_commits_and_waits_as_the_lowered_kernel_does():
    # The sequence test_mosaic_lowering.py reads from MosaicBwdTuning(fused_order="fa4")'s loop:
    # S^T and dP^T, wait 1, dV, wait 1, dQ and dK, wait 2, wait 1, wait 0; P^T cast before dV's fence,
    # dQ's zeros after dV's issue, dQ's store after the wait 1 that retires it.
    body = _loop_body(load_benchmark("wgmma_hazards").ptx("bwd_fa4_step"))
    syncs = [line.split()[-1].rstrip(";") for line in body if line.startswith(("wgmma.commit", "wgmma.wait"))]
    assert syncs == ["wgmma.commit_group.sync.aligned"] * 2 + ["1", "wgmma.commit_group.sync.aligned", "1"] + \
        ["wgmma.commit_group.sync.aligned"] * 2 + ["2", "1", "0"]
    dv_issue = next(i for i, line in enumerate(body) if "{%p0" in line)
    assert _first(body, "cvt.rn.bf16x2.f32 %p") < dv_issue < _first(body, "mov.f32 %q")
    assert _first(body, "st.shared.f32") > body.index("wgmma.wait_group.sync.aligned 2;")


def _llc_with_nvptx():
    llc = shutil.which("llc")
    if llc is None:
        return None
    targets = subprocess.run([llc, "--version"], capture_output=True, text=True).stdout
    return llc if "nvptx64" in targets else None


@pytest.mark.skipif(_llc_with_nvptx() is None, reason="no llc with the NVPTX target on PATH")
def test_llvm_puts_an_early_cast_into_the_registers_of_the_p_v_in_flight():
    # The mechanism behind C7513: LLVM sees P_j dead once the P V asm is issued and coalesces the
    # loop-carried P_{j+1} into its register; only the cast's position differs with overlap_late_p.
    placements = load_benchmark("wgmma_hazards").main(["--llc", _llc_with_nvptx()])[1]
    assert placements["overlap_qk"] == {"cast_writes_the_p_v_operand": True, "cast_between_the_waits": True}
    assert placements["late_p"] == {"cast_writes_the_p_v_operand": True, "cast_between_the_waits": False}


def _fake_ptxas(tmp_path, body: str) -> str:
    """An executable standing in for ptxas (CI has none): `--version`, then `body` for each compile."""
    path = tmp_path / "ptxas"
    path.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "ptxas fake"; echo "Build fake_1.0"; exit 0; fi\n'
                    + body)  # fmt: skip
    path.chmod(0o755)
    return str(path)


def test_main_records_each_patterns_messages_and_writes_the_ptx_it_compiled(tmp_path):
    # The script's bookkeeping without a real ptxas: which file went to which verdict, the JSON, --emit.
    warning = ("ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are serialized "
               "in function 'overlapped_step'")
    ptxas = _fake_ptxas(tmp_path, f'case "$3" in *cast_in_flight.ptx) echo "{warning}";; esac\nexit 0\n')
    hazards, out = load_benchmark("wgmma_hazards"), tmp_path / "hazards.json"
    results, placements = hazards.main(["--ptxas", ptxas, "--out", str(out), "--emit", str(tmp_path / "ptx")])
    expected = {name: [] for name in hazards.PATTERNS} | {
        "cast_in_flight": ["C7513 Potential Performance Loss: wgmma.mma_async instructions are serialized"]}
    assert results == expected and placements == {}
    record = json.loads(out.read_text())
    assert record["messages"] == expected and record["ptxas"] == "Build fake_1.0" and record["date"]
    assert "llc" not in record
    for name in hazards.PATTERNS:
        assert (tmp_path / "ptx" / f"{name}.ptx").read_text() == hazards.ptx(name)


def test_main_stops_with_one_line_naming_the_pattern_ptxas_rejected(tmp_path):
    ptxas = _fake_ptxas(tmp_path, 'echo "ptxas fatal   : Unresolved extern" >&2\nexit 1\n')
    with pytest.raises(SystemExit, match="ptxas rejected cast_in_flight: ptxas fatal   : Unresolved extern"):
        load_benchmark("wgmma_hazards").main(["--ptxas", ptxas])
