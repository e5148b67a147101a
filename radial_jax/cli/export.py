"""`radial-jax export`: a LoRA trained here rewritten for another tool (diffusers/PEFT or ComfyUI names)."""

from pathlib import Path

LORA_FILE = "lora.safetensors"  # what a training run folder holds


def run(args) -> int:
    """Reads the LoRA the training wrote (a file, or a run folder's lora.safetensors), writes it in --format."""
    from train.export import export_lora, read_exported

    source = args.source / LORA_FILE if args.source.is_dir() else args.source
    if args.out.resolve() == source.resolve():
        raise ValueError(f"--out {args.out} is the source file; give another name")
    factors = read_exported(source)
    export_lora(factors, args.out, format=args.format)
    (down, _, alpha), *_ = factors.values()
    print(f"wrote {args.out}: {len(factors)} LoRA modules, rank {down.shape[0]}, alpha {alpha:g}, {args.format} names")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="rewrite a trained LoRA in diffusers or ComfyUI names",
                       description="Rewrite a LoRA written by radial-jax training (diffusers names, alpha folded "
                                   "into lora_B) as --format comfy (diffusion_model.blocks.N.self_attn.q.lora_down/"
                                   "lora_up + alpha, what ComfyUI loads) or back to --format diffusers "
                                   "(transformer.blocks.N.attn1.to_q.lora_A/lora_B, what diffusers' "
                                   "load_lora_weights and generate --lora load).")  # fmt: skip
    p.add_argument("source", type=Path, help="a LoRA .safetensors written by radial-jax, or a training run folder")
    p.add_argument("--out", type=Path, required=True, help=".safetensors to write")
    p.add_argument("--format", choices=("diffusers", "comfy"), default="comfy", help="(default %(default)s)")
    p.set_defaults(func=run, interrupted="{out} is complete or absent (written under a temporary name, then renamed)")
