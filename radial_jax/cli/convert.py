"""`radial-jax convert`: a Wan2.1 PyTorch checkpoint (original or diffusers layout) to ours."""


def run(args) -> int:
    from convert import convert_checkpoint  # deferred: pulls in flax and the model

    components = convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {', '.join(components)} to {args.dst}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Wan2.1 PyTorch checkpoint (original or diffusers) to ours",
                       description="Convert a Wan2.1 checkpoint folder (original layout: "
                                   "diffusion_pytorch_model*.safetensors [+ .index.json] or a .pth, Wan2.1_VAE.pth, "
                                   "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, for I2V models_clip_*.pth; "
                                   "diffusers layout: transformer/, vae/, text_encoder/, tokenizer/, image_encoder/) "
                                   "or a single DiT file into radial-jax's format, streaming one tensor at a time. "
                                   "Generate with radial-jax generate --ckpt DST; load with "
                                   "convert.load_pipeline(DST) or convert.load_wan(DST).")  # fmt: skip
    p.add_argument("--src", required=True, help="checkpoint folder or file")
    p.add_argument("--dst", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                   help="storage dtype of the large weights (norms, modulation, head and the VAE stay f32; "
                        "default %(default)s)")
    p.set_defaults(func=run)
