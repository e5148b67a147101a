"""The umT5 text encoder as Wan2.1 uses it (umt5-xxl, encoder only, bf16), in Flax NNX, and its tokenizer.

Wan2.1 (wan/modules/t5.py) tokenizes a prompt to 512 ids (EOS appended, zero-padded), runs
the encoder with the padding masked out of attention, keeps the prompt's tokens and the DiT
zero-pads them back to 512: `UMT5Encoder` returns that directly, [B, 512, 4096] with zeros
beyond each prompt. umT5 differs from T5 in giving every layer its own relative position bias.
The network is T5's: pre-RMS-norm blocks, attention without 1/sqrt(d) scaling, gated-GELU
(tanh approximation) feed-forward. Parameter names follow the original (blocks.n.attn.q,
ffn.gate/fc1/fc2, pos_embedding) with Flax leaves (kernel [in, out], embedding, scale).
"""

import dataclasses
import functools
import html
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from radial_jax.sharding import LogicalAxes, param, with_axes

TEXT_LEN = 512  # tokens per prompt in Wan2.1 (wan/configs/shared_config.py, text_len)


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder hyper-parameters (Wan's umt5_xxl); dtype is params and compute."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # num_heads * head_dim
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative position buckets, half per direction
    max_distance: int = 128  # tokens; farther positions share the last bucket
    eps: float = 1e-6
    dtype: str = "bfloat16"  # Wan runs its text encoder in bf16 (t5_dtype)

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn={self.dim_attn} must be a multiple of num_heads={self.num_heads}")


UMT5_XXL = UMT5Config()
UMT5_TINY = UMT5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, dtype="float32")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Returns int32 [length, length]: the bidirectional T5 bucket of key j seen from query i.

    Computed in float32 like the PyTorch original, so bucket edges (log-spaced, truncated to
    integers) fall exactly where its do.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # max(., 1): the original takes log(0) where distance is 0 and discards it in the where.
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMS norm without centering or bias: x / rms(x) * scale, the statistic in float32."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = param(jnp.ones((dim,), dtype), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normalized = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normalized.astype(x.dtype) * self.scale[...]


def _linear(in_dim: int, out_dim: int, std: float, dtype, rngs: nnx.Rngs, axes: LogicalAxes) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, use_bias=False, dtype=dtype, param_dtype=dtype,
                      kernel_init=with_axes(nnx.initializers.normal(std), axes), rngs=rngs)  # fmt: skip


class T5Attention(nnx.Module):
    """Multi-head self-attention with an additive position bias and a key padding mask."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        dtype, c = jnp.dtype(config.dtype), config
        # Wan's init_weights std's, so a random tiny encoder has the original's scale.
        self.q = _linear(c.dim, c.dim_attn, (c.dim * c.dim_attn) ** -0.5, dtype, rngs, ("embed", "heads"))
        self.k = _linear(c.dim, c.dim_attn, c.dim**-0.5, dtype, rngs, ("embed", "heads"))
        self.v = _linear(c.dim, c.dim_attn, c.dim**-0.5, dtype, rngs, ("embed", "heads"))
        self.o = _linear(c.dim_attn, c.dim, c.dim_attn**-0.5, dtype, rngs, ("heads", "embed"))
        self.num_heads = c.num_heads

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, C]; bias: [N, T, T] in x's dtype; mask: bool [B, T] (keys kept)."""
        b, t, _ = x.shape
        q, k, v = (proj(x).reshape(b, t, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) + bias  # T5: no 1/sqrt(head_dim)
        logits = jnp.where(mask[:, None, None, :], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        return self.o(jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, t, -1))


class T5FeedForward(nnx.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))) (HF: wi_1, wi_0, wo)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        dtype, c = jnp.dtype(config.dtype), config
        self.gate = _linear(c.dim, c.dim_ffn, c.dim**-0.5, dtype, rngs, ("embed", "mlp"))
        self.fc1 = _linear(c.dim, c.dim_ffn, c.dim**-0.5, dtype, rngs, ("embed", "mlp"))
        self.fc2 = _linear(c.dim_ffn, c.dim, c.dim_ffn**-0.5, dtype, rngs, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class T5Block(nnx.Module):
    """x + attn(norm1(x)) then x + ffn(norm2(x)); its own relative position bias table (umT5)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.norm1 = T5LayerNorm(config.dim, eps=config.eps, dtype=dtype)
        self.attn = T5Attention(config, rngs=rngs)
        self.norm2 = T5LayerNorm(config.dim, eps=config.eps, dtype=dtype)
        self.ffn = T5FeedForward(config, rngs=rngs)
        bias_std = (2 * config.num_buckets * config.num_heads) ** -0.5
        self.pos_embedding = nnx.Embed(config.num_buckets, config.num_heads, dtype=dtype, param_dtype=dtype,
                                       embedding_init=with_axes(nnx.initializers.normal(bias_std), (None, "heads")),
                                       rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array, buckets: np.ndarray, mask: jax.Array) -> jax.Array:
        bias = jnp.transpose(self.pos_embedding(buckets), (2, 0, 1))  # [T, T, N] -> [N, T, T]
        x = x + self.attn(self.norm1(x), bias, mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    """Token ids [B, T] and mask -> text context [B, T, dim] (zeros where mask is 0)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.token_embedding = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, param_dtype=dtype,
                                         embedding_init=with_axes(nnx.initializers.normal(1.0), ("vocab", "embed")),
                                         rngs=rngs)  # fmt: skip
        self.blocks = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = T5LayerNorm(config.dim, eps=config.eps, dtype=dtype)

    def __call__(self, ids: Int[Array, "B T"], mask: Int[Array, "B T"]) -> Float[Array, "B T C"]:
        """ids: int [B, T]; mask: [B, T], nonzero on the prompt's tokens (EOS included)."""
        keep = mask.astype(bool)
        c = self.config
        buckets = relative_position_buckets(ids.shape[1], c.num_buckets, c.max_distance)  # static
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x) * keep[..., None].astype(x.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def encode_text(
    encoder: UMT5Encoder, ids: Int[Array | np.ndarray, "B T"], mask: Int[Array | np.ndarray, "B T"]
) -> Float[Array, "B T C"]:
    """Returns the jitted encoder's context [B, T, dim] in its dtype (one compile per shape)."""
    graphdef, state = nnx.split(encoder)
    return _encode(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


def clean_prompt(text: str) -> str:
    """Returns the prompt cleaned as Wan does ('whitespace'): ftfy when installed, HTML unescaped
    twice, whitespace runs collapsed to one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake and quote styles; plain prompts pass unchanged
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class Tokenizer:
    """Prompts -> (ids, mask), int32 [B, text_len]: cleaned, tokenized, truncated to leave room for
    EOS, EOS appended, zero-padded; as Wan's HuggingfaceTokenizer(clean='whitespace')."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], *,
                 eos_id: int, pad_id: int = 0, text_len: int = TEXT_LEN):  # fmt: skip
        self._encode, self._decode = encode, decode
        self.eos_id, self.pad_id, self.text_len = eos_id, pad_id, text_len

    @classmethod
    def from_dir(cls, folder: str | Path, text_len: int = TEXT_LEN) -> "Tokenizer":
        """Returns the tokenizer in `folder`: tokenizer.json (needs `tokenizers`) or spiece.model
        (needs `sentencepiece`), e.g. Wan2.1's google/umt5-xxl/ or a diffusers tokenizer/ folder."""
        folder = Path(folder)
        errors = []
        if (folder / "tokenizer.json").is_file():
            try:
                return cls._from_tokenizer_json(folder / "tokenizer.json", text_len)
            except ImportError:
                errors.append("tokenizer.json needs `pip install tokenizers`")
        if (folder / "spiece.model").is_file():
            try:
                return cls._from_sentencepiece(folder / "spiece.model", text_len)
            except ImportError:
                errors.append("spiece.model needs `pip install sentencepiece`")
        found = "; ".join(errors) or "neither tokenizer.json nor spiece.model is there"
        raise FileNotFoundError(f"no usable umT5 tokenizer in {folder}: {found}")

    @classmethod
    def _from_tokenizer_json(cls, path: Path, text_len: int) -> "Tokenizer":
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.no_truncation()
        eos_id, pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
        if eos_id is None:
            raise ValueError(f"{path}: no </s> token; not a T5 tokenizer")
        return cls(
            lambda text: tok.encode(text, add_special_tokens=False).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            eos_id=eos_id, pad_id=0 if pad_id is None else pad_id, text_len=text_len,
        )  # fmt: skip

    @classmethod
    def _from_sentencepiece(cls, path: Path, text_len: int) -> "Tokenizer":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if sp.eos_id() < 0:
            raise ValueError(f"{path}: the sentencepiece model defines no EOS; not a T5 tokenizer")
        pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0
        return cls(lambda text: sp.encode(text, out_type=int), sp.decode, eos_id=sp.eos_id(), pad_id=pad_id,
                   text_len=text_len)  # fmt: skip

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids, mask), int32 numpy [len(texts), text_len]; mask is 1 on tokens and EOS."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), self.text_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.text_len), np.int32)
        for row, text in enumerate(texts):
            tokens = self._encode(clean_prompt(text))[: self.text_len - 1] + [self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> str:
        """Returns the text of one row of ids (tokens where mask is 1, EOS and padding dropped)."""
        ids = [int(i) for i, keep in zip(ids, mask if mask is not None else [1] * len(ids)) if keep]
        return self._decode([i for i in ids if i not in (self.eos_id, self.pad_id)])

