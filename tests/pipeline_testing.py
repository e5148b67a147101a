"""Tiny whole Wan2.1 checkpoint folders for the generation tests: random torch modules (diffusers
WanTransformer3DModel and AutoencoderKLWan, transformers UMT5EncoderModel and CLIPVisionModel)
and a sentencepiece tokenizer trained here, saved in the diffusers layout or the original one.

Sizes agree with each other as in a real checkpoint: the DiT's latent channels are the VAE's
z_dim (16), its text_dim the umT5 width, its img_dim the CLIP width. The original names of the
VAE and umT5 tensors come from convert/'s own tables (inverted): name-level correctness of
those tables is tested against independent readings in tests/models; here the point is that a
whole folder is found, converted and loaded.
"""

import json
from pathlib import Path

import torch
from flax import nnx
from safetensors.torch import save_file

from convert import umt5, wan_vae
from convert.transforms import expand_rows
from models.wan.vae import VAEConfig, WanVAE
from wan_testing import original_config_json, original_state_dict

Z_DIM, VAE_BASE_DIM = 16, 4
TEXT_DIM, VOCAB = 32, 96
CLIP_DIM, CLIP_LAYERS, CLIP_IMAGE, CLIP_PATCH = 160, 3, 28, 14  # head_dim 80 as ViT-H/14
SENTENCES = ("A cat sits on the mat.", "Two cats box on a stage.", "Video diffusion with radial attention",
             "The quick brown fox jumps over the lazy dog", "Salt & pepper on the table")  # fmt: skip


def tiny_dit(kind: str = "t2v", seed: int = 0):
    """Returns a random diffusers WanTransformer3DModel sized for the tiny VAE and umT5 below."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    i2v = dict(image_dim=CLIP_DIM, added_kv_proj_dim=40) if kind == "i2v" else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20, in_channels=36 if kind == "i2v" else Z_DIM,
        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, **i2v,
    ).eval()  # fmt: skip


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=VAE_BASE_DIM, z_dim=Z_DIM).eval()


def tiny_umt5(seed: int = 2):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=VOCAB, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                       feed_forward_proj="gated-gelu")).eval()  # fmt: skip


def tiny_clip(seed: int = 3):
    """Returns a random CLIPVisionModelWithProjection (the class diffusers' I2V repos save)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM, num_attention_heads=CLIP_DIM // 80,
        num_hidden_layers=CLIP_LAYERS, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, hidden_act="gelu",
        projection_dim=16)).eval()  # fmt: skip


def train_spiece(folder: Path) -> Path:
    """Trains a tiny T5-style sentencepiece model (pad 0, eos 1, unk 2) into folder/spiece.model."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_prefix=str(folder / "spiece"), vocab_size=64,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "spiece.model"


def diffusers_folder(root: Path, kind: str = "t2v") -> Path:
    """Writes a diffusers-layout pipeline folder (transformer/, vae/, text_encoder/, tokenizer/
    [, image_encoder/]) and returns it."""
    tiny_dit(kind).save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    tiny_umt5().save_pretrained(root / "text_encoder")
    train_spiece(root / "tokenizer")
    if kind == "i2v":
        tiny_clip().save_pretrained(root / "image_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def original_folder(root: Path, kind: str = "t2v") -> Path:
    """Writes an original Wan2.1-layout folder (diffusion_pytorch_model.safetensors + config.json,
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ [, models_clip_...pth])."""
    root.mkdir(parents=True, exist_ok=True)
    dit = tiny_dit(kind)
    save_original_dit(dit, root, model_type=kind)
    _original_vae_and_text_encoder(root)
    if kind == "i2v":
        torch.save(clip_original_state_dict(tiny_clip()), root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return root


def save_original_dit(dit, folder: Path, *, model_type: str) -> None:
    """Writes a diffusers DiT as the original WanModel saves it: config.json + safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**original_config_json(dit), "model_type": model_type}))
    save_file(original_state_dict(dit), str(folder / "diffusion_pytorch_model.safetensors"))


def tiny_expert(kind: str = "t2v", seed: int = 0):
    """Returns a random diffusers DiT shaped as one Wan2.2 A14B expert: Wan2.1's network; for I2V
    y's 36 input channels and no image embedder (no CLIP). Every tensor is perturbed so that
    no two norms are equal (an exchanged pair would otherwise go unnoticed)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20, in_channels=36 if kind == "i2v" else Z_DIM,
        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


A14B_EXPERT_SEEDS = (10, 11)  # high-noise, low-noise expert


def a14b_diffusers_folder(root: Path, kind: str = "t2v", *, boundary_ratio: float | None = 0.875) -> Path:
    """Writes a Wan2.2 A14B diffusers folder: transformer/ (high noise), transformer_2/ (low
    noise), vae/, text_encoder/, tokenizer/, model_index.json with boundary_ratio."""
    for name, seed in zip(("transformer", "transformer_2"), A14B_EXPERT_SEEDS):
        tiny_expert(kind, seed).save_pretrained(root / name)
    tiny_vae().save_pretrained(root / "vae")
    tiny_umt5().save_pretrained(root / "text_encoder")
    train_spiece(root / "tokenizer")
    index = {"_class_name": "WanImageToVideoPipeline" if kind == "i2v" else "WanPipeline", "expand_timesteps": False,
             **({"boundary_ratio": boundary_ratio} if boundary_ratio is not None else {})}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def a14b_original_folder(root: Path, kind: str = "t2v") -> Path:
    """Writes a Wan2.2 A14B original folder: high_noise_model/, low_noise_model/ (config.json +
    safetensors each), Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/."""
    for name, seed in zip(("high_noise_model", "low_noise_model"), A14B_EXPERT_SEEDS):
        save_original_dit(tiny_expert(kind, seed), root / name, model_type=kind)
    _original_vae_and_text_encoder(root)
    return root


def _original_vae_and_text_encoder(root: Path) -> None:
    torch.save(_renamed(tiny_vae().state_dict(), _vae_names()), root / wan_vae.ORIGINAL_FILE)
    layers = 2
    original = {row.target: row.source for row in expand_rows(umt5.ORIGINAL_TABLE, layers)}
    names = {row.source: original[row.target] for row in expand_rows(umt5.DIFFUSERS_TABLE, layers)}
    state = {k: v for k, v in tiny_umt5().state_dict().items() if k != umt5.DIFFUSERS_TIED}
    torch.save(_renamed(state, names), root / umt5.ORIGINAL_FILE)
    train_spiece(root / "google" / "umt5-xxl")


def _vae_names() -> dict[str, str]:
    abstract = nnx.eval_shape(lambda: WanVAE(VAEConfig(base_dim=VAE_BASE_DIM, z_dim=Z_DIM), rngs=nnx.Rngs(0)))
    original = {row.target: row.source for row in wan_vae.original_table(abstract)}
    return {row.source: original[row.target] for row in wan_vae.diffusers_table(abstract)}


def _renamed(state: dict, names: dict[str, str]) -> dict:
    return {names[k]: v.contiguous() for k, v in state.items()}


def clip_original_state_dict(model, text_tower: bool = True) -> dict[str, torch.Tensor]:
    """Returns a transformers CLIP vision model's tensors as Wan's XLMRobertaCLIP .pth names them
    (wan/modules/clip.py): visual.* with a fused attn.to_qkv; with a stand-in text tower and
    log_scale, which the converter must skip."""
    state = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    dim = state["embeddings.class_embedding"].shape[0]
    out = {
        "visual.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": state["embeddings.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embedding": state["embeddings.position_embedding.weight"][None],
        "visual.pre_norm.weight": state["pre_layrnorm.weight"], "visual.pre_norm.bias": state["pre_layrnorm.bias"],
        "visual.post_norm.weight": state["post_layernorm.weight"], "visual.post_norm.bias": state["post_layernorm.bias"],
        "visual.head": torch.zeros(dim, 8),
    }  # fmt: skip
    if text_tower:
        out.update({"log_scale": torch.zeros(()), "textual.token_embedding.weight": torch.zeros(5, 4)})
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for n in range(layers):
        theirs, ours = f"encoder.layers.{n}.", f"visual.transformer.{n}."
        for leaf in ("weight", "bias"):
            out[ours + f"attn.to_qkv.{leaf}"] = torch.cat([state[theirs + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for mine, name in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                               ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):  # fmt: skip
                out[ours + f"{mine}.{leaf}"] = state[theirs + f"{name}.{leaf}"]
    return {k: v.contiguous() for k, v in out.items()}
