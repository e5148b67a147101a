"""benchmarks/attention.py on the CPU (--dry-run: the Triton twin in interpret mode, the same timing,
error and JSON code as the GPU run) and benchmarks/fa4.py's block lists (FA4 itself needs a GPU)."""

import json
import types

import numpy as np
import pytest

from radial_jax import radial_block_mask
from radial_jax.kernels import DEFAULT_MOSAIC_BWD, DEFAULT_MOSAIC_FWD, KernelTuning

from benchmark_testing import load_benchmark


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_dry_run_times_ours_and_writes_json(tmp_path, backward):
    # The variants run on the Triton twin here (it ignores the Mosaic tunings): the bookkeeping
    # around them (timing, the default again, speed ratio, sampled error) is what is checked.
    out = tmp_path / "attention.json"
    variant = "fused_bwd" if backward else "lazy_rescale_fwd"
    load_benchmark("attention").main(["--dry-run", "--decay", "0.5", "--out", str(out), "--variants", variant]
                            + (["--backward"] if backward else []))  # fmt: skip
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "jax", "rows"} <= set(record)
    (row,) = record["rows"]
    assert row["shape"] == "tiny" and row["decay"] == 0.5
    assert row["ours_radial_ms"] > 0 and row["ours_all_on_ms"] > 0 and row["ours_radial_tflops"] > 0
    assert row[f"ours_radial_{variant}_ms"] > 0 and row["ours_radial_again_ms"] > 0
    assert row[f"ours_radial_{variant}_speed_vs_default"] == row["ours_radial_ms"] / row[f"ours_radial_{variant}_ms"]
    if backward:
        assert row["ours_radial_fwd_only_msec"] > 0 and row[f"ours_radial_{variant}_bwd_only_tflops"] > 0
    else:  # bf16 inputs, f32 reference: a wrong block or row would be O(1)
        assert row["ours_radial_max_err_sampled_blocks"] < 3e-2
        assert row[f"ours_radial_{variant}_max_err_sampled_blocks"] < 3e-2


def test_variants_refuse_a_backward_design_without_backward():
    with pytest.raises(SystemExit, match="backward designs need --backward"):
        load_benchmark("attention").main(["--dry-run", "--variants", "fused_bwd"])


def test_backward_variants_differ_from_the_default_only_in_the_mosaic_backward():
    for tuning in load_benchmark("attention").backward_variants().values():
        assert isinstance(tuning, KernelTuning) and tuning.mosaic_bwd != DEFAULT_MOSAIC_BWD
        assert tuning == KernelTuning(mosaic_bwd=tuning.mosaic_bwd)


def test_forward_variants_differ_from_the_default_only_in_the_mosaic_forward():
    for tuning in load_benchmark("attention").forward_variants().values():
        assert isinstance(tuning, KernelTuning) and tuning.mosaic_fwd != DEFAULT_MOSAIC_FWD
        assert tuning == KernelTuning(mosaic_fwd=tuning.mosaic_fwd)


def test_every_forward_variant_is_a_design_the_mosaic_forward_accepts():
    # The GPU run would stop at a variant whose fields the kernel refuses (e.g. overlap_p_smem without
    # overlap_late_p); tracing the Mosaic forward (no lowering, no GPU) runs those checks in a second.
    import jax
    import jax.numpy as jnp

    from radial_jax.kernels import mosaic_fwd
    from radial_jax.kernels.tables import block_tables

    tables = block_tables(np.ones((3, 3), bool), 128, 300, 300)
    q = jax.ShapeDtypeStruct((1, 300, 12, 128), jnp.bfloat16)  # 12 heads, as at 1.3B: every launch order divides them
    for name, tuning in load_benchmark("attention").forward_variants().items():
        forward = lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning.mosaic_fwd)
        out, lse = jax.eval_shape(forward, q, q, q)
        assert out.shape == q.shape and lse.shape == (1, 12, 300), name


def test_every_backward_variant_is_a_design_the_mosaic_backward_accepts():
    # As above for the backward (e.g. fused_order without fused=True); jax 0.10 refuses only the
    # fused kernel itself, after the fields are checked.
    import jax
    import jax.numpy as jnp

    from radial_jax.kernels import mosaic_bwd
    from radial_jax.kernels.tables import block_tables

    tables = block_tables(np.ones((3, 3), bool), 128, 300, 300)
    q = jax.ShapeDtypeStruct((1, 300, 12, 128), jnp.bfloat16)  # 12 heads, as at 1.3B: every launch order divides them
    rows = jax.ShapeDtypeStruct((1, 12, 300), jnp.float32)
    for name, tuning in load_benchmark("attention").backward_variants().items():
        backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning.mosaic_bwd)
        try:
            grads = jax.eval_shape(backward, q, q, q, q, rows, q, rows)
        except NotImplementedError as error:
            assert tuning.mosaic_bwd.fused and jax.__version_info__ < (0, 11), (name, error)
            continue
        assert [g.shape for g in grads] == [q.shape] * 3, name


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
def test_fa4_block_lists_hold_each_rows_blocks_ascending(transpose):
    mask = radial_block_mask(9, 300, decay_factor=0.5)
    mask = np.ascontiguousarray(mask.T) if transpose else mask
    counts, ids = load_benchmark("fa4").block_lists(mask)
    assert counts.dtype == ids.dtype == np.int32 and ids.shape == mask.shape
    for row in range(mask.shape[0]):
        on = np.flatnonzero(mask[row])
        assert counts[row] == on.size
        assert ids[row, : on.size].tolist() == on.tolist() and not ids[row, on.size :].any()


def test_batched_timing_issues_batch_calls_per_sample_after_the_warmup():
    attention = load_benchmark("attention")
    calls = []
    seconds = attention.median_seconds(lambda: calls.append(1) or len(calls), iters=2, settle_s=0.0, warmup=2, batch=3)
    assert len(calls) == 2 + 2 * 3 and seconds >= 0.0


def test_dry_run_records_the_batch_it_timed_with(tmp_path):
    out = tmp_path / "attention.json"
    load_benchmark("attention").main(["--dry-run", "--batch", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["batch"] == 2 and record["rows"][0]["ours_radial_ms"] > 0


def test_torch_runs_reach_the_child_process_and_refuse_unknown_names(monkeypatch):
    attention = load_benchmark("attention")
    with pytest.raises(SystemExit, match=r"unknown --torch-runs \['fa5'\]"):
        attention.main(["--dry-run", "--torch-runs", "fa4,fa5"])
    seen = []
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: seen.append(cmd) or types.SimpleNamespace(
        stdout='TORCH_JSON {"tiny": {"fa4": 1.5}}\n', returncode=0, stderr=""))
    args = types.SimpleNamespace(iters=2, decay=1.0, settle=0.0, batch=1, backward=False, torch_runs="fa4")
    assert attention.torch_in_subprocess(["tiny"], args) == {"tiny": {"fa4": 1.5}}
    assert seen[0][seen[0].index("--torch-runs") + 1] == "fa4" and "--torch-only" in seen[0]
