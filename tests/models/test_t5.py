"""The umT5 encoder against transformers' UMT5EncoderModel with the same random weights, its
converters, and the tokenizer against transformers' T5Tokenizer on a sentencepiece model
trained in the test."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.io import read_safetensors
from convert.umt5 import convert_umt5, load_umt5
from models.t5 import Tokenizer, clean_prompt, encode_text, relative_position_buckets

VOCAB, LENGTH = 96, 64
PROMPT_LENGTHS = (10, 40)  # ragged: padding must not leak into the kept tokens
TOLERANCE = 1e-4  # of the reference's max |value|; f32 reorderings give ~1e-7
SENTENCES = (
    "A cat sits on the mat.", "Ein Hund läuft über die Wiese.", "Un chat noir dort au soleil.",
    "Video diffusion with radial attention", "The quick brown fox jumps over the lazy dog", "数字 视频 生成",
    "Salt & pepper on the table",
)  # fmt: skip


def tiny_transformers_umt5(seed: int = 0, dtype=torch.float32):
    """Returns a random UMT5EncoderModel (2 layers, 4 heads); norm weights perturbed from ones."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")  # fmt: skip
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layer_norm" in name:
                tensor.uniform_(0.5, 1.5)
    return model.to(dtype)


def to_original_name(name: str) -> str:
    """Returns the Wan2.1 models_t5_umt5-xxl-enc-bf16.pth name of a transformers UMT5 tensor
    (written from wan/modules/t5.py, T5Encoder)."""
    if name == "shared.weight":
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    _, _, n, _, sub, *rest = name.split(".")
    leaf = ".".join(rest)
    return f"blocks.{n}." + {
        ("0", "layer_norm.weight"): "norm1.weight",
        ("0", "SelfAttention.q.weight"): "attn.q.weight",
        ("0", "SelfAttention.k.weight"): "attn.k.weight",
        ("0", "SelfAttention.v.weight"): "attn.v.weight",
        ("0", "SelfAttention.o.weight"): "attn.o.weight",
        ("0", "SelfAttention.relative_attention_bias.weight"): "pos_embedding.embedding.weight",
        ("1", "layer_norm.weight"): "norm2.weight",
        ("1", "DenseReluDense.wi_0.weight"): "ffn.gate.0.weight",
        ("1", "DenseReluDense.wi_1.weight"): "ffn.fc1.weight",
        ("1", "DenseReluDense.wo.weight"): "ffn.fc2.weight",
    }[(sub, leaf)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our encoder converted from its save_pretrained folder in f32, tmp folder)."""
    root = tmp_path_factory.mktemp("umt5")
    reference = tiny_transformers_umt5()
    reference.save_pretrained(root / "diffusers")
    convert_umt5(root / "diffusers", root / "ours", "f32")
    return reference, load_umt5(root / "ours"), root


def _prompts():
    rng = np.random.default_rng(0)
    mask = (np.arange(LENGTH)[None] < np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
    return rng.integers(2, VOCAB, (len(PROMPT_LENGTHS), LENGTH)).astype(np.int32) * mask, mask


def _reference_context(reference, ids, mask) -> np.ndarray:
    with torch.no_grad():
        hidden = reference(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return hidden.last_hidden_state.float().numpy()


def test_encoder_matches_transformers_umt5_and_zeroes_padding(models):
    reference, encoder, _ = models
    ids, mask = _prompts()
    context = np.asarray(encode_text(encoder, ids, mask))
    expected = _reference_context(reference, ids, mask)
    assert context.shape == (2, LENGTH, 32) and context.dtype == np.float32
    kept = mask.astype(bool)
    assert np.all(context[~kept] == 0)  # Wan: the prompt's tokens, zero-padded to the text length
    assert np.abs(context[kept] - expected[kept]).max() <= TOLERANCE * np.abs(expected[kept]).max()


def test_bf16_encoder_runs_under_strict_promotion_and_tracks_transformers_bf16(models):
    _, _, root = models
    ids, mask = _prompts()
    context = encode_text(load_umt5(root / "ours", dtype="bf16"), ids, mask)
    assert context.dtype == jnp.bfloat16
    expected = _reference_context(tiny_transformers_umt5(dtype=torch.bfloat16), ids, mask)
    kept = mask.astype(bool)
    error = np.abs(np.asarray(context, np.float32)[kept] - expected[kept]).max()
    assert error <= 0.03 * np.abs(expected[kept]).max()  # bf16 carries ~3 significant digits


@pytest.mark.parametrize("length,num_buckets,max_distance", [(512, 32, 128), (300, 16, 40)])
def test_relative_position_buckets_match_transformers(length, num_buckets, max_distance):
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    config = UMT5Config(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance)
    attention = UMT5Attention(config, has_relative_attention_bias=True)
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = attention._relative_position_bucket(relative).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), expected)


def test_original_pth_and_diffusers_folder_convert_to_identical_trees(models, tmp_path):
    reference, _, root = models
    state = {k: v for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    torch.save({to_original_name(name): tensor for name, tensor in state.items()}, tmp_path / "models_t5.pth")
    convert_umt5(tmp_path / "models_t5.pth", tmp_path / "from_pth", "f32")
    from_pth = read_safetensors(tmp_path / "from_pth" / "model.safetensors")
    from_diffusers = read_safetensors(root / "ours" / "model.safetensors")
    assert from_pth.tensors == from_diffusers.tensors
    for name in from_diffusers.tensors:
        np.testing.assert_array_equal(from_pth.read(name), from_diffusers.read(name), err_msg=name)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """(folder with spiece.model, folder with the equivalent tokenizer.json) of a tiny T5-style
    sentencepiece model (pad 0, eos 1, unk 2, as umT5), trained here."""
    import sentencepiece
    from transformers import T5Tokenizer

    spiece, fast = tmp_path_factory.mktemp("spiece"), tmp_path_factory.mktemp("tokenizer_json")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_prefix=str(spiece / "spiece"), vocab_size=64,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    T5Tokenizer.from_pretrained(spiece, extra_ids=0).save_pretrained(fast)
    return spiece, fast


@pytest.mark.parametrize("backend", ["spiece", "tokenizer_json"])
def test_tokenizer_ids_match_transformers_t5_tokenizer(tokenizer_dirs, backend):
    from transformers import T5Tokenizer

    spiece, fast = tokenizer_dirs
    texts = [*SENTENCES, "A   cat\tsits  on the mat. " * 3]  # the last is truncated at length 16
    expected = T5Tokenizer.from_pretrained(spiece, extra_ids=0)(
        [clean_prompt(t) for t in texts], padding="max_length", truncation=True, max_length=16
    )  # fmt: skip
    ids, mask = Tokenizer.from_dir(spiece if backend == "spiece" else fast, text_len=16)(texts)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(texts), 16)
    np.testing.assert_array_equal(ids, expected.input_ids)
    np.testing.assert_array_equal(mask, expected.attention_mask)
    assert ids[-1, -1] == 1  # truncation keeps the EOS


def test_tokenizer_round_trip_gives_back_the_cleaned_prompt(tokenizer_dirs):
    tokenizer = Tokenizer.from_dir(tokenizer_dirs[0])
    ids, mask = tokenizer(["  A cat &amp;amp; the   quick brown fox\n", "Ein Hund läuft"])
    assert ids.shape == (2, 512)
    assert tokenizer.decode(ids[0], mask[0]) == "A cat & the quick brown fox"
    assert tokenizer.decode(ids[1], mask[1]) == "Ein Hund läuft"


def test_tokenizer_from_dir_without_files_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        Tokenizer.from_dir(tmp_path)
