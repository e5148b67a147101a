"""The Mosaic GPU kernels lower for CUDA on a machine without a GPU.

jax's cross-platform lowering (`.trace(...).lower(lowering_platforms=("cuda",))`) runs the whole
Pallas Mosaic GPU lowering here: wgmma shapes and transposes, smem tilings and swizzles, TMA
copies, barriers. The kernels themselves run only on a Hopper GPU (test_kernels.py); this
catches tracing and lowering errors in CI, on the jax version CI has.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import core as mosaic_gpu_core
from jax.extend.core import jaxprs_in_params

from radial_jax import radial_block_mask
from radial_jax.kernels import KernelTuning, mosaic_bwd, mosaic_fwd
from radial_jax.kernels.common import HOPPER_SMS, LAZY_MOSAIC_FWD, block_grid
from radial_jax.kernels.tables import block_tables

# (q_len, kv_len, heads, head_dim); the last two are not multiples of 8 (the TMA's row tiling).
CASES = [(1000, 1000, 3, 128), (512, 768, 1, 64), (1560, 1000, 2, 128), (4100, 257, 2, 128), (7, 129, 1, 64)]


def _lowered_text(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _setup(q_len, kv_len, heads, head_dim):
    mask = np.random.default_rng(q_len + kv_len).random((-(-q_len // 128), -(-kv_len // 128))) < 0.5
    mask[:, 0] = True
    tables = block_tables(mask, 128, q_len, kv_len)
    q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, kv_len, heads, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2, heads, q_len), jnp.float32)
    return tables, q, kv, rows


@pytest.mark.parametrize("case", CASES)
def test_forward_lowers_to_one_mosaic_kernel(case):
    tables, q, kv, _ = _setup(*case)
    text = _lowered_text(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1), q, kv, kv)
    assert text.count("mosaic_gpu") >= 1 and "wgmma" in text
    # The default's exact online softmax rescales every step (no warp vote); late_pv_wait's never-taken
    # branch keeps the wait for P V down.
    assert "vote.sync" not in text and "nanosleep" in text
    text = _lowered_text(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1,
                                                                   tuning=LAZY_MOSAIC_FWD), q, kv, kv)
    assert "vote.sync" in text  # the lazy rescale: a warp votes before it multiplies its accumulator rows


@pytest.mark.parametrize("case", CASES)
def test_lazy_rescale_forward_lowers_with_a_warp_vote(case):
    # MosaicTuning.lazy_rescale_threshold: each warp votes on whether any of its rows' max moved
    # and branches around the accumulator multiply (inline Mosaic GPU: vote.sync + scf.if).
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(lazy_rescale_threshold=8.0)
    text = _lowered_text(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                         q, kv, kv)  # fmt: skip
    assert "wgmma" in text and "vote.sync" in text and "scf.if" in text


@pytest.mark.parametrize("fields, message", [
    ({"lazy_rescale_threshold": 20.0}, "lazy_rescale_threshold=20.0"),  # p would overflow f16
    ({"exp2_poly_every": 0}, "exp2_poly_every=0"),
    ({"overlap_waits_first": True}, "overlap_waits_first"),  # without overlap_qk
    ({"named_turn": True}, "named_turn"),  # the default loop's rendezvous has no named-barrier form
    ({"late_pv_wait": True}, "late_pv_wait"),  # no P V in flight through the serial loop's softmax
    ({"late_pv_wait": True, "overlap_qk": True, "overlap_softmax": False}, "late_pv_wait"),
    # without late_pv_wait ptxas hoists the wait anyway; the lazy rescale's multiplies sit in a branch
    ({"pv_wait_after_cols": 16, "overlap_qk": True, "overlap_late_p": True}, "pv_wait_after_cols"),
    ({"pv_wait_after_cols": 12, "overlap_qk": True, "overlap_late_p": True, "late_pv_wait": True},
     "pv_wait_after_cols=12"),
    ({"producer_warp": True, "persistent": True}, "producer_warp"),
], ids=["lazy_overflow", "exp2_poly_0", "waits_first_alone", "named_turn_alone", "late_pv_wait_alone",
        "late_pv_wait_paired", "pv_wait_after_without_late_wait", "pv_wait_after_12",
        "producer_warp_persistent"])
def test_forward_refuses_a_tuning_it_cannot_run(fields, message):
    tables, q, kv, _ = _setup(*CASES[0])
    tuning = mosaic_fwd.MosaicTuning(**fields)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                       q, kv, kv)  # fmt: skip


# A wgmma commit_group or wait_group in a Mosaic GPU module as printed: jax 0.10.2 has nvvm ops
# (`...wgmma.wait.group.sync.aligned"() {group = 1 : i64}`), jax 0.11.2 inline PTX (`wgmma.wait_group.sync.aligned 1;`).
_WGMMA_SYNC = re.compile(r'wgmma\.commit[._]group|wgmma\.wait[._]group\.sync\.aligned(?:"\(\) \{group = | )(\d+)')


# In a forward module's text: a wgmma wait_group (its N), late_pv_wait's never-taken branch (its
# nanosleep), an exp2, a warp vote (the lazy rescale), in both jax versions' spellings.
_STEP_EVENTS = re.compile(r'wgmma\.wait[._]group\.sync\.aligned(?:"\(\) \{group = | )(\d)|(nanosleep)|(ex2\.approx)'
                          r"|(vote\.sync)")


def _step_events(module: str) -> str:
    """The module's _STEP_EVENTS in text order as one string: N of each wait, "N" a never-taken branch,
    "e" an exp2, "V" a vote (count a middle step's pattern in it)."""
    return "".join(n or ("N" if sleep else "e" if exp2 else "V") for n, sleep, exp2, _ in _STEP_EVENTS.findall(module))


def _forward_module(monkeypatch, tables, q, kv, tuning) -> str:
    """Lowers the forward for CUDA and returns its Mosaic GPU module's text (see _mosaic_modules)."""
    forward = lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning)
    (module,) = _mosaic_modules(monkeypatch, forward, q, kv, kv)
    return module


def _mosaic_modules(monkeypatch, fn, *shapes) -> list[str]:
    """Lowers fn for CUDA and returns its Mosaic GPU modules' text, printed without locations before
    serialization (as_text shows only the bytecode, whose string table holds each name once)."""
    modules = []
    serialize = mosaic_gpu_core._run_serde_pass

    def capture(module, **kwargs):
        module = serialize(module, **kwargs)
        # jax 0.11 numbers each kernel it lowers in the module's dump name: not part of the kernel
        text = module.operation.get_asm(enable_debug_info=False)
        modules.append(re.sub(r'mosaic_gpu\.dump_basename = "\w+"', "", text))
        return module

    monkeypatch.setattr(mosaic_gpu_core, "_run_serde_pass", capture)
    _lowered_text(fn, *shapes)
    return modules


def _wait_matches(module: str) -> list[re.Match]:
    """The _WGMMA_SYNC matches of the module's wgmma wait_group N, in text order (slice the text between them)."""
    return [m for m in _WGMMA_SYNC.finditer(module) if m.group(1) is not None]


def _wgmma_waits(module: str) -> list[tuple[int, int]]:
    """Returns (N, wgmma groups committed since the previous wait) for each wgmma wait_group N, in text order."""
    waits, committed = [], 0
    for match in _WGMMA_SYNC.finditer(module):
        if match.group(1) is None:
            committed += 1
        else:
            waits.append((int(match.group(1)), committed))
            committed = 0
    return waits


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lazy", [None, 8.0], ids=["exact", "lazy"])
@pytest.mark.parametrize("order", [{}, {"overlap_late_p": True, "overlap_early_rescale": True},
                                   {"overlap_late_p": True, "overlap_p_smem": True}], ids=["plain", "fa3", "p_smem"])
def test_overlap_forward_keeps_p_v_in_flight_through_the_softmax(monkeypatch, case, lazy, order):
    # MosaicTuning(overlap_qk=True): each middle step commits S_{j+1} = Q K^T and O += P_j V_j
    # (two groups) and waits with wait_group 1, i.e. for S alone; the softmax then runs before a
    # wait_group 0 with nothing committed in between. In text order, per key loop (the ragged key
    # block has its own, masked): the first step's S alone, then the middle steps; after them the
    # last P V alone and the final read of O.
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(overlap_qk=True, lazy_rescale_threshold=lazy, **order)
    waits = _wgmma_waits(_forward_module(monkeypatch, tables, q, kv, tuning))
    first, middle, last = [(0, 1)], [(1, 2), (0, 0)], [(0, 1), (0, 0)]
    assert waits == (first + middle) * (1 + tables.kv_ragged) + last, waits


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lazy", [None, 8.0], ids=["exact", "lazy"])
def test_paired_issue_waits_for_p_v_with_s_before_the_softmax(monkeypatch, case, lazy):
    # overlap_softmax=False: a middle step still commits S_{j+1} and P_j V_j under one turn, but waits
    # for both (wait_group 0) before the softmax, which then runs with no wgmma of its warpgroup in
    # flight: no second wait in the step, and V_j is released before the softmax's exp2s.
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(overlap_qk=True, overlap_softmax=False, lazy_rescale_threshold=lazy)
    module = _forward_module(monkeypatch, tables, q, kv, tuning)
    first, middle, last = [(0, 1)], [(0, 2), (0, 0)], [(0, 1), (0, 0)]
    assert _wgmma_waits(module) == (first + middle) * (1 + tables.kv_ragged) + last
    # From the first middle step's wait (the fifth sync: commit, wait; commit, commit, wait) to its first
    # exp2, K_{j+1} and V_j are released; the full overlap releases K_{j+1} only there.
    released = {}
    for softmax_overlaps in (False, True):
        text = _forward_module(monkeypatch, tables, q, kv, dataclasses.replace(tuning, overlap_softmax=softmax_overlaps))
        wait = [m.end() for m in _WGMMA_SYNC.finditer(text)][4]
        released[softmax_overlaps] = text[wait:text.index("ex2.approx", wait)].count("mbarrier.arrive")
    assert released == {False: 2, True: 1}, released
    with pytest.raises(ValueError, match="overlap_softmax=False"):
        _forward_module(monkeypatch, tables, q, kv, dataclasses.replace(tuning, overlap_late_p=True))


def _middle_steps(module: str) -> list[tuple[str, str, str]]:
    """Returns (issues, under, after) for each middle step of an overlapped loop, in text order: issues
    runs from the S_{j+1} commit to the P_j V_j commit, under from the wait_group 1 to the wait_group 0
    (P_j V_j in flight), after from the wait_group 0 to the end of the loop body (scf.yield)."""
    syncs = list(_WGMMA_SYNC.finditer(module))
    steps = []
    for i, sync in enumerate(syncs):
        if sync.group(1) != "1":
            continue
        commit_s, commit_pv, wait_0 = syncs[i - 2], syncs[i - 1], syncs[i + 1]
        assert commit_s.group(1) is None and commit_pv.group(1) is None and wait_0.group(1) == "0"
        end = module.index("scf.yield", wait_0.end())
        steps.append((module[commit_s.end():commit_pv.start()], module[sync.end():wait_0.start()],
                      module[wait_0.end():end]))  # fmt: skip
    return steps


@pytest.mark.parametrize("case", CASES)
def test_overlap_late_p_casts_p_only_after_its_p_v_is_waited_for(monkeypatch, case):
    # MosaicTuning.overlap_late_p: P_{j+1}'s bf16 cast (arith.truncf) must follow the wait_group 0
    # on P_j V_j. Before it, LLVM gives P_{j+1} P_j's registers (P_j is dead to it once the wgmma
    # asm is issued), so the cast writes an operand of the wgmma in flight and ptxas serializes
    # (C7513 on the H200, benchmarks/NOTES.md); the plain overlap casts there, as the check shows.
    tables, q, kv, _ = _setup(*case)
    for late_p in (False, True):
        tuning = mosaic_fwd.MosaicTuning(overlap_qk=True, overlap_late_p=late_p)
        steps = _middle_steps(_forward_module(monkeypatch, tables, q, kv, tuning))
        assert len(steps) == 1 + tables.kv_ragged, len(steps)
        casts = [(under.count("arith.truncf"), after.count("arith.truncf")) for _, under, after in steps]
        assert all((under == 0 and after > 0) if late_p else under > 0 for under, after in casts), (late_p, casts)


@pytest.mark.parametrize("case", CASES)
def test_overlap_early_rescale_scales_o_between_the_issues_and_fences_it(monkeypatch, case):
    # MosaicTuning.overlap_early_rescale (FA3's order): O's multiply sits between the S_{j+1} and
    # the P_j V_j commits, followed by a wgmma fence (O's store) before P V's wgmma; after the
    # wait_group 0 nothing is multiplied (the default overlap multiplies there, and not between).
    tables, q, kv, _ = _setup(*case)
    for early in (False, True):
        tuning = mosaic_fwd.MosaicTuning(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=early)
        for issues, _, after in _middle_steps(_forward_module(monkeypatch, tables, q, kv, tuning)):
            if early:
                last_multiply = issues.rindex("arith.mulf")
                assert "wgmma.fence" in issues[last_multiply:] and "arith.mulf" not in after
            else:
                assert "arith.mulf" not in issues and "arith.mulf" in after


# A register array stored to shared memory: jax 0.10.2 prints llvm stores, 0.11.2 stmatrix.
_SMEM_STORE = re.compile(r"llvm\.store|stmatrix")


@pytest.mark.parametrize("case", CASES)
def test_overlap_p_smem_issues_p_v_from_shared_memory_written_after_the_wait(monkeypatch, case):
    # MosaicTuning.overlap_p_smem: P V is an SS wgmma, so no register operand is fenced for it
    # (the issues hold no wgmma fence), and P_{j+1} reaches its tile after the wait_group 0 on
    # P_j V_j: cast, stored, then the async-proxy fence (commit_smem) before the next issue.
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(overlap_qk=True, overlap_late_p=True, overlap_p_smem=True)
    steps = _middle_steps(_forward_module(monkeypatch, tables, q, kv, tuning))
    assert len(steps) == 1 + tables.kv_ragged
    for issues, under, after in steps:
        assert "wgmma.fence" not in issues and "arith.truncf" not in under and not _SMEM_STORE.search(under)
        cast, store = after.index("arith.truncf"), _SMEM_STORE.search(after).start()
        assert cast < store < after.index("fence.proxy", store)


def test_overlap_order_fields_need_overlap_qk_and_p_smem_the_late_cast():
    tables, q, kv, _ = _setup(*CASES[0])
    refused = [({"overlap_late_p": True}, "set overlap_qk=True"), ({"overlap_early_rescale": True}, "set overlap_qk=True"),
               ({"overlap_qk": True, "overlap_p_smem": True}, "set overlap_late_p=True")]  # fmt: skip
    for fields, message in refused:
        tuning = mosaic_fwd.MosaicTuning(**fields)
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv)  # fmt: skip


def test_default_forward_never_has_two_wgmma_groups_in_flight(monkeypatch):
    tables, q, kv, _ = _setup(*CASES[0])
    waits = _wgmma_waits(_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning()))
    assert waits and all(n == 0 and committed <= 1 for n, committed in waits), waits


def _longest_chain(module: str, op: str) -> int:
    """The most `op` operations on one path of data dependencies between a module's SSA values
    (operands within one region; a loop's carried values start a new path each iteration)."""
    depth, longest = {}, 0
    for line in module.splitlines():
        match = re.match(r"\s*(%[\w.#-]+)(?::\d+)?(?:\s*,\s*%[\w.#-]+)*\s*=\s*(.*)$", line)
        if match:
            name, rhs = match.groups()
            d = max((depth.get(operand, 0) for operand in re.findall(r"%[\w.#-]+", rhs)), default=0)
            if op in rhs:
                d += 1
                longest = max(longest, d)
            depth[name] = d
    return longest


@pytest.mark.parametrize("fields", [{}, {"lazy_rescale_threshold": 8.0}, {"overlap_qk": True}],
                         ids=["default", "lazy", "overlap"])
def test_tree_reduce_shortens_the_softmax_reductions_only(monkeypatch, fields):
    # MosaicTuning.tree_reduce: the row max and sum take no more operations than Pallas's reductions
    # (jax 0.10.2: as many; 0.11.2 combines its partial chains with a few more), but at most 9 on one
    # dependency path (4 halvings of 128 columns, the last pair, 2 shuffles, the running max or sum,
    # and the lazy rescale's threshold add before the sum), where Pallas chains a row's registers
    # (19-20 deep for the max on jax 0.10.2 and 0.11.2, 13-19 for the sum).
    tables, q, kv, _ = _setup(*CASES[0])
    default, tree = (_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(tree_reduce=tree, **fields))
                     for tree in (False, True))  # fmt: skip
    for op in ("max.NaN.f32", "arith.addf"):
        assert tree.count(op) <= default.count(op), op
        assert _longest_chain(tree, op) <= 9 < _longest_chain(default, op), op
    assert _wgmma_waits(tree) == _wgmma_waits(default)
    assert tree.count("mbarrier") == default.count("mbarrier")


@pytest.mark.parametrize("every", [1, 2, 4])
def test_exp2_poly_moves_every_kth_tile_of_unmasked_blocks_off_ex2(monkeypatch, every):
    # MosaicTuning.exp2_poly_every: in the loop over unmasked key blocks a thread's 64 exp2 a step lose
    # 64 / every to the polynomial (3 FMAs a 2-element register); the masked blocks' loop keeps ex2.
    tables, q, kv, _ = _setup(*CASES[0])
    default, poly = (_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(exp2_poly_every=k))
                     for k in (None, every))  # fmt: skip
    assert default.count("ex2.approx") - poly.count("ex2.approx") == 64 // every
    assert poly.count("math.fma") - default.count("math.fma") == 3 * (64 // every) // 2
    assert _wgmma_waits(poly) == _wgmma_waits(default) and poly.count("mbarrier") == default.count("mbarrier")


def test_exp2_polynomial_stays_below_bf16_rounding():
    # The kernel's steps in f32 (numpy): clamp, magic-number round, polynomial, exponent add.
    x = np.concatenate([-np.geomspace(1e-7, 126, 200_001), np.linspace(-126, 0, 200_001), [0.0, -126.0]])
    x = x.astype(np.float32)
    clamped = np.maximum(x, np.float32(-126))
    magic = np.float32(mosaic_fwd._ROUND_MAGIC)
    shifted = clamped + magic
    frac = clamped - (shifted - magic)
    c = [np.float32(v) for v in mosaic_fwd._EXP2_POLY]
    p = ((c[3] * frac + c[2]) * frac + c[1]) * frac + c[0]
    bits = p.view(np.int32) + (shifted.view(np.int32) << 23)
    got = bits.view(np.float32).astype(np.float64)
    rel = np.abs(got / np.exp2(x.astype(np.float64)) - 1)
    normal = x > -125.5  # below, 2^j f lands on the exponent field's edge: a subnormal's 2^-126 scale
    assert float(rel[normal].max()) <= 7.6e-5 and float(rel.max()) <= 1.5e-4 < 2.0**-9
    below = np.array([-np.inf, -200.0, -126.5], np.float32)  # clamped: 2^-126, where ex2.approx.ftz gives 0
    shifted = np.maximum(below, np.float32(-126)) + magic
    frac = np.maximum(below, np.float32(-126)) - (shifted - magic)
    p = ((c[3] * frac + c[2]) * frac + c[1]) * frac + c[0]
    tiny = (p.view(np.int32) + (shifted.view(np.int32) << 23)).view(np.float32)
    assert bool((np.abs(tiny / np.float32(2.0**-126) - 1) <= 1.5e-4).all())


@pytest.mark.parametrize("order", [{"overlap_late_p": True}, {"overlap_softmax": False}], ids=["late_p", "paired"])
def test_named_turn_swaps_the_turn_mbarriers_for_named_barriers(monkeypatch, order):
    # MosaicTuning.named_turn: each of the overlapped loop's 5 phases (first and middle steps, unmasked and
    # masked, and the last) takes the turn with one bar.sync and passes it with one bar.arrive, plus
    # warpgroup 1's first pass; the mbarrier waits and arrivals of the turn token go, the ring's stay.
    tables, q, kv, _ = _setup(*CASES[0])
    mbarrier, named = (_forward_module(monkeypatch, tables, q, kv,
                                       mosaic_fwd.MosaicTuning(overlap_qk=True, named_turn=n, **order))
                       for n in (False, True))  # fmt: skip
    waits, arrives = (lambda m: len(re.findall(r"try_wait", m))), (lambda m: len(re.findall(r"mbarrier.arrive", m)))
    assert (named.count("bar.sync $0, 256"), named.count("bar.arrive $0, 256")) == (5, 6)
    assert (waits(mbarrier) - waits(named), arrives(mbarrier) - arrives(named)) == (5, 6)
    assert "bar.sync $0, 256" not in mbarrier and _wgmma_waits(named) == _wgmma_waits(mbarrier)


def _issue_events(module: str) -> str:
    """The module's barrier waits (W), wgmma fences (F), wgmma issues (M) and loops (L) in text order."""
    codes = {"try_wait": "W", "wgmma.fence": "F", "wgmma.mma_async": "M", "scf.for": "L"}
    return "".join(codes[m.group(0)] for m in re.finditer(r"try_wait|wgmma\.fence|wgmma\.mma_async|scf\.for", module))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_overlap_waits_first_opens_s_next_to_its_issue(monkeypatch, case):
    # MosaicTuning.overlap_waits_first: the first and middle steps wait for K and the turn (W W), then
    # open S's accumulator (its fence, F) right before the 8 issues (M), where the plain overlapped loop
    # fences S's zeroed registers first and waits after (F W W M); nothing else moves.
    tables, q, kv, _ = _setup(*case)
    plain, first = (_issue_events(_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(
        overlap_qk=True, overlap_late_p=True, overlap_waits_first=w))) for w in (False, True))
    steps = 4 if tables.kv_ragged else 2  # first and middle steps, unmasked (and masked)
    assert plain.count("FWWMMMMMMMM") == steps and first.count("FWWMMMMMMMM") == 0
    assert first.count("WWFMMMMMMMM") == steps + plain.count("WWFMMMMMMMM")
    assert sorted(plain) == sorted(first)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_late_pv_wait_puts_one_never_taken_branch_after_each_middle_steps_wait_for_s(monkeypatch, case):
    # MosaicTuning.late_pv_wait: in each middle-step loop (unmasked, and masked with a ragged key block),
    # between the wait for S (wait_group 1) and the one for P V (wait_group 0), a branch on the thread
    # index (tid.x >= 4096, read by an asm so that LLVM cannot fold it) around a nanosleep; nothing else
    # changes (the same wgmma waits as without it).
    tables, q, kv, _ = _setup(*case)
    early = dataclasses.replace(LAZY_MOSAIC_FWD, late_pv_wait=False)
    default = _forward_module(monkeypatch, tables, q, kv, early)
    late = _forward_module(monkeypatch, tables, q, kv, dataclasses.replace(early, late_pv_wait=True))
    middles = 1 + tables.kv_ragged
    assert "nanosleep" not in default and late.count("nanosleep.u32 0;") == middles
    assert late.count("mov.u32 $0, %tid.x;") == middles and _wgmma_waits(late) == _wgmma_waits(default)
    order = re.sub("[eV]", "", _step_events(late))  # the waits and the branch only
    assert order.count("1N0") == middles, order


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_pv_wait_after_cols_waits_for_p_v_after_that_many_columns_exp2(monkeypatch, case):
    # MosaicTuning.pv_wait_after_cols: in each middle-step loop (unmasked, and masked with a ragged key
    # block), after late_pv_wait's branch (N), the 2 exp2 of O's row factors and 4 per 8 head columns (a
    # thread holds 2 rows x 2 columns of each 8-column tile), then the wait for P V (0), then the other
    # exp2 of S: 66 in all, as in the exact late_pv_wait loop, which has them all before the wait.
    tables, q, kv, _ = _setup(*case)
    middles = 1 + tables.kv_ragged

    def order(cols):
        tuning = dataclasses.replace(LAZY_MOSAIC_FWD, lazy_rescale_threshold=None, pv_wait_after_cols=cols)
        return _step_events(_forward_module(monkeypatch, tables, q, kv, tuning))

    assert order(None).count("1N" + "e" * 66 + "0") == middles
    for cols in (0, 8, 16, 24):  # 0: the wait right after O's row factors' exp2
        head = 2 + cols // 2
        assert order(cols).count("1N" + "e" * head + "0" + "e" * (66 - head) + "0") == middles, cols

@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_row_sum_in_thread_shuffles_the_sum_once_after_the_loop(monkeypatch, case):
    # MosaicTuning.row_sum_in_thread: no step shuffles its row sum (each softmax loses the sum's shuffles,
    # the max keeps its own) and one reduction across the threads follows the loop; the same exp2 and
    # wgmma waits. In each middle-step loop a second never-taken branch (N) comes after all 66 exp2 and
    # before the wait for P V (0), which ptxas would otherwise hoist to the max's shuffles.
    tables, q, kv, _ = _setup(*case)
    default, in_thread = (_forward_module(monkeypatch, tables, q, kv, dataclasses.replace(
        LAZY_MOSAIC_FWD, row_sum_in_thread=flag)) for flag in (False, True))
    shuffles = lambda module: len(re.findall(r"shfl_kind[< ]bfly>", module))  # jax 0.11 / 0.10 spellings
    softmaxes = 2 * (1 + tables.kv_ragged)  # first and middle steps, unmasked (and masked)
    per_reduction = shuffles(default) // (2 * softmaxes)  # each softmax: the max's and the sum's
    assert per_reduction > 0 and shuffles(default) == 2 * softmaxes * per_reduction
    assert shuffles(in_thread) == (softmaxes + 1) * per_reduction
    assert default.count("ex2.approx") == in_thread.count("ex2.approx")
    assert _wgmma_waits(default) == _wgmma_waits(in_thread)
    order = _step_events(in_thread)
    assert order.count("1N" + "e" * 66 + "N0") == 1 + tables.kv_ragged, order


@pytest.mark.parametrize("cols", [8, 16])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_row_sum_in_thread_with_the_wait_after_some_columns_keeps_both_orders(monkeypatch, case, cols):
    # row_sum_in_thread with pv_wait_after_cols (FA4's loop: 4 shuffles a step, the wait for P V after
    # a few exp2): the sum's shuffles leave every step as with row_sum_in_thread alone, and each middle
    # step waits for P V after the 2 exp2 of O's factors and S's first cols / 2 (a thread's share of
    # those columns), as with pv_wait_after_cols alone (no second never-taken branch: the wait sits in
    # the exp2's own code).
    tables, q, kv, _ = _setup(*case)
    exact = dataclasses.replace(LAZY_MOSAIC_FWD, lazy_rescale_threshold=None)
    default, both = (_forward_module(monkeypatch, tables, q, kv, dataclasses.replace(exact, **fields))
                     for fields in ({}, dict(row_sum_in_thread=True, pv_wait_after_cols=cols)))
    shuffles = lambda module: len(re.findall(r"shfl_kind[< ]bfly>", module))
    softmaxes = 2 * (1 + tables.kv_ragged)
    per_reduction = shuffles(default) // (2 * softmaxes)
    assert per_reduction > 0 and shuffles(both) == (softmaxes + 1) * per_reduction
    assert default.count("ex2.approx") == both.count("ex2.approx")
    order = _step_events(both)
    head = 2 + cols // 2
    assert order.count("1N" + "e" * head + "0" + "e" * (66 - head) + "0") == 1 + tables.kv_ragged, order


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_lazy_rescale_in_fa4_order_waits_then_votes_and_branches(monkeypatch, case):
    # The default (FA4's order: the wait for P V after S's first 8 columns' exp2) with the lazy rescale:
    # in each middle step, after the head's exp2, a second never-taken branch (N) whose condition reads
    # them (else ptxas sinks them below the wait, which it puts before the branch holding O's first
    # use), the wait for P V (0), the warp's vote (V), O's multiplies in a branch, the other exp2; the
    # same exp2 and wgmma waits as the exact default.
    tables, q, kv, _ = _setup(*case)
    middles = 1 + tables.kv_ragged
    exact = _forward_module(monkeypatch, tables, q, kv, mosaic_fwd.GRID_MOSAIC_FWD)
    lazy = _forward_module(monkeypatch, tables, q, kv, dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD,
                                                                           lazy_rescale_threshold=8.0))
    assert "vote.sync" not in exact and lazy.count("ex2.approx") == exact.count("ex2.approx")
    assert _wgmma_waits(lazy) == _wgmma_waits(exact)
    order = _step_events(lazy)
    head = 2 + mosaic_fwd.GRID_MOSAIC_FWD.pv_wait_after_cols // 2
    assert order.count("1N" + "e" * head + "N0V" + "e" * (66 - head)) == middles, order


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_producer_warp_loads_k_and_v_without_a_warpgroup_barrier(monkeypatch, case):
    # MosaicTuning.producer_warp: the memory warpgroup's K/V loads (TMA, global to shared) run on one
    # warp in single-warp semantics, so no warpgroup barrier (bar.sync) precedes each of them, as one
    # does in warpgroup semantics (every thread arrives with its share of the bytes first); a bar.sync
    # opens and one closes the warp's part. The compute warpgroups' loads and barriers are unchanged.
    tables, q, kv, _ = _setup(*case)

    def order(producer_warp):
        tuning = dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, producer_warp=producer_warp)
        events = re.findall(r"(bar\.sync)|cp\.async\.bulk\.tensor\.shared\.cluster\.global",
                            _forward_module(monkeypatch, tables, q, kv, tuning))
        return "".join("B" if sync else "L" for sync in events)

    per_warpgroup, per_warp = order(False), order(True)
    kv_loads = 2 * (2 + 1)  # K and V: the ring's two first slots and the loop
    assert per_warpgroup.endswith("BL" * kv_loads), per_warpgroup
    assert per_warp == per_warpgroup[:-2 * kv_loads] + "B" + "L" * kv_loads + "B", per_warp

@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_forward_without_pingpong_drops_only_the_schedule_barrier(monkeypatch, overlap):
    # MosaicTuning(pingpong=False): the same kernel less the warpgroups' schedule barrier waits
    # (serial: 2 per key step in each of the 2 loops + 2 around them; overlap: 1 per issue in
    # each of the 5 phases' loops); the K/V ring's and the q load's waits stay.
    tables, q, kv, _ = _setup(*CASES[0])
    waits = {}
    for pingpong in (True, False):
        tuning = mosaic_fwd.MosaicTuning(overlap_qk=overlap, pingpong=pingpong)
        waits[pingpong] = _forward_module(monkeypatch, tables, q, kv, tuning).count("mbarrier.try_wait")
    assert waits[True] - waits[False] == (5 if overlap else 6) and waits[False] > 0, waits


def _launch(module: str) -> tuple[int, ...]:
    """(grid x, y, z, block x, y, z, dynamic SMEM bytes) of a Mosaic GPU module's gpu.launch."""
    operands = re.search(r'"stable_mosaic_gpu\.gpu\.launch"\(([^)]*)\)', module).group(1).split(", ")[1:]
    constants = dict(re.findall(r'(%\w+) = "stable_mosaic_gpu\.arith\.constant"\(\) \{value = (\d+) : (?:index|i32)\}',
                                module))  # fmt: skip
    return tuple(int(constants[name]) for name in operands)


def _loop_depths(module: str, pattern: str) -> list[int]:
    """For each line matching `pattern`, in text order, how many scf.for / scf.while regions enclose it."""
    depths, open_ops = [], []  # (indent, is a loop) of each op whose regions are open at the line
    for line in module.split("\n"):
        indent, text = len(line) - len(line.lstrip()), line.strip()
        if text.startswith("})") and open_ops and open_ops[-1][0] == indent:
            open_ops.pop()
        if re.search(pattern, line):
            depths.append(sum(loop for _, loop in open_ops))
        if text.endswith("({"):
            open_ops.append((indent, bool(re.search(r'"stable_mosaic_gpu\.scf\.(for|while)"', line))))
    return depths


_TMA_LOAD = r"cp\.async\.bulk\.tensor\.shared\.cluster\.global"
_TMA_STORE = r"cp\.async\.bulk\.tensor\.global\.shared|cp\.async\.bulk\.global\.shared"  # O (a tile), lse (1-d)
_WAIT_STORE = r"cp\.async\.bulk\.wait_group"


def _barrier_ops(module: str) -> list[tuple[str, int]]:
    """(kind, enclosing loops) of each mbarrier op in text order: "E" an arrive with expect_tx (a TMA
    load's, one per load), "A" a plain arrive, "W" a wait (a try_wait on the next phase's parity)."""
    pattern = r"mbarrier\.(try_wait|arrive)"
    kinds = [("W" if "try_wait" in line else "E" if "expect_tx" in line else "A")
             for line in module.split("\n") if re.search(pattern, line)]  # fmt: skip
    return list(zip(kinds, _loop_depths(module, pattern)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grid_heads", [None, 1], ids=["blocks_fastest", "one_head_a_group"])
def test_persistent_forward_walks_the_work_items_in_one_cta_per_sm(monkeypatch, case, grid_heads):
    # MosaicTuning(persistent=True): the grid is min(SMs, items) CTAs (132 when tracing off a GPU);
    # each compute warpgroup loops over its items (Q load of the next item, key loops, O and lse stores
    # in the loop; the stores' reads are waited for in the loop, before O's tile is rewritten, and
    # fully once after it), and the memory warpgroup's K/V loads sit in a step loop inside its item
    # loop, none unrolled before it (the default unrolls the first `num_stages` blocks' loads).
    tables, q, kv, _ = _setup(*case)
    heads, tiles, batch = case[2], tables.num_q_blocks, q.shape[0]
    modules = {name: _forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(grid_heads=grid_heads,
                                                                                         persistent=persistent))
               for name, persistent in [("default", False), ("persistent", True)]}  # fmt: skip
    default, persistent = modules["default"], modules["persistent"]
    assert mosaic_fwd._sm_count() == HOPPER_SMS  # no GPU here
    # Pallas hands the grid to CUDA reversed: block_grid's last axis is blockIdx.x, launched fastest.
    assert _launch(default)[:3] == block_grid(heads, tiles, batch, "q_seq", grid_heads)[0][::-1]
    assert _launch(persistent)[:6] == (min(HOPPER_SMS, heads * tiles * batch), 1, 1) + _launch(default)[3:6]
    # Q's second slot and O's staging tiles (2 warpgroups x 2 x [64, head_dim] 16-bit), less the 2 KiB
    # of reduction scratch the persistent kernel does without; within what a Hopper CTA can have.
    assert _launch(persistent)[6] == _launch(default)[6] + 4 * 64 * case[3] * 2 - 2048 <= 227 * 1024
    assert _loop_depths(default, _TMA_LOAD) == [0] + [0] * 4 + [1] * 2  # Q; 2 stages of K, V; the loop's K, V
    assert _loop_depths(persistent, _TMA_LOAD) == [0, 1, 2, 2]  # first Q, next Q; K, V
    assert _loop_depths(default, _TMA_STORE) == [0, 0] and _loop_depths(persistent, _TMA_STORE) == [1, 1]
    assert _loop_depths(default, _WAIT_STORE) == [0] and _loop_depths(persistent, _WAIT_STORE) == [1, 0]
    assert re.findall(r"cp\.async\.bulk\.wait_group\"\(\) \{group = 0 : i32(, read)?\}", persistent) == [", read", ""]
    key_steps = _loop_depths(default, r"wgmma\.commit[._]group")
    assert key_steps and _loop_depths(persistent, r"wgmma\.commit[._]group") == [d + 1 for d in key_steps]


@pytest.mark.parametrize("case", [(1000, 1000, 3, 128), (4100, 257, 2, 64)])
def test_persistent_forward_takes_a_cta_count_and_lazy_rescale(monkeypatch, case):
    # persistent_ctas fixes the grid (here fewer CTAs than items: each walks several); the lazy
    # rescale's warp vote and branch stay in the key loop, now inside the item loop.
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(persistent=True, persistent_ctas=3, lazy_rescale_threshold=8.0)
    module = _forward_module(monkeypatch, tables, q, kv, tuning)
    assert _launch(module)[:3] == (3, 1, 1)
    assert _loop_depths(module, r"vote\.sync") == [2] * (1 + tables.kv_ragged)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fields", [{}, {"grid_heads": 1, "lazy_rescale_threshold": 8.0}],
                         ids=["default", "ordered_lazy"])  # fmt: skip
def test_persistent_forward_waits_each_barrier_phase_once_an_item(monkeypatch, case, fields):
    # Mosaic GPU keeps one parity bit per barrier and thread, flipped at each wait, so a wait skipped
    # or doubled on any path desynchronises it (a hang or a read before the TMA landed). The persistent
    # kernel's compute side must run the default's barrier ops (GPU-tested) once per item: the Q wait,
    # the next item's Q load (one load in flight, so one barrier serves both Q slots), then the
    # default's K wait, warpgroup 1's rendezvous before the key loop and warpgroup 0's after it (both
    # arrive 2 * count + 1 times an item on the schedule barrier) and the key loops' waits and releases,
    # one loop deeper. The memory side waits both consumed barriers of a slot before each K/V load pair
    # (guarded by position >= stages: the ring position runs on across items), with no unrolled loads.
    tables, q, kv, _ = _setup(*case)
    default, persistent = (_barrier_ops(_forward_module(monkeypatch, tables, q, kv,
                                                        mosaic_fwd.MosaicTuning(persistent=p, **fields)))
                           for p in (False, True))  # fmt: skip
    stages = mosaic_fwd.MosaicTuning().num_stages
    memory = [("E", 0)] * 2 * stages + [("W", 1), ("W", 1), ("E", 1), ("E", 1)]
    assert default[:2] == [("E", 0), ("W", 0)] and default[-len(memory):] == memory, default  # Q; memory side
    compute = default[2:-len(memory)]  # after the Q wait: the K wait, the rendezvous, the key loops
    key_loops = 1 + tables.kv_ragged  # a key step: 4 waits (schedule twice, V, the next K), 4 arrives
    assert compute.count(("W", 1)) == compute.count(("A", 1)) == 4 * key_loops, compute
    assert persistent == ([("E", 0), ("W", 1), ("E", 1)] + [(kind, depth + 1) for kind, depth in compute]
                          + [("W", 2), ("W", 2), ("E", 2), ("E", 2)]), persistent  # fmt: skip


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
@pytest.mark.parametrize("fields", [{}, {"persistent": True}, {"overlap_qk": True, "overlap_late_p": True}],
                         ids=["default", "persistent", "overlap"])  # fmt: skip
def test_separate_kv_waits_loads_k_and_v_each_after_its_own_wait(monkeypatch, case, fields):
    # MosaicTuning.separate_kv_waits: the memory warpgroup's loop waits for K's slot, loads K, waits for
    # V's slot, loads V (W E W E) where it waited for both first (W W E E); it reads the block's index
    # before the first wait, not after the second. The compute warpgroups' barrier ops do not change.
    tables, q, kv, _ = _setup(*case)
    together, apart = (_forward_module(monkeypatch, tables, q, kv,
                                       mosaic_fwd.MosaicTuning(separate_kv_waits=s, **fields))
                       for s in (False, True))  # fmt: skip
    depth = 2 if fields.get("persistent") else 1
    tail = lambda ops: "".join(kind for kind, d in ops[-4:] if d == depth)  # noqa: E731
    assert (tail(_barrier_ops(together)), tail(_barrier_ops(apart))) == ("WWEE", "WEWE")
    assert _barrier_ops(together)[:-4] == _barrier_ops(apart)[:-4]
    # The block index's read (a load through a view of the ids table; the other scalar loads are the
    # barriers' parities) against the waits of its load pair: after both, or before the first.
    events = lambda m: "".join("W" if "try_wait" in x else "L" for x in re.findall(  # noqa: E731
        r"mbarrier\.try_wait|memref\.load[^\n]*memref<i32, strided", m))
    assert events(together).endswith("WWL") and events(apart).endswith("LWW"), (events(together), events(apart))


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_three_stage_ring_fits_a_hopper_cta(monkeypatch, overlap):
    # num_stages=3 at head_dim 128: Q's two tiles and three K/V slots are 224 KiB; without Pallas's
    # 2 KiB reduction scratch (unused: the row reductions stay within a warp) the CTA fits in 227 KiB.
    tables, q, kv, _ = _setup(*CASES[0])
    two, three = (_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(
        num_stages=n, overlap_qk=overlap, overlap_late_p=overlap, separate_kv_waits=True)) for n in (2, 3))
    assert _launch(three)[6] == _launch(two)[6] + 2 * 128 * 128 * 2 - 2048 + 2 * 2 * 8  # + K, V slot and barriers
    assert _launch(three)[6] <= 227 * 1024
    assert _loop_depths(three, _TMA_LOAD) == [0] + [0] * 6 + [1] * 2  # Q; 3 stages of K, V; the loop's K, V


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_persistent_overlap_hands_the_first_turn_over_once_a_cta(monkeypatch, case):
    # The default forward (the overlapped loop, its turn on named barriers) on the persistent grid: every
    # take (bar.sync) and pass (bar.arrive) of the turn and every wgmma of the grid kernel's key loops
    # sits one loop deeper (inside the item loop), except warpgroup 1's first pass, which stays before
    # it: once a CTA, where the grid kernel hands it over once an item (once a CTA there too).
    tables, q, kv, _ = _setup(*case)
    grid, persistent = (_forward_module(monkeypatch, tables, q, kv, dataclasses.replace(
        mosaic_fwd.GRID_MOSAIC_FWD, persistent=p)) for p in (False, True))
    for pattern in (r"bar\.sync \$0, 256", r"wgmma\.commit[._]group"):
        depths = _loop_depths(grid, pattern)
        assert depths and _loop_depths(persistent, pattern) == [d + 1 for d in depths], pattern
    passes = _loop_depths(grid, r"bar\.arrive \$0, 256")
    assert passes[0] == 0 and 0 not in passes[1:]  # the first hand-over, then the phases' passes
    assert _loop_depths(persistent, r"bar\.arrive \$0, 256") == [0] + [d + 1 for d in passes[1:]]
    assert _launch(persistent)[:3] == (min(HOPPER_SMS, case[2] * tables.num_q_blocks * q.shape[0]), 1, 1)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]])
def test_carried_forward_pairs_an_items_first_s_with_the_last_p_v(monkeypatch, case):
    # carry_items: inside the item loop each phase takes the turn once (bar.sync) and passes it once
    # (bar.arrive): the opening (an item's S alone, at the CTA's start and after an empty item), the middle
    # step (S and P V; masked and unmasked where a key block is ragged), the bridge (the next item's S with
    # this item's last P V) and the drain (the last P V alone, before an empty item or at the CTA's end).
    # The opening and the bridge are compiled once each. Before the loop: only the hand-over (a pass). O
    # and lse are stored by the bridge and the drain (after the previous item's stores have read their
    # tiles) and, zeros, by an empty item.
    tables, q, kv, _ = _setup(*case)
    module = _forward_module(monkeypatch, tables, q, kv, dataclasses.replace(
        mosaic_fwd.GRID_MOSAIC_FWD, persistent=True, carry_items=True))
    middles = 1 + tables.kv_ragged  # masked and unmasked, or unmasked only
    wgmma_groups = {"opening": 1, "middle": 2 * middles, "bridge": 2, "drain": 1}
    assert _loop_depths(module, r"wgmma\.commit[._]group") == [2] * sum(wgmma_groups.values())
    assert _loop_depths(module, r"bar\.sync \$0, 256") == [2] * (middles + 3)
    assert _loop_depths(module, r"bar\.arrive \$0, 256") == [0] + [2] * (middles + 3)
    assert _loop_depths(module, _TMA_STORE) == [2] * 4 + [1, 1]
    assert _loop_depths(module, _WAIT_STORE) == [2, 2, 1, 0]


@pytest.mark.parametrize("carry", [False, True])
def test_list_scheduled_walk_reads_each_ctas_items_from_one_table(monkeypatch, carry):
    # walk_item_cost: the persistent kernel reads its items from a [CTAs, 1 + most items] int32 table
    # (list_scheduled_walk: 48 items on 5 CTAs, at most 10 a CTA) instead of computing c, c + CTAs, ...;
    # the launch and the key loops are the round robin's.
    tables, q, kv, _ = _setup(*CASES[0])
    persistent = dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, persistent=True, persistent_ctas=5, carry_items=carry)
    listed, round_robin = (_forward_module(monkeypatch, tables, q, kv, dataclasses.replace(persistent, walk_item_cost=c))
                           for c in (2.0, None))  # fmt: skip
    assert _launch(listed) == _launch(round_robin) and _launch(listed)[:3] == (5, 1, 1)
    assert set(re.findall(r"memref<5x\d+xi32", listed)) == {"memref<5x11xi32"}
    assert not re.findall(r"memref<5x\d+xi32", round_robin)
    for pattern in (r"wgmma\.commit[._]group", _TMA_LOAD, _TMA_STORE):
        assert _loop_depths(listed, pattern) == _loop_depths(round_robin, pattern), pattern


def test_carried_forward_refuses_other_loops():
    tables, q, kv, _ = _setup(*CASES[0])
    carried = dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, persistent=True, carry_items=True)
    for fields in ({"persistent": False}, {"lazy_rescale_threshold": 8.0}, {"pv_wait_after_cols": None},
                   {"overlap_waits_first": False}):  # fmt: skip
        tuning = dataclasses.replace(carried, **fields)
        with pytest.raises(ValueError, match="carry_items runs GRID_MOSAIC_FWD's loop"):
            jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv)  # fmt: skip


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_ablations_drop_only_their_stage_from_the_middle_steps(monkeypatch, case):
    # MosaicTuning.ablate (timing only): each middle-step loop (unmasked, and masked with a ragged key
    # block) loses its stage and keeps the default's wgmma waits and barriers. "exp2": S's 64 exp2 a thread
    # (O's 2 row factors' stay); "softmax": all 66 and the max's shuffles; "rescale": O's 32 two-lane
    # multiplies. The first and last steps run the default's softmax.
    tables, q, kv, _ = _setup(*case)
    middles = 1 + tables.kv_ragged
    module = lambda stage: _forward_module(monkeypatch, tables, q, kv,
                                           dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, ablate=stage))
    modules = {stage: module(stage) for stage in (None, "softmax", "exp2", "rescale")}
    exp2s = {stage: text.count("ex2.approx") for stage, text in modules.items()}
    assert exp2s[None] - exp2s["exp2"] == 64 * middles and exp2s[None] - exp2s["softmax"] == 66 * middles
    assert exp2s["rescale"] == exp2s[None]
    multiplies = {stage: text.count("arith.mulf") for stage, text in modules.items()}
    assert multiplies[None] - multiplies["rescale"] == 32 * middles and multiplies["exp2"] == multiplies[None]
    shuffles = {stage: len(re.findall(r"shfl_kind[< ]bfly>", text)) for stage, text in modules.items()}
    assert shuffles["softmax"] < shuffles[None] == shuffles["exp2"] == shuffles["rescale"]
    for stage, text in modules.items():
        assert _wgmma_waits(text) == _wgmma_waits(modules[None]), stage
        assert text.count("mbarrier") == modules[None].count("mbarrier"), stage
    # "loads": the same steps, each K and V copy 8 rows (2 KiB at head_dim 128) instead of the block's 128 (32 KiB)
    loads, default = module("loads"), modules[None]
    constant = lambda count: f"value = {2 * count * case[3]} : i32"  # bytes of `count` rows of K or V
    assert constant(128) in default and constant(128) not in loads
    assert loads.count(constant(8)) > default.count(constant(8))
    assert loads.count("ex2.approx") == exp2s[None] and _wgmma_waits(loads) == _wgmma_waits(default)


def test_ablate_refuses_other_loops_and_stages():
    tables, q, kv, _ = _setup(*CASES[0])
    for fields in ({"ablate": "mask"}, {"ablate": "loads", "persistent": True}, {"ablate": "exp2", "persistent": True},
                   {"ablate": "exp2", "lazy_rescale_threshold": 8.0},
                   {"ablate": "softmax", "pv_wait_after_cols": None}, {"ablate": "cluster"}):
        tuning = dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, **fields)
        with pytest.raises(ValueError, match="ablate="):
            jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv)  # fmt: skip


# A TMA load in a Mosaic GPU module as printed (both jax versions): its operand segment sizes, the sixth of
# which is 1 when the copy is multicast to a cluster mask.
_TMA_LOADS = re.compile(r'cp\.async\.bulk\.tensor\.shared\.cluster\.global"[^\n]*'
                        r'operandSegmentSizes = array<i32: ([\d, ]*)>')


def _tma_loads(module: str) -> tuple[int, int]:
    """(TMA loads, those multicast) in a Mosaic GPU module's text."""
    segments = [tuple(map(int, m.split(","))) for m in _TMA_LOADS.findall(module)]
    return len(segments), sum(len(s) > 5 and s[5] == 1 for s in segments)


def _pair_modules(monkeypatch, case, **fields) -> tuple[str, str]:
    """The Mosaic modules of kv_multicast's forward, and of it with `fields`, on CASES' `case`."""
    tables, q, kv, _ = _setup(*case)
    pairs = dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, kv_multicast=True)
    return tuple(_forward_module(monkeypatch, tables, q, kv, tuning)
                 for tuning in (pairs, dataclasses.replace(pairs, **fields)))


@pytest.mark.parametrize("case, stages", [(case, stages) for case in (CASES[0], CASES[3], CASES[4]) for stages in (2, 3)])
def test_kv_multicast_launches_pairs_and_multicasts_shared_blocks(monkeypatch, case, stages):
    # MosaicTuning.kv_multicast: a cluster of 2 CTAs (its arrive/wait at the start); the memory warpgroup
    # loads a shared block's K and V by multicast copies, its own blocks by plain ones; the compute loop is
    # the grid kernel's (the same exp2 and wgmma waits). The producer is the grid kernel's (its `stages`
    # first loads unrolled, then the loop), every load site with both kinds.
    tables, q, kv, _ = _setup(*case)
    default = _forward_module(monkeypatch, tables, q, kv, mosaic_fwd.GRID_MOSAIC_FWD)
    pairs = _forward_module(monkeypatch, tables, q, kv,
                            dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, kv_multicast=True, num_stages=stages))
    sites = stages + 1
    assert _tma_loads(pairs) == (1 + 4 * sites, 2 * sites)  # Q; K and V multicast; K and V alone
    assert _tma_loads(default)[1] == 0
    assert "cluster.arrive" in pairs and "cluster.arrive" not in default
    assert "mapa.shared::cluster" in pairs  # the rendezvous arrives on the partner's barrier too
    assert pairs.count("ex2.approx") == default.count("ex2.approx")
    assert _wgmma_waits(pairs) == _wgmma_waits(default)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]])
def test_pair_matching_reads_its_tiles_from_a_table_and_keeps_the_loop(monkeypatch, case):
    # pair_matching: the CTA's query tile comes from the pairs' table (one more kernel input), everything
    # else is kv_multicast's: the same multicast copies, exp2 and wgmma waits.
    pairs, matched = _pair_modules(monkeypatch, case, pair_matching=True)
    table = f"memref<{-(-_setup(*case)[0].num_q_blocks // 2)}x2xi32"  # the pairs' tiles [pairs, 2]
    assert table in matched and table not in pairs
    assert _TMA_LOADS.findall(matched) == _TMA_LOADS.findall(pairs)
    assert matched.count("ex2.approx") == pairs.count("ex2.approx")
    assert _wgmma_waits(matched) == _wgmma_waits(pairs)


@pytest.mark.parametrize("q_len", [383 * 128, 383 * 128 + 1, 384 * 128 + 77])
def test_default_forward_runs_pairs_from_384_query_tiles(monkeypatch, q_len):
    # DEFAULT_MOSAIC_FWD: below 384 query tiles the grid kernel's module, byte for byte; from 384 tiles on
    # (a ragged last tile counts) matched pairs, the module kv_multicast with pair_matching lowers to.
    mask = radial_block_mask(21, 1560, block_size=128, decay_factor=1.0)
    tiles = -(-q_len // 128)
    mask = np.tile(mask, (-(-tiles // len(mask)), 1))[:tiles]
    tables = block_tables(mask, 128, q_len, 32760)
    q = jax.ShapeDtypeStruct((1, q_len, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 32760, 2, 128), jnp.bfloat16)
    default, grid, pairs = (_forward_module(monkeypatch, tables, q, kv, tuning) for tuning in (
        mosaic_fwd.DEFAULT_MOSAIC_FWD, mosaic_fwd.GRID_MOSAIC_FWD,
        dataclasses.replace(mosaic_fwd.GRID_MOSAIC_FWD, kv_multicast=True, pair_matching=True)))  # fmt: skip
    assert default == (pairs if tiles >= 384 else grid)
    assert ("cluster.arrive" in default) == (tiles >= 384)
    assert KernelTuning().mosaic_fwd == mosaic_fwd.DEFAULT_MOSAIC_FWD


def test_kv_multicast_refuses_other_loops():
    tables, q, kv, _ = _setup(*CASES[0])  # 8 query tiles: below DEFAULT_MOSAIC_FWD's 384

    def refused(tuning, match):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv)  # fmt: skip

    grid, default = mosaic_fwd.GRID_MOSAIC_FWD, mosaic_fwd.DEFAULT_MOSAIC_FWD
    for fields in ({"pair_matching": True}, {"kv_multicast": True, "pair_matching": True, "ablate": "cluster"}):
        refused(dataclasses.replace(grid, **fields), "pair_matching chooses kv_multicast's pairs")
    for fields in ({"pairs_from_q_tiles": 2}, {"kv_multicast": True, "pairs_from_q_tiles": -1}):
        refused(dataclasses.replace(grid, **fields), "is where kv_multicast's pairs start")
    for fields in ({"persistent": True}, {"num_stages": 4}, {"separate_kv_waits": False}, {"producer_warp": True},
                   {"grid_heads": 1}, {"overlap_qk": False, "overlap_late_p": False, "named_turn": False,
                                       "overlap_waits_first": False, "late_pv_wait": False,
                                       "pv_wait_after_cols": None}):  # fmt: skip
        refused(dataclasses.replace(grid, kv_multicast=True, **fields), "kv_multicast runs pairs")
    # The default's variants are checked as given, before the tile count turns the pairs off: a design is
    # refused at every length, not only from 384 tiles (or, for the pairs' ablations, only below)
    refused(dataclasses.replace(default, persistent=True), "kv_multicast runs pairs")
    refused(dataclasses.replace(default, ablate="exp2"), "drops a stage of the grid kernel's loop")
    refused(dataclasses.replace(default, ablate="multicast"), "with pairs_from_q_tiles=0")


def test_persistent_forward_refuses_smem_p_and_a_bad_cta_count():
    tables, q, kv, _ = _setup(*CASES[0])
    refused = [({"persistent": True, "overlap_qk": True, "overlap_late_p": True, "overlap_p_smem": True},
                "persistent=True has no SMEM tile for P"),
               ({"persistent_ctas": 4}, "persistent_ctas=4 needs persistent=True"),
               ({"persistent": True, "persistent_ctas": 0}, "persistent_ctas=0 needs persistent=True and at least 1"),
               ({"walk_item_cost": 1.0}, "walk_item_cost=1.0 deals the persistent kernel's items"),
               ({"persistent": True, "walk_item_cost": 0.0}, "walk_item_cost=0.0 deals")]
    for fields, message in refused:
        tuning = mosaic_fwd.MosaicTuning(**fields)
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tuning", [mosaic_bwd.MosaicBwdTuning(), mosaic_bwd.MosaicBwdTuning(block_kv_dq=128)],
                         ids=["split", "split_dq_tile_128"])
def test_split_backward_lowers(case, tuning):
    tables, q, kv, rows = _setup(*case)

    def backward(q, k, v, out, lse, d_out, d_lse):
        return mosaic_bwd.mosaic_backward(q, k, v, out, lse, d_out, d_lse, tables=tables, scale=0.1, tuning=tuning)

    text = _lowered_text(backward, q, kv, kv, q, rows, q, rows)
    assert "wgmma" in text and "cp.async.bulk" in text


@pytest.mark.parametrize("grid_heads", [1, 2])
def test_launch_order_lowers_for_forward_and_split_backward(monkeypatch, grid_heads):
    # grid_heads reorders the CTAs: the kernels' modules differ from the default ones only by the
    # index arithmetic that reads (batch, head, block) back from the grid.
    tables, q, kv, rows = _setup(1000, 1000, 4, 128)  # 4 heads: groups of 1 or 2, 4 or 2 of them

    def modules(grid_heads):
        bwd = mosaic_bwd.MosaicBwdTuning(grid_heads=grid_heads)
        backward = lambda q, k, v, out, lse, d_out, d_lse: mosaic_bwd.mosaic_backward(
            q, k, v, out, lse, d_out, d_lse, tables=tables, scale=0.1, tuning=bwd)
        return [_forward_module(monkeypatch, tables, q, kv, mosaic_fwd.MosaicTuning(grid_heads=grid_heads)),
                *_mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)]

    ordered, default = modules(grid_heads), modules(None)
    assert len(ordered) == len(default) == 3  # forward, dq, dk/dv
    index_ops = lambda module: module.count("arith.remsi") + module.count("arith.divsi")
    for mine, theirs in zip(ordered, default):
        assert "wgmma" in mine and index_ops(mine) > index_ops(theirs)
    with pytest.raises(ValueError, match="grid_heads=3 must divide the 4 heads"):
        modules(3)


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_fused_backward_lowers_with_a_tma_reduce():
    tables, q, kv, rows = _setup(*CASES[0])

    def backward(q, k, v, out, lse, d_out, d_lse):
        return mosaic_bwd.mosaic_backward(q, k, v, out, lse, d_out, d_lse, tables=tables, scale=0.1,
                                          tuning=mosaic_bwd.MosaicBwdTuning(fused=True))  # fmt: skip

    assert "reduce" in _lowered_text(backward, q, kv, kv, q, rows, q, rows)


def test_untile_dq_puts_mosaic_tile_order_back_in_rows():
    # fused_dq_staging="tiles8x8_flat" (the default) copies the staging's bytes as they lie: Mosaic's (8, 8) tiling
    # stores [rows, D] as [rows / 8, D / 8, 8, 8] (TileTransform: tile indices, then the tile), and
    # untile_dq must invert exactly that.
    from radial_jax.kernels.mosaic_bwd_fused import untile_dq

    rows = np.arange(2 * 3 * 16 * 24, dtype=np.float32).reshape(2, 3, 16, 24)
    tiled = rows.reshape(2, 3, 2, 8, 3, 8).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 3, 64)
    assert tiled[0, 0, 1, 2, 9] == rows[0, 0, 8 + 1, 16 + 1]  # tile (1, 2), its row 1 and column 1
    np.testing.assert_array_equal(np.asarray(untile_dq(jnp.asarray(tiled))), rows)


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_flat_dq_staging_reduces_into_a_tile_ordered_accumulator(monkeypatch):
    # The default staging is one SMEM region seen two ways (a RefUnion): written as (8, 8) tiles, copied as
    # [row tiles, column tiles, 64] into dQ's accumulator [B, N, rows / 8, D / 8, 64]: one TMA reduce-add.
    # The swizzled staging reduces into a row-ordered [B, N, rows, D] accumulator. With the default's
    # dq_copy_next_step the reduce-add is issued at two places: in a step (the previous step's partial)
    # and after the loop (the last one's).
    tables, q, kv, rows = _setup(*CASES[0])
    tuning = mosaic_bwd.DEFAULT_MOSAIC_BWD
    assert tuning.fused_dq_staging == "tiles8x8_flat" and tuning.dq_copy_next_step
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    assert module.count("cp.reduce.async.bulk") == 2
    jaxpr = lambda fn: str(jax.make_jaxpr(fn)(q, kv, kv, q, rows, q, rows))
    swizzled = dataclasses.replace(tuning, fused_dq_staging="swizzle128")
    rows_in_order = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=swizzled)
    tile_ordered = "f32[2,3,128,16,64]"  # 8 query blocks of 128 rows, head_dim 128
    assert tile_ordered in jaxpr(backward) and tile_ordered not in jaxpr(rows_in_order)
    with pytest.raises(ValueError, match="fused_dq_staging='tiles'"):
        jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(
            *a, tables=tables, scale=0.1, tuning=dataclasses.replace(tuning, fused_dq_staging="tiles")),
            q, kv, kv, q, rows, q, rows)


_FA4 = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("case", [(32760, 32760, 1, 128), *[c for c in CASES if c[3] == 128]])
def test_fa4_order_keeps_a_wgmma_queued_behind_each_wait(monkeypatch, case):
    # MosaicBwdTuning(fused_order="fa4"), one loop step in text order: S^T and dP^T committed, wait 1
    # (S^T; exp2 under dP^T), dV committed, wait 1 (dP^T; dV runs under dS^T's store), the barrier of
    # both warpgroups' dS^T halves, dQ and dK committed, wait 2 (dV: release dO), wait 1 (dQ, whose
    # TMA reduce-add runs under dK), wait 0 (dK); after the loop, the dK and dV reads. The deferred
    # order's dQ of the last step (after the loop) is gone: one dQ per step, each reduced in the step.
    tables, q, kv, rows = _setup(*case)
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=_FA4)
    (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    assert _wgmma_waits(module) == [(1, 2), (1, 1), (2, 2), (1, 0), (0, 0), (0, 0), (0, 0)]
    syncs = _wait_matches(module)
    under_dp, dq_issue, under_dk = (module[a.end():b.start()] for a, b in [syncs[0:2], syncs[1:3], syncs[3:5]])
    assert under_dp.count("ex2.approx") == 32 and "ex2.approx" not in module[syncs[1].end():]
    assert _SMEM_STORE.search(dq_issue) and "mbarrier.try_wait" in dq_issue  # dS^T stored, then the rendezvous
    assert module.count("cp.reduce.async.bulk") == 1 and "cp.reduce.async.bulk" in under_dk


def test_fused_order_is_checked_with_the_fix():
    tables, q, kv, rows = _setup(*CASES[0])
    refused = [({"fused_order": "fa4"}, "set fused=True"), ({"fused": True, "fused_order": "fa3"}, "choose one of"),
               ({"fused": True, "fused_order": "fa4", "stats_in_acc": True}, "fused_order='fa4_late_dv'"),
               ({"memory_registers": 20}, "memory_registers=20: choose a multiple of 8"),
               ({"fused": True, "fused_pipeline": "static"}, "fused_order='fa4_late_dv'"),
               ({"fused_order": "fa4_late_dv", "fused_pipeline": "static"}, "set fused=True"),
               ({"fused": True, "fused_order": "fa4_late_dv", "fused_pipeline": "manual"}, "choose one of"),
               ({"fused": True, "fused_order": "private_dq", "fused_pipeline": "static_wg"}, "fused_order='fa4_late_dv'")]
    for fields, message in refused:
        tuning = mosaic_bwd.MosaicBwdTuning(**fields)
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv, q, rows, q, rows)  # fmt: skip


# A setmaxnreg in a Mosaic GPU module as printed: jax 0.10.2 has an nvvm op (`action = #nvvm<action increase>,
# regCount = 232`), jax 0.11.2 inline PTX (`setmaxnreg.inc.sync.aligned.u32 232;`).
_SETMAXNREG = re.compile(r"(inc|dec)(?:rease>, regCount = |\.sync\.aligned\.u32 )(\d+)")


@pytest.mark.parametrize("memory_registers, compute_registers", [(40, 232), (24, 240)])
def test_memory_registers_set_both_split_kernels_register_split(monkeypatch, memory_registers, compute_registers):
    # MosaicBwdTuning.memory_registers reaches the dq and the dk/dv kernel's pipelines: the memory
    # warpgroup decreases to it, the compute warpgroups increase to the rest of 512, halved, in 8s.
    tables, q, kv, rows = _setup(*CASES[0])
    tuning = mosaic_bwd.MosaicBwdTuning(memory_registers=memory_registers)
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    modules = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    expected = [("dec", str(memory_registers)), ("inc", str(compute_registers))]
    assert len(modules) == 2 and all(sorted(_SETMAXNREG.findall(m)) == expected for m in modules)


@pytest.mark.skipif(jax.__version_info__ >= (0, 11), reason="jax >= 0.11 runs the fused backward")
@pytest.mark.parametrize("tuning", [mosaic_bwd.DEFAULT_MOSAIC_BWD, mosaic_bwd.MosaicBwdTuning(fused=True)],
                         ids=["default", "fused"])
def test_fused_backward_runs_the_split_kernels_on_jax_0_10(monkeypatch, tuning):
    # jax 0.10 cannot pass the fused kernel's accumulator through plgpu.kernel, so the default backward
    # (fused) must still lower there: as the split design's two kernels, with the tuning's register split.
    tables, q, kv, rows = _setup(*CASES[0])
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    modules = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    compute = (512 - tuning.memory_registers) // 2 // 8 * 8
    expected = [("dec", str(tuning.memory_registers)), ("inc", str(compute))]
    assert len(modules) == 2 and all(sorted(_SETMAXNREG.findall(m)) == expected for m in modules)
    assert not any("cp.reduce.async.bulk" in m for m in modules)


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_default_backward_is_one_fused_kernel_and_head_dim_64_the_split_two(monkeypatch):
    # DEFAULT_MOSAIC_BWD at head_dim 128: one kernel (dQ by TMA reduce-add); at 64 (under the fused
    # kernel's condition) the same tuning lowers as the dq and dk/dv kernels.
    counts = {}
    for case in (CASES[0], CASES[1]):  # head_dim 128, 64
        tables, q, kv, rows = _setup(*case)
        backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1)
        modules = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
        counts[case[3]] = (len(modules), sum("cp.reduce.async.bulk" in m for m in modules))
    assert counts == {128: (1, 1), 64: (2, 0)}


def _sequence_copies(jaxpr) -> int:
    """Counts pad/slice equations on 4-d [B, L, N, D] arrays outside the kernels, nested jaxprs included."""
    count = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name in ("pad", "slice") and eqn.outvars[0].aval.ndim == 4:
            count += 1
        if eqn.primitive.name != "pallas_call":
            count += sum(_sequence_copies(sub) for sub in jaxprs_in_params(eqn.params))
    return count


@pytest.mark.parametrize("lengths", [(32760, 32760), (1000, 4100), (4100, 1000), (4100, 257)])
def test_only_lengths_off_the_tma_tiling_are_padded(lengths):
    # Wan's lengths (multiples of 8) must reach the kernels with no copy; another length costs one
    # pad per input on its axis and one slice per output.
    q_len, kv_len = lengths
    tables, q, kv, rows = _setup(q_len, kv_len, 2, 128)
    fwd = jax.make_jaxpr(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1))(q, kv, kv)
    bwd = lambda tuning: jax.make_jaxpr(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1,
                                                                              tuning=tuning))(q, kv, kv, q, rows, q, rows)
    q_off, kv_off = q_len % 8 != 0, kv_len % 8 != 0
    assert _sequence_copies(fwd) == 2 * q_off + 2 * kv_off  # q and out; k and v
    split = bwd(mosaic_bwd.MosaicBwdTuning())
    assert _sequence_copies(split) == 3 * q_off + 4 * kv_off  # q, dO and dq; k, v, dk and dv
    if jax.__version_info__ >= (0, 11):  # the default runs the fused kernel
        # dQ's f32 accumulator ([B, N, whole blocks, D]) is sliced to its rows once, in the epilogue
        # that scales, casts and transposes it (one XLA fusion, with a ragged q's slice after it).
        assert _sequence_copies(bwd(mosaic_bwd.DEFAULT_MOSAIC_BWD)) == 1 + 3 * q_off + 4 * kv_off


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("case", [(32760, 32760, 1, 128), *[c for c in CASES if c[3] == 128]])
@pytest.mark.parametrize("stats_in_acc", [False, True], ids=["stats_in_registers", "stats_in_acc"])
def test_fa4_late_dv_issues_dv_after_the_ds_store(monkeypatch, case, stats_in_acc):
    # fused_order="fa4_late_dv": S^T and dP^T committed, wait 1 (S^T; exp2 under dP^T), wait 0 (dP^T;
    # nothing queued through dS^T's arithmetic), dS^T stored, then dV committed before the rendezvous,
    # dQ and dK committed, wait 2 (dV), wait 1 (dQ; its reduce under dK), wait 0 (dK).
    tables, q, kv, rows = _setup(*case)
    # stats_in_acc: the same waits (its run_state ends in the wait 0 that retires dP^T).
    tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", stats_in_acc=stats_in_acc)
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    assert _wgmma_waits(module) == [(1, 2), (0, 0), (2, 3), (1, 0), (0, 0), (0, 0), (0, 0)]
    syncs = _wait_matches(module)
    after_dp = module[syncs[1].end():syncs[2].start()]
    store, rendezvous = _SMEM_STORE.search(after_dp), after_dp.find("mbarrier.try_wait")
    assert store and 0 <= store.start() < rendezvous  # dS^T stored before the rendezvous
    assert "cp.reduce.async.bulk" in module[syncs[3].end():syncs[4].start()]


_FENCE = "nvvm.fence.proxy"  # the async-proxy fence in a Mosaic GPU module's text (commit_smem's)


def _default_bwd_module(monkeypatch, setup, **changes) -> str:
    """The Mosaic module of DEFAULT_MOSAIC_BWD with `changes`, lowered for CUDA; setup: _setup's tuple."""
    tables, q, kv, rows = setup
    tuning = dataclasses.replace(mosaic_bwd.DEFAULT_MOSAIC_BWD, **changes)
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    return module


def _assert_backward_refuses(setup, tuning, match: str):
    tables, q, kv, rows = setup
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning),
                       q, kv, kv, q, rows, q, rows)


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_dq_copy_next_step_leaves_the_dq_stores_to_the_next_ds_fence(monkeypatch):
    # dq_copy_next_step: no fence between dQ's wait (wait 1) and dK's (wait 0), where the default publishes
    # and copies its staged dQ; the loop's copy (of the step before) comes after dQ and dK are issued, before
    # dV's wait; a second copy after the loop adds the last step's. Same waits, same fences in the module.
    setup = _setup(*CASES[0])
    modules = {}
    for next_step in (False, True):
        module = _default_bwd_module(monkeypatch, setup, dq_copy_next_step=next_step)
        syncs = _wait_matches(module)
        regions = [module[a.end():z.start()] for a, z in zip(syncs, syncs[1:5])]  # after each loop wait
        modules[next_step] = (module, regions)
    (default, (_, _, _, default_dq)), (deferred, (_, dp_to_dv, _, deferred_dq)) = modules[False], modules[True]
    assert _FENCE in default_dq and "cp.reduce.async.bulk" in default_dq
    assert _FENCE not in deferred_dq and "cp.reduce.async.bulk" not in deferred_dq
    assert "cp.reduce.async.bulk" in dp_to_dv and dp_to_dv.rfind("wgmma.mma_async") < dp_to_dv.find("cp.reduce.async")
    assert deferred.count("cp.reduce.async.bulk") == default.count("cp.reduce.async.bulk") + 1
    assert deferred.count(_FENCE) == default.count(_FENCE) and _wgmma_waits(deferred) == _wgmma_waits(default)
    for refused in (mosaic_bwd.MosaicBwdTuning(dq_copy_next_step=True),
                    dataclasses.replace(mosaic_bwd.DEFAULT_MOSAIC_BWD, dq_copy_next_step=True, fused_pipeline="static")):
        _assert_backward_refuses(setup, refused, "dq_copy_next_step")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_named_ds_rendezvous_is_one_256_thread_barrier(monkeypatch):
    # ds_rendezvous="named": the warpgroups meet over dS^T on one bar.sync of 256 threads instead of an
    # mbarrier arrive and poll, after the fence alone (commit_smem's 128-thread barrier dropped); the
    # wgmma waits are the same.
    setup = _setup(*CASES[0])
    named, polled = (_default_bwd_module(monkeypatch, setup, ds_rendezvous=r) for r in ("named", "mbarrier"))
    assert named.count("bar.sync 4, 256;") == 1 and polled.count("bar.sync 4, 256;") == 0
    assert named.count("mbarrier.try_wait") == polled.count("mbarrier.try_wait") - 1
    assert named.count(_FENCE) == polled.count(_FENCE) > 0
    assert _wgmma_waits(named) == _wgmma_waits(polled)
    for refused in (mosaic_bwd.MosaicBwdTuning(ds_rendezvous="named"),
                    dataclasses.replace(mosaic_bwd.DEFAULT_MOSAIC_BWD, fused_order="private_dq", ds_rendezvous="named")):
        _assert_backward_refuses(setup, refused, "ds_rendezvous='named'")
    _assert_backward_refuses(setup, dataclasses.replace(mosaic_bwd.DEFAULT_MOSAIC_BWD, ds_rendezvous="polled"),
                             "ds_rendezvous='polled'")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_dv_before_commit_issues_dv_between_the_ds_store_and_its_fence(monkeypatch):
    # After dP^T's wait 0: dS^T stored, then (dv_before_commit, the default) dV's wgmma, then the fence that
    # publishes the store; with False the fence comes first. The waits are the same either way.
    setup = _setup(*CASES[0])
    orders = {}
    for early in (False, True):
        module = _default_bwd_module(monkeypatch, setup, dv_before_commit=early)
        syncs = _wait_matches(module)
        after_dp = module[syncs[1].end():syncs[2].start()]  # from dP^T's wait to dV's
        store = _SMEM_STORE.search(after_dp).start()
        fence, dv = after_dp.find("fence.proxy", store), after_dp.find("wgmma.mma_async", store)
        orders[early] = (_wgmma_waits(module), 0 <= dv < fence)
    assert orders[True] == (orders[False][0], True) and orders[False][1] is False
    _assert_backward_refuses(setup, mosaic_bwd.MosaicBwdTuning(dv_before_commit=True), "dv_before_commit")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("case", [(32760, 32760, 1, 128), *[c for c in CASES if c[3] == 128]])
def test_private_dq_needs_no_rendezvous(monkeypatch, case):
    # fused_order="private_dq": S^T, dP^T (wait 1, wait 0), then dV, dQ's low half and dK committed:
    # wait 2 (dV), wait 1 (dQ low; reduced under dK), dQ's high half committed, wait 1 (dK), wait 0
    # (dQ high). Two reduce-adds a step and no mbarrier wait inside the step but the pipeline's own.
    tables, q, kv, rows = _setup(*case)
    private = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="private_dq")
    shared = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv")
    modules = {}
    for name, tuning in [("private", private), ("shared", shared)]:
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (modules[name],) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    module = modules["private"]
    assert _wgmma_waits(module) == [(1, 2), (0, 0), (2, 3), (1, 0), (1, 1), (0, 0), (0, 0), (0, 0)]
    assert module.count("cp.reduce.async.bulk") == 2
    # The rendezvous on both dS^T halves is the one mbarrier wait the shared order has more.
    assert module.count("mbarrier.try_wait") == modules["shared"].count("mbarrier.try_wait") - 1


def _compute_loop(module: str, anchor: str = "cp.reduce.async.bulk") -> str:
    """The body of a key-block kernel's compute loop (the scf.for, or a scf.while's after-region,
    holding the first line with `anchor`: by default the fused backward's dQ reduce-adds), from its
    block header (^bb0) on."""
    lines = module.split("\n")
    indent = lambda line: len(line) - len(line.lstrip())
    reduce = next(i for i, line in enumerate(lines) if anchor in line)
    loop = next(i for i in range(reduce, -1, -1)
                if re.search(r'scf\.(for|while)"', lines[i]) and indent(lines[i]) < indent(lines[reduce]))
    start = next(i for i in range(reduce, loop, -1)
                 if lines[i].lstrip().startswith("^bb0") and indent(lines[i]) == indent(lines[loop]))
    end = next(i for i in range(reduce, len(lines))
               if indent(lines[i]) == indent(lines[loop]) and lines[i].lstrip().startswith("}"))
    return "\n".join(lines[start:end])


# A table read: a scalar load from a GMEM ref at a dynamic offset (a barrier's phase word has a static one).
_TABLE_READ = re.compile(r'memref\.load"\(%\w+\) : \(memref<i32, strided<\[\], offset: \?>>\)')


def _iteration_dependent_ops(loop: str) -> dict[str, int]:
    """Counts the ops of a loop body whose operands depend on its integer block arguments (the step
    index) or on a table read in it, by op name (inline asm by its first word)."""
    header, body = loop.split("\n", 1)
    seeds = {name for name, ty in re.findall(r"(%arg\d+): (\w+)", header) if ty in ("i32", "i64", "index")}
    return _dependent_ops(body, body, seeds, _TABLE_READ)


def _thread_dependent_ops(module: str, loop: str) -> dict[str, int]:
    """Counts the ops of a loop body that depend on the thread index (gpu.thread_id, in the whole
    module), as _iteration_dependent_ops; arithmetic on f32/bf16 values and vectors is left out."""
    return _dependent_ops(module, loop, set(), re.compile(r'"stable_mosaic_gpu\.gpu\.thread_id"'))


def _dependent_ops(text: str, counted: str, dependent: set[str], seed: re.Pattern) -> dict[str, int]:
    """Follows the SSA data flow of `text` from the names in `dependent` and the results of the lines
    matching `seed`, not through f32/bf16 values or vectors (the data, not addresses); counts the
    dependent ops in `counted` (a part of `text`), by op name (inline asm: its first word)."""
    first = text[: text.index(counted)].count("\n")
    last = first + counted.count("\n")
    counts: dict[str, int] = {}
    for number, line in enumerate(text.split("\n")):
        match = re.match(r'\s*(?:(%\w+)(?::\d+)? = )?"stable_mosaic_gpu\.([\w.]+)"(.*)', line)
        if not match:
            continue
        name, op, rest = match.groups()
        if seed.search(line):
            dependent.add(name)
            continue
        if not set(re.findall(r"%\w+", rest.split(" : ")[0])) & dependent:
            continue
        if name and not re.search(r"-> \(?(vector<|f32|bf16|f16)", line):
            dependent.add(name)
        if first <= number <= last:
            asm = re.search(r'asm_string = "(?:@\$\d+ |\{ \.reg \.pred p; setp\.ne\.b32 p, \$\d+, 0; )?([\w.]+)', line)
            key = f"{op}:{asm.group(1)}" if asm else op
            counts[key] = counts.get(key, 0) + 1
    return counts


_STATIC = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", fused_pipeline="static", memory_registers=24)


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("case", [(32760, 32760, 1, 128), *[c for c in CASES if c[3] == 128]])
@pytest.mark.parametrize("stats_in_acc", [False, True], ids=["stats_in_registers", "stats_in_acc"])
def test_static_pipeline_runs_a_mask_block_as_two_steps_on_constant_slots(monkeypatch, case, stats_in_acc):
    # MosaicBwdTuning(fused_pipeline="static"): one loop iteration is a 128-query mask block, two
    # fa4_late_dv steps unrolled (each S^T, dP^T; wait 1, wait 0, dV, dQ, dK; wait 2, 1, 0), then the
    # dK and dV reads after the loop. One table read an iteration (the emit pipeline reads one a
    # step), one dQ reduce-add a step, and what depends on the iteration is only the reduce's
    # destination row: no shared-memory address (getelementptr), wgmma descriptor, stmatrix or
    # barrier, all of which the emit pipeline's step computes from the step's parity.
    tables, q, kv, rows = _setup(*case)
    modules = {}
    for name, pipeline in [("static", "static"), ("emit", "emit")]:
        tuning = dataclasses.replace(_STATIC, stats_in_acc=stats_in_acc, fused_pipeline=pipeline)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (modules[name],) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    step = [(1, 2), (0, 0), (2, 3), (1, 0), (0, 0)]
    assert _wgmma_waits(modules["emit"]) == step + [(0, 0), (0, 0)]
    assert _wgmma_waits(modules["static"]) == step * 2 + [(0, 0), (0, 0)]
    loops = {name: _compute_loop(module) for name, module in modules.items()}
    assert [len(_TABLE_READ.findall(loops[name])) for name in ("static", "emit")] == [1, 1]
    assert loops["static"].count("cp.reduce.async.bulk") == 2 and loops["static"].count("mbarrier.try_wait") == 4
    static, emit = (_iteration_dependent_ops(loops[name]) for name in ("static", "emit"))
    assert {op for op in static if not op.startswith("arith.")} == {
        "memref.subview", "llvm.inline_asm:cp.reduce.async.bulk.tensor.5d.global.shared", "scf.yield"}, static
    assert static["llvm.inline_asm:cp.reduce.async.bulk.tensor.5d.global.shared"] == 2
    assert emit["llvm.getelementptr"] > 50 and emit["nvvm.stmatrix"] and emit["nvvm.mbarrier.try_wait.parity"]
    assert any(op.startswith("llvm.inline_asm:wgmma.mma_async") for op in emit)  # descriptors of the slot
    assert "arith.remsi" not in loops["static"] and "arith.remsi" in loops["emit"]
    # memory_registers=24: the memory warpgroup gives up registers, the compute warpgroups take 240.
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in modules["static"]
    assert "setmaxnreg.inc.sync.aligned.u32 240;" in modules["static"]


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("case", [(32760, 32760, 1, 128), (4100, 257, 2, 128)])
def test_static_wg_pipeline_gives_each_warpgroup_constant_wgmma_descriptors(monkeypatch, case):
    # fused_pipeline="static_wg": the static pipeline with each compute warpgroup's code emitted
    # apart (wg a Python int), so its K/V rows, dS^T half and dQ staging tile are constants too: no
    # wgmma issue in the loop depends on the thread index, where the shared static code computes the
    # descriptors of 24 of a step's 32 from it. Two compute loops, each with the static one's waits,
    # table read, reduce-adds and iteration-dependent ops.
    tables, q, kv, rows = _setup(*case)
    modules = {}
    for pipeline in ("static", "static_wg"):
        tuning = dataclasses.replace(_STATIC, stats_in_acc=True, fused_pipeline=pipeline)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (modules[pipeline],) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    step = [(1, 2), (0, 0), (2, 3), (1, 0), (0, 0)]
    assert _wgmma_waits(modules["static_wg"]) == (step * 2 + [(0, 0), (0, 0)]) * 2
    assert modules["static_wg"].count("cp.reduce.async.bulk") == 4
    wgmma_of_thread = {}
    for pipeline, module in modules.items():
        loop = _compute_loop(module)  # warpgroup 0's in static_wg
        assert len(_TABLE_READ.findall(loop)) == 1 and loop.count("cp.reduce.async.bulk") == 2
        assert _iteration_dependent_ops(loop) == _iteration_dependent_ops(_compute_loop(modules["static"]))
        wgmma_of_thread[pipeline] = sum(n for op, n in _thread_dependent_ops(module, loop).items()
                                        if op.startswith("llvm.inline_asm:wgmma.mma_async"))
    assert wgmma_of_thread == {"static": 48, "static_wg": 0}, wgmma_of_thread


@pytest.mark.parametrize("case", CASES)
def test_split_dkv_static_pipeline_runs_a_mask_block_as_two_steps_on_constant_slots(monkeypatch, case):
    # MosaicBwdTuning(split_pipeline="static"): the split dk/dv kernel on the fused kernel's static
    # pipeline. One loop iteration is a 128-query mask block, the split step twice (S^T; dP^T and dV,
    # wait 1; dK, wait 1, wait 0), then the dK and dV reads after the loop; nothing in the compute
    # loop depends on the iteration (the memory warpgroup alone reads the table), where the emit
    # pipeline's step computes its tiles' addresses, barriers and wgmma descriptors from the step.
    tables, q, kv, rows = _setup(*case)
    modules = {}
    for pipeline in ("static", "emit"):
        tuning = mosaic_bwd.MosaicBwdTuning(split_pipeline=pipeline)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        _, modules[pipeline] = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)  # dq, dk/dv
    step = [(0, 1), (1, 2), (1, 1), (0, 0)]
    assert _wgmma_waits(modules["emit"]) == step + [(0, 0), (0, 0)]
    assert _wgmma_waits(modules["static"]) == step * 2 + [(0, 0), (0, 0)]
    loops = {name: _compute_loop(module, "wgmma.mma_async") for name, module in modules.items()}
    static, emit = (_iteration_dependent_ops(loops[name]) for name in ("static", "emit"))
    # jax 0.10 keeps the compute side's unused table read (and a subview of it); 0.11 drops it.
    assert {op for op in static if not op.startswith("arith.")} <= {"scf.yield", "memref.subview"}, static
    assert emit["llvm.getelementptr"] > 30 and emit["nvvm.mbarrier.try_wait.parity"]
    assert any(op.startswith("llvm.inline_asm:wgmma.mma_async") for op in emit)  # descriptors of the slot
    assert loops["static"].count("mbarrier.try_wait") == 2  # each stage's full barrier, once an iteration


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pipeline", ["emit", "static"])
def test_dkv_dp_with_s_issues_dp_before_waiting_for_s(monkeypatch, case, pipeline):
    # MosaicBwdTuning.dkv_dp_with_s: the dk/dv step commits S^T and dP^T before its first wait and waits
    # for S^T alone (wait_group 1 with 2 committed), then dV and the wait for dP^T, dK and its two waits:
    # the same 5 wgmma groups a step (S^T, dP^T, dV, dK) in another order; the dq kernel is untouched.
    tables, q, kv, rows = _setup(*case)
    modules = {}
    for early in (False, True):
        tuning = mosaic_bwd.MosaicBwdTuning(split_pipeline=pipeline, dkv_dp_with_s=early)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        modules[early] = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)  # dq, dk/dv
    unnumbered = lambda module: re.sub(r'(kernel_\w+?)_\d+"', r'\1"', module)  # jax 0.11 numbers the kernels
    assert unnumbered(modules[True][0]) == unnumbered(modules[False][0])
    steps = 2 if pipeline == "static" else 1
    assert _wgmma_waits(modules[False][1]) == [(0, 1), (1, 2), (1, 1), (0, 0)] * steps + [(0, 0), (0, 0)]
    assert _wgmma_waits(modules[True][1]) == [(1, 2), (1, 1), (1, 1), (0, 0)] * steps + [(0, 0), (0, 0)]

@pytest.mark.parametrize("case", CASES[:2])
def test_split_dkv_static_pipeline_matches_every_barrier_phase(monkeypatch, case):
    # The static ring's barriers as split_pipeline="static" runs them: each compute warpgroup waits a
    # stage's full barrier (4 TMA loads: q, dO, lse2, delta) and releases the stage once (after dK), per
    # iteration; the memory warpgroup loads iteration 0's two stages unconditionally and waits a stage's
    # consumed barrier (both warpgroups' releases) before each later refill, never after its last loads.
    # So each barrier completes once an iteration and each waiter waits each phase once, in order.
    tables, q, kv, rows = _setup(*case)
    tuning = mosaic_bwd.MosaicBwdTuning(split_pipeline="static")
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    _, module = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)  # dq, dk/dv
    kv_loads = [("E", 0), ("E", 0), ("W", 0), ("W", 0)]  # this warpgroup's K and V tiles
    compute = [("W", 1), ("A", 1)] * 2
    memory = [("E", 0)] * 8 + ([("W", 1)] + [("E", 1)] * 4) * 2
    assert _barrier_ops(module) == kv_loads + compute + memory, _barrier_ops(module)


def test_split_static_pipeline_needs_the_default_tiles():
    tables, q, kv, rows = _setup(*CASES[0])
    for fields in ({"split_pipeline": "static", "max_concurrent_steps": 3}, {"split_pipeline": "no_such"}):
        tuning = mosaic_bwd.MosaicBwdTuning(**fields)
        with pytest.raises(ValueError, match="split_pipeline"):
            jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning),
                           q, kv, kv, q, rows, q, rows)  # fmt: skip


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("pipeline", ["static", "emit"])
def test_fused_dq_staged_in_plain_tiles_needs_no_selects(monkeypatch, pipeline):
    # fused_dq_staging="tiles8x8": the f32 dQ partial goes to SMEM as (8, 8) tiles, no swizzle, whose
    # addresses do not depend on the row; the swizzled (8, 32) tiles cost the store 48 selects a step.
    # Same stores (16 a step), the same reduce-add, nothing else in the step changes.
    tables, q, kv, rows = _setup(4100, 1000, 2, 128)
    loops = {}
    for staging in ("tiles8x8", "swizzle128"):
        tuning = dataclasses.replace(_STATIC, stats_in_acc=True, fused_pipeline=pipeline, fused_dq_staging=staging)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
        loops[staging] = _compute_loop(module)
    steps = 2 if pipeline == "static" else 1
    count = lambda staging, op: loops[staging].count(f'"stable_mosaic_gpu.{op}"')
    # (the emit pipeline selects its slot twice a step, in either staging)
    assert count("swizzle128", "arith.select") - count("tiles8x8", "arith.select") == 48 * steps
    assert count("tiles8x8", "arith.select") == (0 if pipeline == "static" else 2)
    assert count("tiles8x8", "llvm.store") == count("swizzle128", "llvm.store") == 16 * steps
    for staging in loops:
        assert loops[staging].count("cp.reduce.async.bulk") == steps
        assert loops[staging].count("wgmma.mma_async") == loops["swizzle128"].count("wgmma.mma_async")


def test_fused_dq_staging_is_checked():
    tables, q, kv, rows = _setup(*CASES[0])
    tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_dq_staging="tiles4x4")
    with pytest.raises(ValueError, match="fused_dq_staging='tiles4x4'"):
        jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning),
                       q, kv, kv, q, rows, q, rows)  # fmt: skip


# A wgmma issue as jax 0.11 prints it: its shape, then the accumulator registers, then A as registers
# ({...}, an RS wgmma) or as a shared-memory descriptor ($n, an SS wgmma).
_WGMMA_ISSUE = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k16)\.f32\.bf16\.bf16 \{[^}]*\}, (\{|\$)")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("order, pipeline", [("fa4_late_dv", "static"), ("fa4_late_dv", "emit"), ("fa4", "emit"),
                                             ("private_dq", "emit")])
def test_fused_dk_from_smem_reads_ds_t_from_its_tile(monkeypatch, order, pipeline):
    # fused_dk_from_smem: dK += dS^T Q (the n128 wgmma with dV) takes A from SMEM; dV keeps P^T in
    # registers. Every other wgmma (S^T, dP^T, dQ: n64) is SS either way.
    tables, q, kv, rows = _setup(4100, 1000, 2, 128)
    issues = {}
    for from_smem in (False, True):
        tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order=order, memory_registers=24, fused_pipeline=pipeline,
                                            fused_dk_from_smem=from_smem)  # fmt: skip
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
        found = _WGMMA_ISSUE.findall(_compute_loop(module))
        issues[from_smem] = {(shape, "RS" if a == "{" else "SS"): found.count((shape, a)) for shape, a in set(found)}
    n128 = issues[False][("m64n128k16", "RS")]  # dV and dK, 4 k-steps each (64 queries)
    assert ("m64n128k16", "SS") not in issues[False] and n128 % 8 == 0
    assert issues[True][("m64n128k16", "RS")] == issues[True][("m64n128k16", "SS")] == n128 // 2
    assert issues[True][("m64n64k16", "SS")] == issues[False][("m64n64k16", "SS")]


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_fused_without_auto_barriers_keeps_the_barriers_of_commit_and_the_dq_wait(monkeypatch):
    # MosaicBwdTuning.no_auto_barriers: the step's two stores to shared memory (dS^T, the dQ staging
    # tile) lose Pallas's warpgroup barrier before and after each (4 a step); commit_smem's barrier after
    # each store and wait_smem_to_gmem's before the dQ store stay, and nothing else in the step changes.
    tables, q, kv, rows = _setup(4100, 1000, 2, 128)
    loops = {}
    for no_auto in (False, True):
        tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24,
                                            stats_in_acc=True, fused_dq_staging="tiles8x8", fused_dk_from_smem=True,
                                            no_auto_barriers=no_auto)  # fmt: skip
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
        loops[no_auto] = _compute_loop(module)
    syncs = {no_auto: loop.count("bar.sync") for no_auto, loop in loops.items()}
    assert syncs[False] - syncs[True] == 4 and syncs[True] >= 3, syncs
    for op in ("wgmma.mma_async", "cp.reduce.async.bulk", "fence.proxy", "llvm.store"):
        assert loops[True].count(op) == loops[False].count(op) > 0, op

def test_fused_dk_from_smem_needs_an_fa4_order():
    tables, q, kv, rows = _setup(*CASES[0])
    tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_dk_from_smem=True)  # the deferred order
    with pytest.raises(ValueError, match="fused_dk_from_smem"):
        jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning),
                       q, kv, kv, q, rows, q, rows)  # fmt: skip


_OPAQUE_INDEX = '"=r,0"'  # lax.optimization_barrier of one i32: an empty asm whose output is its input


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused_lean"])
def test_operands_in_step_takes_the_warpgroup_index_in_the_key_loop(monkeypatch, fused):
    # MosaicBwdTuning.operands_in_step: each kernel's step passes the warpgroup index through an
    # optimization barrier inside its compute loop and takes its fixed operand refs from the result, so
    # LLVM cannot hoist their wgmma descriptors out of the loop (ptxas 13.0: the lean fused step 498 ->
    # 459 instructions, 164 -> 0 spill bytes; NOTES session 11). Without it no such barrier exists.
    if fused and jax.__version_info__ < (0, 11):
        pytest.skip("the fused backward needs jax >= 0.11")
    tables, q, kv, rows = _setup(4100, 1000, 2, 128)
    lean = dict(fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True,
                fused_dq_staging="tiles8x8", fused_dk_from_smem=True) if fused else {}  # fmt: skip
    modules = {}
    for in_step in (False, True):
        tuning = mosaic_bwd.MosaicBwdTuning(operands_in_step=in_step, **lean)
        backward = lambda *a, tuning=tuning: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        modules[in_step] = list(_mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows))  # a copy: the
        # capture stays patched in and appends later modules to this list too
    assert len(modules[True]) == len(modules[False]) == (1 if fused else 2)  # fused; else dq and dk/dv
    for before, after in zip(modules[False], modules[True]):
        assert before.count(_OPAQUE_INDEX) == 0 and after.count(_OPAQUE_INDEX) == 1
        loop = _compute_loop(after, anchor=_OPAQUE_INDEX)
        assert loop.count(_OPAQUE_INDEX) == 1 and "wgmma" in loop


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
@pytest.mark.parametrize("order", ["fa4", "fa4_late_dv"])
def test_fused_waits_for_ds_before_the_dq_accumulator_is_zeroed(monkeypatch, order):
    # dQ's accumulator is zeroed and fenced when its scope opens; the wait for the other warpgroup's
    # half of dS^T comes before that, so no wait separates the zeros from dQ's first wgmma and ptxas
    # folds them into it (ptxas 13.0: 16 CS2R a step fewer, NOTES session 11). Every wgmma fence of the
    # step is followed by its wgmma with no barrier wait between.
    tables, q, kv, rows = _setup(4100, 1000, 2, 128)
    tuning = mosaic_bwd.MosaicBwdTuning(fused=True, fused_order=order, memory_registers=24)
    backward = lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1, tuning=tuning)
    (module,) = _mosaic_modules(monkeypatch, backward, q, kv, kv, q, rows, q, rows)
    kinds = ("try_wait", "wgmma.fence", "wgmma.mma_async")
    ops = [next(k for k in kinds if k in line) for line in _compute_loop(module).split("\n")
           if any(k in line for k in kinds)]
    fences = [i for i, op in enumerate(ops) if op == "wgmma.fence"]
    assert ops.count("try_wait") >= 2 and fences, ops  # the step's pipeline wait and the dS^T wait
    for i in fences:
        assert next(op for op in ops[i + 1:] if op != "wgmma.fence") == "wgmma.mma_async", ops
