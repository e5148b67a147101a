"""FlashAttention-4's Hopper (sm90) block-sparse forward (or backward) compiled to PTX on a machine without
a GPU, for `sass_report.py --ptx` beside ours (the same ptxas, the same loop summary).

    python benchmarks/fa4_ptx.py [--out DIR] [--seq 4096] [--heads 2] [--backward]

Needs a Python with torch (a CPU build does), flash-attn-4 and nvidia-cutlass-dsl (FA4's wheels, as
benchmarks/fa4.py uses on the GPU). FA4 compiles ahead of time under torch's FakeTensorMode (no GPU
tensors); the target is set here (sm_90a, 132 SMs: an H100 or H200). The shapes only size the launch:
the kernel's code is the same for any length. CuTe DSL writes PTX 9.4; the PTX is relabelled 9.0 for
ptxas 13.0 (the instructions it uses are 9.0's). Writes DIR/fa4_fwd_sm90.ptx (with --backward
DIR/fa4_bwd_sm90.ptx, the main backward kernel: FA4 picks 64-row query tiles, 128-key blocks and S^T for
head_dim 128 on 128-token mask blocks) and prints its key loops.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

BLOCK, HEAD_DIM = 128, 128


def compile_fa4_forward(seq: int, heads: int, dump_dir: str) -> str:
    """Returns the PTX of FA4's sm90 block-sparse forward (bf16, head_dim 128, 128-token blocks)."""
    os.environ.update(CUTE_DSL_KEEP_PTX="1", CUTE_DSL_DUMP_DIR=dump_dir, CUTE_DSL_ARCH="sm_90a",
                      FLASH_ATTENTION_NUM_SMS=os.environ.get("FLASH_ATTENTION_NUM_SMS", "132"))  # fmt: skip
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import flash_attn.cute.interface as interface
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    interface._get_device_arch = lambda: 90  # no GPU to ask
    blocks = -(-seq // BLOCK)
    with FakeTensorMode():
        q, k, v = (torch.empty(1, seq, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        counts = torch.empty(1, heads, blocks, dtype=torch.int32, device="cuda")
        ids = torch.empty(1, heads, blocks, blocks, dtype=torch.int32, device="cuda")
        sparsity = BlockSparseTensorsTorch(mask_block_cnt=counts, mask_block_idx=ids, full_block_cnt=counts,
                                           full_block_idx=ids, block_size=(BLOCK, BLOCK))  # fmt: skip
        interface._flash_attn_fwd(q, k, v, block_sparse_tensors=sparsity, return_lse=True)
    paths = glob.glob(os.path.join(dump_dir, "*FlashAttentionForwardSm90*.ptx"))
    if not paths:
        raise RuntimeError(f"FA4 wrote no sm90 forward PTX into {dump_dir}")
    return for_ptxas_13_0(open(paths[0]).read())


def compile_fa4_backward(seq: int, heads: int, dump_dir: str) -> str:
    """Returns the PTX of FA4's sm90 block-sparse backward's main kernel (bf16, head_dim 128, 128-token
    blocks); its pre- and postprocessing kernels are written beside it in dump_dir."""
    os.environ.update(CUTE_DSL_KEEP_PTX="1", CUTE_DSL_DUMP_DIR=dump_dir, CUTE_DSL_ARCH="sm_90a",
                      FLASH_ATTENTION_NUM_SMS=os.environ.get("FLASH_ATTENTION_NUM_SMS", "132"))  # fmt: skip
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import flash_attn.cute.interface as interface
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    interface._get_device_arch = lambda: 90  # no GPU to ask
    blocks = -(-seq // BLOCK)
    with FakeTensorMode():
        q, k, v, out, d_out = (torch.empty(1, seq, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
                               for _ in range(5))  # fmt: skip
        lse = torch.empty(1, heads, seq, dtype=torch.float32, device="cuda")
        counts = torch.empty(1, heads, blocks, dtype=torch.int32, device="cuda")
        ids = torch.empty(1, heads, blocks, blocks, dtype=torch.int32, device="cuda")
        sparsity = BlockSparseTensorsTorch(mask_block_cnt=counts, mask_block_idx=ids, full_block_cnt=counts,
                                           full_block_idx=ids, block_size=(BLOCK, BLOCK))  # fmt: skip
        interface._flash_attn_bwd(q, k, v, out, d_out, lse, block_sparse_tensors=sparsity)
    paths = glob.glob(os.path.join(dump_dir, "*FlashAttentionBackwardSm90*.ptx"))
    if not paths:
        raise RuntimeError(f"FA4 wrote no sm90 backward PTX into {dump_dir}")
    return for_ptxas_13_0(open(paths[0]).read())


def for_ptxas_13_0(ptx: str) -> str:
    """CuTe DSL's PTX (trailing NULs, `.version 9.4`) as ptxas 13.0 takes it (`.version 9.0`)."""
    return re.sub(r"^\.version 9\.\d+", ".version 9.0", ptx.rstrip("\x00"), flags=re.M)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fa4_ptx", help="output directory (default %(default)s)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens (sizes the launch only)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="the backward's main kernel instead of the forward")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    compile_kernel = compile_fa4_backward if args.backward else compile_fa4_forward
    with tempfile.TemporaryDirectory() as dump:
        ptx = compile_kernel(args.seq, args.heads, dump)
    path = os.path.join(args.out, "fa4_bwd_sm90.ptx" if args.backward else "fa4_fwd_sm90.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    print(f"wrote {path}")
    if shutil.which("ptxas") and shutil.which("nvdisasm"):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "sass_report.py"), "--ptx", path], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
