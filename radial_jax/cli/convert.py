"""`radial-jax convert`: a Wan2.1 or Wan2.2 A14B PyTorch checkpoint (original or diffusers layout) to ours."""

import shutil
from pathlib import Path


def run(args) -> int:
    from convert import GENERATION_PARTS, convert_checkpoint, stale_partials  # deferred: pulls in flax and the model

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    for stale in stale_partials(dst):
        shutil.rmtree(stale, ignore_errors=True)
        print(f"removed {stale}, left by an earlier conversion to {dst} that was killed")
    components = convert_checkpoint(src, dst, dtype=args.dtype)
    print(f"wrote {', '.join(components)} to {dst}")
    missing = [part + "/" for part in GENERATION_PARTS if part not in components]
    if missing:
        print(f"note: {src} has no {', '.join(missing)}: {dst} serves convert.load_wan({str(dst)!r}) (the DiT) "
              "but not radial-jax generate, which needs them; convert the whole Wan2.1 folder for that")
    elif _uses_clip(dst) and "image_encoder" not in components:
        print(f"note: an image-to-video DiT but {src} has no CLIP image encoder: radial-jax generate needs it")
    return 0


def _uses_clip(dst: Path) -> bool:
    from convert import read_config

    return read_config(dst)[1].uses_clip  # Wan2.1 I2V; Wan2.2 I2V-A14B takes no CLIP features


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Wan2.1 or Wan2.2 A14B checkpoint (original or diffusers) to ours",
                       description="Convert a Wan2.1 checkpoint folder (original layout: "
                                   "diffusion_pytorch_model*.safetensors [+ .index.json] or a .pth, Wan2.1_VAE.pth, "
                                   "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, for I2V models_clip_*.pth; "
                                   "diffusers layout: transformer/, vae/, text_encoder/, tokenizer/, image_encoder/) "
                                   "or a single DiT file into radial-jax's format, streaming one tensor at a time. "
                                   "Wan2.2 T2V-A14B/I2V-A14B: high_noise_model/ + low_noise_model/ (original) or "
                                   "transformer/ + transformer_2/ + model_index.json (diffusers) become two experts; "
                                   "TI2V-5B is refused. "
                                   "Reading .pth files needs torch: pip install -e \".[torch]\". "
                                   "Generate with radial-jax generate --ckpt DST (needs the DiT, VAE, umT5 and "
                                   "tokenizer); load with convert.load_pipeline(DST) or convert.load_wan(DST).")  # fmt: skip
    p.add_argument("--src", required=True, help="checkpoint folder or file")
    p.add_argument("--dst", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                   help="storage dtype of the large weights (norms, modulation, head and the VAE stay f32; "
                        "default %(default)s)")
    p.set_defaults(func=run, interrupted="nothing written to {dst} (its temporary folder was removed)")
