"""Which register writes make ptxas serialize two wgmma groups in flight: minimal PTX of the overlapped step.

    python benchmarks/wgmma_hazards.py [--ptxas PATH] [--out FILE] [--emit DIR]

One loop per pattern, the shape of mosaic_fwd's overlapped middle step at n = 64: zero S, fence, issue
S = A B (both operands in shared memory), fence, issue O += P B (P in four registers, the RS form),
wait_group 1, a few ex2 on S (the softmax), wait_group 0, alpha from memory, O *= alpha. The patterns
move one register write:
  cast_in_flight   P's next value (cvt.rn.bf16x2.f32 from S) written before wait_group 0, i.e. into
                   the registers of the P V in flight: what LLVM makes of MosaicTuning(overlap_qk=True)
                   when it gives P_{j+1} P_j's registers (they are dead to it once the asm is issued)
  cast_after_wait  the same cast after wait_group 0 (MosaicTuning.overlap_late_p)
  p_before_fence   P written between the S issue and P V's fence (legal: the fence orders it)
  rescale_between  O *= alpha between the S issue and P V's fence (MosaicTuning.overlap_early_rescale)
  o_in_flight      one of O's registers written while P V runs
and one backward step (MosaicBwdTuning(fused_order="fa4"), its lowered wgmma order at n = 64):
  bwd_fa4_step     issue S^T, dP^T (SS); wait_group 1; ex2 on S^T, P^T cast; issue dV (RS, P^T);
                   wait_group 1; dS^T from dP^T and P^T, cast, stored to shared memory, bar.sync;
                   dQ's accumulator zeroed (dV in flight); issue dQ (SS), dK (RS, dS^T); wait_group 2;
                   wait_group 1; dQ stored to shared memory (dK in flight); wait_group 0
Runs ptxas -arch=sm_90a -v on each (ptxas is a host program: no GPU needed) and prints and writes
its C75xx messages as JSON. --emit writes the PTX files.

--llc PATH also asks LLVM's NVPTX back end where the cast lands: an LLVM IR model of the loop as Mosaic
lowers it (each wgmma, fence and optimization barrier an inline asm, operands tied, P and O carried by
phis), with the cast before the wait_group 0 (overlap_qk) or after it (overlap_late_p), compiled by llc;
the report says whether the cast writes the P V asm's A register and whether it sits between the waits.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

N = 64  # the wgmmas' n: N // 2 f32 accumulator registers per thread
PATTERNS = ("cast_in_flight", "cast_after_wait", "p_before_fence", "rescale_between", "o_in_flight", "bwd_fa4_step")


def ptx(pattern: str) -> str:
    """Returns the PTX module of one pattern (see the module docstring)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")
    if pattern == "bwd_fa4_step":
        return _fa4_backward_ptx()
    acc = N // 2
    s, o, p = [f"%s{i}" for i in range(acc)], [f"%o{i}" for i in range(acc)], [f"%p{i}" for i in range(4)]
    shape = f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.bf16.bf16"
    issue_s = [f"{shape} {{{','.join(s)}}}, %da, %db, 1, 1, 1, 0, 0;", "wgmma.commit_group.sync.aligned;"]
    issue_pv = [f"{shape} {{{','.join(o)}}}, {{{','.join(p)}}}, %db, 1, 1, 1, 0;", "wgmma.commit_group.sync.aligned;"]
    fence = ["wgmma.fence.sync.aligned;"]
    rescale = [f"mul.f32 {r}, {r}, %alpha;" for r in o]
    cast = [f"cvt.rn.bf16x2.f32 {p[i]}, {s[2 * i]}, {s[2 * i + 1]};" for i in range(4)]
    between = {"p_before_fence": [f"add.u32 {r}, {r}, 1;" for r in p], "rescale_between": rescale}.get(pattern, [])
    body = [f"mov.f32 {r}, 0f00000000;" for r in s] + fence + issue_s + between + fence + issue_pv
    body += ["wgmma.wait_group.sync.aligned 1;"] + [f"ex2.approx.f32 {r}, {r};" for r in s[:8]]
    if pattern == "o_in_flight":
        body += [f"mov.f32 {o[0]}, {s[3]};"]
    if pattern == "cast_in_flight":
        body += cast
    body += ["wgmma.wait_group.sync.aligned 0;"] + ([] if pattern == "cast_in_flight" else cast)
    body += ["ld.volatile.global.f32 %alpha, [%out];"] + ([] if pattern == "rescale_between" else rescale)
    lines = [".version 8.0", ".target sm_90a", ".address_size 64",
             ".visible .entry overlapped_step(.param .u64 pa, .param .u64 pb, .param .u32 pn, .param .u64 pout)",
             "{", f".reg .f32 %s<{acc}>, %o<{acc}>, %alpha;", ".reg .b32 %p<4>, %n, %i;", ".reg .b64 %da, %db, %out;",
             ".reg .pred %more;", "ld.param.u64 %da, [pa];", "ld.param.u64 %db, [pb];", "ld.param.u32 %n, [pn];",
             "ld.param.u64 %out, [pout];", "mov.f32 %alpha, 0f3F800000;", "mov.u32 %i, 0;"]  # fmt: skip
    lines += [f"mov.f32 {r}, 0f00000000;" for r in o] + [f"mov.b32 {r}, 0;" for r in p] + ["LOOP:"] + body
    lines += ["add.u32 %i, %i, 1;", "setp.lt.u32 %more, %i, %n;", "@%more bra LOOP;"]
    lines += [f"st.global.f32 [%out+{4 * i}], {r};" for i, r in enumerate(o)] + ["ret;", "}"]
    return "\n".join(lines) + "\n"


def _fa4_backward_ptx() -> str:
    """Returns the PTX module of the bwd_fa4_step pattern (see the module docstring): dV and dK accumulate
    across the loop; P^T and dS^T (four registers each) are fresh values each step, as in the kernel."""
    acc = N // 2
    regs = lambda name, count: [f"%{name}{i}" for i in range(count)]
    s, dp, dv, dk, dq = (regs(name, acc) for name in "stvkq")
    p, ds = regs("p", 4), regs("d", 4)
    shape = f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.bf16.bf16"
    commit, fence = "wgmma.commit_group.sync.aligned;", "wgmma.fence.sync.aligned;"
    ss = lambda c: [f"{shape} {{{','.join(c)}}}, %da, %db, 1, 1, 1, 0, 0;", commit]
    rs = lambda c, a: [f"{shape} {{{','.join(c)}}}, {{{','.join(a)}}}, %db, 1, 1, 1, 0;", commit]
    wait = lambda n: f"wgmma.wait_group.sync.aligned {n};"
    cast = lambda dst, src: [f"cvt.rn.bf16x2.f32 {dst[i]}, {src[2 * i]}, {src[2 * i + 1]};" for i in range(4)]
    body = [f"mov.f32 {r}, 0f00000000;" for r in s + dp] + [fence] + ss(s) + ss(dp) + [wait(1)]
    body += [f"ex2.approx.f32 {r}, {r};" for r in s] + cast(p, s) + [fence] + rs(dv, p) + [wait(1)]
    body += [f"sub.f32 {r}, {r}, %delta;" for r in dp] + [f"mul.f32 {a}, {a}, {b};" for a, b in zip(dp, s)]
    body += cast(ds, dp) + [f"st.shared.b32 [%sm+{4 * i}], {r};" for i, r in enumerate(ds)] + ["bar.sync 1, 128;"]
    body += [f"mov.f32 {r}, 0f00000000;" for r in dq] + [fence] + ss(dq) + rs(dk, ds) + [wait(2), wait(1)]
    body += [f"st.shared.f32 [%sm+{16 + 4 * i}], {r};" for i, r in enumerate(dq)] + [wait(0)]
    lines = [".version 8.0", ".target sm_90a", ".address_size 64",
             ".visible .entry fa4_backward_step(.param .u64 pa, .param .u64 pb, .param .u32 pn, .param .u64 pout)",
             "{", f".reg .f32 %s<{acc}>, %t<{acc}>, %v<{acc}>, %k<{acc}>, %q<{acc}>, %delta;",
             ".reg .b32 %p<4>, %d<4>, %n, %i, %sm;", ".reg .b64 %da, %db, %out;", ".reg .pred %more;",
             ".shared .align 16 .b8 tile[256];", "mov.u32 %sm, tile;", "ld.param.u64 %da, [pa];",
             "ld.param.u64 %db, [pb];", "ld.param.u32 %n, [pn];", "ld.param.u64 %out, [pout];",
             "ld.global.f32 %delta, [%out];", "mov.u32 %i, 0;"]  # fmt: skip
    lines += [f"mov.f32 {r}, 0f00000000;" for r in dv + dk] + ["LOOP:"] + body
    lines += ["add.u32 %i, %i, 1;", "setp.lt.u32 %more, %i, %n;", "@%more bra LOOP;"]
    lines += [f"st.global.f32 [%out+{4 * i}], {r};" for i, r in enumerate(dv + dk)] + ["ret;", "}"]
    return "\n".join(lines) + "\n"


def llvm_model(late_p: bool) -> str:
    """Returns LLVM IR of one overlapped loop (one register per operand; the asm strings are comments)."""
    if late_p:
        softmax = """  %eb = call float asm sideeffect "// barrier before wait", "=f,0"(float %e)
  call void asm sideeffect "wgmma.wait_group.sync.aligned 0;", ""()
  %ea = call float asm sideeffect "// barrier after wait", "=f,0"(float %eb)
  %pn = call i32 @llvm.nvvm.ff2bf16x2.rn(float %ea, float %ea)
"""
    else:
        softmax = """  %pc = call i32 @llvm.nvvm.ff2bf16x2.rn(float %e, float %e)
  %pn = call i32 asm sideeffect "// barrier before wait", "=r,0"(i32 %pc)
  call void asm sideeffect "wgmma.wait_group.sync.aligned 0;", ""()
  %eb = fadd float %e, 0.0
"""
    return """target triple = "nvptx64-nvidia-cuda"
declare i32 @llvm.nvvm.ff2bf16x2.rn(float, float)
declare float @llvm.nvvm.ex2.approx.f(float)

define void @overlapped_loop(i64 %desc, i32 %n, float* %out) {
entry:
  br label %loop
loop:
  %i = phi i32 [0, %entry], [%i1, %loop]
  %p = phi i32 [0, %entry], [%pn, %loop]
  %o = phi float [0.0, %entry], [%ob, %loop]
  %z = call float asm sideeffect "// barrier S zero", "=f,0"(float 0.0)
  call void asm sideeffect "wgmma.fence.sync.aligned;", ""()
  %s = call float asm sideeffect "// wgmma S $0", "=f,0,l"(float %z, i64 %desc)
  call void asm sideeffect "wgmma.commit_group.sync.aligned;", ""()
  %pf = call i32 asm sideeffect "// barrier P fence", "=r,0"(i32 %p)
  call void asm sideeffect "wgmma.fence.sync.aligned;", ""()
  %o1 = call float asm sideeffect "// wgmma PV $0 A=$2", "=f,0,r"(float %o, i32 %pf)
  call void asm sideeffect "wgmma.commit_group.sync.aligned;", ""()
  call void asm sideeffect "wgmma.wait_group.sync.aligned 1;", ""()
  %e = call float @llvm.nvvm.ex2.approx.f(float %s)
""" + softmax + """  %o2 = fmul float %o1, %eb
  %ob = call float asm sideeffect "// barrier O store", "=f,0"(float %o2)
  call void asm sideeffect "wgmma.fence.sync.aligned;", ""()
  %i1 = add i32 %i, 1
  %more = icmp slt i32 %i1, %n
  br i1 %more, label %loop, label %exit
exit:
  store float %ob, float* %out
  ret void
}
"""


def cast_placement(ptx_text: str) -> dict:
    """Returns where llc put P's cast in llvm_model's loop: into the P V's A register? between the waits?"""
    a_register = re.search(r"// wgmma PV %f\d+ A=(%r\d+)", ptx_text).group(1)
    cast = re.search(r"cvt\.rn\.bf16x2\.f32\s+(%r\d+)", ptx_text)
    wait_1 = ptx_text.index("wgmma.wait_group.sync.aligned 1;")
    wait_0 = ptx_text.index("wgmma.wait_group.sync.aligned 0;")
    return {"cast_writes_the_p_v_operand": cast.group(1) == a_register,
            "cast_between_the_waits": wait_1 < cast.start() < wait_0}


def _llc_version(llc: str) -> str:
    out = subprocess.run([llc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"LLVM version [\w.]+", out).group(0)


def messages(ptxas_output: str) -> list[str]:
    """Returns ptxas's numbered warnings (C75xx: wgmma serialization, injected arrives and waits), shortened."""
    found = re.findall(r"\((C75\d\d)\) (.*?)(?: in (?:the )?function '.*')?$", ptxas_output, flags=re.M)
    return [code + " " + re.sub(r" in around line \d+", "", text).strip() for code, text in found]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptxas", default=shutil.which("ptxas"), help="ptxas binary (default: the one on PATH)")
    parser.add_argument("--out", help="JSON path for the messages per pattern")
    parser.add_argument("--emit", help="directory to write <pattern>.ptx into")
    parser.add_argument("--llc", help="an llc with the NVPTX target: also place the cast with LLVM (llvm_model)")
    args = parser.parse_args(argv)
    if not args.ptxas:
        parser.error("no ptxas on PATH: install the CUDA toolkit's ptxas or pass --ptxas PATH")
    version = subprocess.run([args.ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in PATTERNS:
            source = os.path.join(args.emit or tmp, f"{pattern}.ptx")
            os.makedirs(os.path.dirname(source), exist_ok=True)
            with open(source, "w") as f:
                f.write(ptx(pattern))
            run = subprocess.run([args.ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(tmp, "out.cubin")],
                                 capture_output=True, text=True)  # fmt: skip
            if run.returncode != 0:
                sys.exit(f"wgmma_hazards: ptxas rejected {pattern}: {run.stderr.strip()[-500:]}")
            results[pattern] = messages(run.stdout + run.stderr)
            print(f"{pattern:16s} {'; '.join(results[pattern]) or 'no wgmma warning'}", flush=True)
        placements = {}
        for late_p in (False, True) if args.llc else ():
            ir_path, ptx_path = os.path.join(tmp, "model.ll"), os.path.join(tmp, "model.ptx")
            with open(ir_path, "w") as f:
                f.write(llvm_model(late_p))
            subprocess.run([args.llc, "-march=nvptx64", "-mcpu=sm_80", "-O3", ir_path, "-o", ptx_path], check=True)
            with open(ptx_path) as f:
                name = "late_p" if late_p else "overlap_qk"
                placements[name] = cast_placement(f.read())
            print(f"llc model, {name:10s} {placements[name]}", flush=True)
    if args.out:
        record = {"ptxas": version.strip().splitlines()[-1], "command": " ".join(sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "messages": results}  # fmt: skip
        if placements:
            record["llc"] = {"version": _llc_version(args.llc), **placements}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return results, placements


if __name__ == "__main__":
    main()
