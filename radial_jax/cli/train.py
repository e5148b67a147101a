"""`radial-jax train`: LoRA length-extension training of a Wan2.1 DiT from a latent cache."""

import os
import sys


def run(args) -> int:
    """Loads the config, joins the other processes when launched multi-host, trains, reports."""
    # JAX's GPU allocator takes 75% of the card unless told otherwise; the 14B step at 720p-81f
    # needs 103 GiB of an H200's 141 GB (README: Train a LoRA). Read when the backend starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        # Before any other JAX call: every process must join before devices are listed.
        env = lambda name: int(os.environ[name]) if name in os.environ else None  # noqa: E731
        jax.distributed.initialize(coordinator, args.num_processes or env("JAX_NUM_PROCESSES"),
                                   args.process_id if args.process_id is not None else env("JAX_PROCESS_ID"))
    from train.config import load_config  # deferred: pulls in flax and the model
    from train.loop import TrainingError, train

    overrides = list(args.set or [])
    if args.mesh is not None:
        overrides.append(f"run.mesh={args.mesh}")
    config = load_config(args.config, overrides)
    try:
        result = train(config, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
    except TrainingError as e:
        print(f"radial-jax train: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(f"{config.run.out}: step {result.step} of {config.run.steps}, last loss {last:.4f}; checkpoints in "
              f"{config.run.out}/checkpoints" + (f", sample videos in {config.run.out}/samples" if config.sample.every
                                                  else ""))  # fmt: skip
        if result.lora_path is not None:
            ckpt = f"--ckpt {config.model.ckpt} " if config.model.ckpt else ""
            print(f"LoRA: {result.lora_path} (generate: radial-jax generate {ckpt}--lora {result.lora_path}; "
                  f"ComfyUI: radial-jax export {result.lora_path} --out lora_comfy.safetensors)")  # fmt: skip
        else:
            print(f"stopped at --stop-at {args.stop_at}; continue with the same command and --resume")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA on a latent cache (length extension under radial attention)",
                       description="Train a LoRA on the Wan2.1 DiT from a latent cache (radial-jax prepare) with "
                                   "Wan's flow-matching objective, self-attention through the radial plan, AdamW, "
                                   "sharded over a device mesh. Writes checkpoints/, metrics.csv, tensorboard/, "
                                   "samples/ (with sample.every) and finally lora.safetensors into run.out. Shipped configs: tiny (CPU, synthetic "
                                   "cache), wan-1.3b-480p-161f, wan-14b-720p-161f (train/configs/).")  # fmt: skip
    p.add_argument("--config", required=True, help="a TOML file, or the name of a shipped config (e.g. tiny)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax; repeatable), e.g. --set optim.learning_rate=5e-5")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, sequence; one may be -1); "
                                  "default: run.mesh of the config")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint in run.out (same step, schedule, data order and noise)")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after STEP with a checkpoint (a job's share of a run; continue with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.csv)")
    multi = p.add_argument_group("several hosts (jax.distributed; or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                 "JAX_PROCESS_ID in the environment)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0, the same on every host")
    multi.add_argument("--num-processes", type=int, help="processes in all (one per host)")
    multi.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    p.set_defaults(func=run, interrupted="the checkpoints already in run.out are kept; continue with --resume")
