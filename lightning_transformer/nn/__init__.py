"""Pure-torch building blocks, usable without Lightning: masks, attention and layers, the encoder-decoder and
decoder-only networks."""

from .causal import CausalTransformer
from .layers import DecoderLayer, Embeddings, EncoderLayer, FeedForward, MultiHeadAttention, sinusoidal_positions
from .masks import create_causal_mask, create_combined_mask, create_padding_mask
from .transformer import Transformer

__all__ = [
    "CausalTransformer", "DecoderLayer", "Embeddings", "EncoderLayer", "FeedForward", "MultiHeadAttention",
    "Transformer",
    "create_causal_mask", "create_combined_mask", "create_padding_mask", "sinusoidal_positions",
]
