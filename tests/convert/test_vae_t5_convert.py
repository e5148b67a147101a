"""VAE and umT5 converters on broken, foreign and alternative sources: one error listing every
problem, nothing left at the destination, tied and optional tensors, tokenizer files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.io import CheckpointError
from convert.umt5 import convert_umt5, load_umt5
from convert.wan_vae import convert_vae, load_vae
from models.t5 import Tokenizer


def diffusers_vae_folder(path, edit=None, **config_overrides):
    """Saves a tiny random AutoencoderKLWan to `path` (a diffusers vae/ folder); `edit` may
    change its state dict before it is written back."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=4, z_dim=16).save_pretrained(path)
    weights = path / "diffusion_pytorch_model.safetensors"
    if edit is not None:
        state = load_file(weights)
        edit(state)
        save_file(state, weights)
    if config_overrides:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **config_overrides}))
    return path


def transformers_umt5_folder(path, edit=None, **config_overrides):
    """Saves a tiny random UMT5EncoderModel to `path` (a diffusers text_encoder/ folder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", **config_overrides)  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(path)
    if edit is not None:
        state = load_file(path / "model.safetensors")
        edit(state)
        save_file(state, path / "model.safetensors")
    return path


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_vae_error_lists_missing_unexpected_and_mismatched_and_writes_nothing(tmp_path):
    def damage(state):
        del state["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
        state["decoder.extra.weight"] = torch.zeros(3)
        state["encoder.mid_block.attentions.0.to_qkv.weight"] = torch.zeros(48, 16, 3, 3)

    src = diffusers_vae_folder(tmp_path / "vae", damage)
    with pytest.raises(CheckpointError) as error:
        convert_vae(src, tmp_path / "out")
    message = str(error.value)
    assert "decoder.up_blocks.1.upsamplers.0.time_conv.bias" in message
    assert "decoder.extra.weight" in message
    assert "encoder.mid_block.attentions.0.to_qkv.weight" in message and "(48, 16, 3, 3)" in message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_vae_from_a_wan22_config_is_refused_with_the_reason(tmp_path):
    src = diffusers_vae_folder(tmp_path / "vae", is_residual=True)
    with pytest.raises(CheckpointError, match="is_residual=True.*Wan2.2"):
        convert_vae(src, tmp_path / "out")


def test_vae_from_a_folder_without_one_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no Wan2.1 VAE found"):
        convert_vae(tmp_path / "empty", tmp_path / "out")


def test_vae_from_a_foreign_state_dict_names_the_expected_markers(tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="encoder.conv1.weight.*encoder.conv_in.weight"):
        convert_vae(tmp_path / "model.pth", tmp_path / "out")


def test_vae_into_an_existing_folder_is_refused(tmp_path):
    src = diffusers_vae_folder(tmp_path / "vae")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists"):
        convert_vae(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_load_rejects_another_component_and_a_tampered_tensor(tmp_path):
    convert_vae(diffusers_vae_folder(tmp_path / "vae"), tmp_path / "vae_ours")
    with pytest.raises(CheckpointError, match="radial-jax/umt5-encoder"):
        load_umt5(tmp_path / "vae_ours")
    weights = tmp_path / "vae_ours" / "model.safetensors"
    state = load_file(weights)
    state["conv2.kernel"] = torch.zeros(1, 1, 1, 16, 15)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="conv2.kernel"):
        load_vae(tmp_path / "vae_ours")


@pytest.mark.parametrize("embedding", ["shared", "embed_tokens", "both"])
def test_umt5_reads_whichever_copy_of_the_tied_embedding_is_present(tmp_path, embedding):
    def keep(state):
        shared = state.pop("shared.weight")
        if embedding in ("shared", "both"):
            state["shared.weight"] = shared
        if embedding in ("embed_tokens", "both"):
            state["encoder.embed_tokens.weight"] = shared.clone()

    src = transformers_umt5_folder(tmp_path / "text_encoder", keep)
    encoder = load_umt5(convert_umt5(src, tmp_path / "out", "f32"))
    expected = load_file(src / "model.safetensors")
    tied = expected.get("shared.weight", expected.get("encoder.embed_tokens.weight"))
    assert (encoder.token_embedding.embedding[...] == tied.numpy()).all()


def test_umt5_error_lists_every_problem(tmp_path):
    def damage(state):
        del state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
        state["encoder.block.0.layer.0.SelfAttention.o.weight"] = torch.zeros(16, 15)
        state["lm_head.weight"] = torch.zeros(40, 16)

    src = transformers_umt5_folder(tmp_path / "text_encoder", damage)
    with pytest.raises(CheckpointError) as error:
        convert_umt5(src, tmp_path / "out")
    message = str(error.value)
    for name in ("block.1.layer.1.DenseReluDense.wi_0", "SelfAttention.o.weight", "lm_head.weight"):
        assert name in message
    assert not (tmp_path / "out").exists()


def test_umt5_refuses_plain_t5_with_a_shared_position_bias(tmp_path):
    src = transformers_umt5_folder(tmp_path / "text_encoder")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="only umT5"):
        convert_umt5(src, tmp_path / "out")


def test_umt5_from_a_pipeline_folder_copies_its_tokenizer(tmp_path):
    import sentencepiece

    transformers_umt5_folder(tmp_path / "pipeline" / "text_encoder")
    (tmp_path / "pipeline" / "tokenizer").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a small test sentence", "another small one"] * 4), vocab_size=20,
        model_prefix=str(tmp_path / "pipeline" / "tokenizer" / "spiece"), hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    out = convert_umt5(tmp_path / "pipeline", tmp_path / "out", "f32")
    tokenizer = Tokenizer.from_dir(out / "tokenizer")
    ids, mask = tokenizer("a small test")
    assert tokenizer.decode(ids[0], mask[0]) == "a small test"
    assert load_umt5(out).config.num_layers == 2
