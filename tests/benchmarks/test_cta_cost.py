"""benchmarks/cta_cost.py on the CPU: its masks, its fit, and its plumbing (--dry-run runs the Triton
twin in interpret mode at a tiny shape; the timings themselves need a GPU)."""

import json

import numpy as np
import pytest

from benchmark_testing import load_benchmark


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_band_masks_give_every_query_block_exactly_k_key_blocks(steps):
    mask = load_benchmark("fa4").band_mask(7, steps)
    assert mask.shape == (7, 7) and (mask.sum(axis=1) == steps).all()
    assert all(mask[i, i] and mask[i, (i + steps - 1) % 7] for i in range(7))  # its own block onward, wrapping
    assert (mask.sum(axis=0) == steps).all()  # a band: every key block is seen as often


def test_the_fit_reads_a_line_back_per_cta():
    cta_cost = load_benchmark("cta_cost")
    steps = [1, 2, 4, 8, 16]
    # 3,072 CTAs on 132 SMs, 5 us fixed and 1.6 us a step per CTA: (3072 / 132) * (5 + 1.6 k) us
    waves = 3072 / 132
    intercept, slope = cta_cost.fit_line(steps, [waves * (5 + 1.6 * k) * 1e-3 for k in steps])
    read = cta_cost.per_cta(intercept, slope, 3072, 132)
    assert read["waves"] == pytest.approx(waves)
    assert read["cta_fixed_us"] == pytest.approx(5.0) and read["step_us"] == pytest.approx(1.6)


def test_dry_run_fits_the_default_and_a_variant(tmp_path):
    out = tmp_path / "cta.json"
    record = load_benchmark("cta_cost").main(["--dry-run", "--variants", "heads4_fwd", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    for row in record["designs"].values():
        assert list(row["band_ms"]) == ["1", "2"]
        assert all(np.isfinite(v) and v > 0 for v in row["band_ms"].values()) and row["radial_ms"] > 0
        assert row["ctas"] == 3 * 2 and row["radial_predicted_ms"] == pytest.approx(
            row["fit_intercept_ms"] + row["fit_slope_ms_per_step"] * row["radial_mean_count"])


def test_unknown_variants_and_a_single_step_count_are_refused(capsys):
    cta_cost = load_benchmark("cta_cost")
    with pytest.raises(SystemExit):
        cta_cost.main(["--dry-run", "--variants", "no_such_fwd"])
    assert "no_such_fwd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cta_cost.main(["--dry-run", "--steps", "4"])
    assert "at least two" in capsys.readouterr().err


def test_a_timing_table_is_read_per_cta_for_ours_and_fa4_alike():
    # read_fit takes {mask name: ms} from either timer: here made up from 4 us fixed and 1.5 us a
    # step per CTA at 1.3B 480p-81f (3,072 CTAs on 132 SMs), the radial mask 10% slower than predicted.
    cta_cost = load_benchmark("cta_cost")
    names = cta_cost.masks("1.3b-480p-81f", [1, 4, 16])
    assert list(names) == ["band 1", "band 4", "band 16", "radial"]
    waves = 3072 / 132
    mean_count = float(names["radial"].sum(axis=1).mean())
    times = {f"band {k}": waves * (4 + 1.5 * k) * 1e-3 for k in (1, 4, 16)}
    times["radial"] = 1.1 * waves * (4 + 1.5 * mean_count) * 1e-3
    row = cta_cost.read_fit("1.3b-480p-81f", times, 132)
    assert row["ctas"] == 3072 and row["band_ms"] == {"1": times["band 1"], "4": times["band 4"], "16": times["band 16"]}
    assert row["cta_fixed_us"] == pytest.approx(4.0) and row["step_us"] == pytest.approx(1.5)
    assert row["radial_ms"] / row["radial_predicted_ms"] == pytest.approx(1.1)
    assert row["fixed_share_at_radial"] == pytest.approx(4 / (4 + 1.5 * mean_count))


def test_fa4_needs_a_gpu():
    with pytest.raises(SystemExit, match="--fa4"):
        load_benchmark("cta_cost").main(["--dry-run", "--fa4"])
