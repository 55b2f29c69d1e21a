"""A trained :class:`Seq2SeqTransformer` as a Hugging Face ``MarianMTModel`` folder.

``MarianMTModel.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` then load it
offline. The conventions mapped:

- Positions: HF Marian's sinusoids are not interleaved (every ``sin`` channel, then every ``cos``),
  ours are (``sin`` on even channels, ``cos`` on odd). Instead of changing the table, the residual
  stream's channels are permuted, HF channel ``h`` being ours ``PERM[h]`` with
  ``PERM = [0, 2, 4, ..., 1, 3, 5, ...]``: embeddings, LayerNorms and the outputs of ``out_proj`` and
  ``fc2`` are permuted, and so are the inputs of q/k/v, ``fc1`` and ``lm_head``. Every operation is
  equivariant to that permutation (LayerNorm statistics ignore channel order) and the per-head q/k/v
  channels stay as they are, so the logits agree to float rounding.
- Fused projections are split: ``qkv_proj`` into q, k, v; cross-attention ``kv_proj`` into k, v.
- Ids stay as trained (pad 0, BOS 1, EOS 2); the decoder starts from BOS (``decoder_start_token_id``),
  not from pad as in Helsinki-NLP's Marian models, whose pad is the last id; ``final_logits_bias`` is zero.
- Tokenizer: encoding appends ``</s>``, as our encoder input; decoding skips special tokens.
- Generation never emits pad or BOS (``suppress_tokens``), as our decoders; EOS is forced at
  ``max_length``, which counts the start token, so ``max_len + 1`` lets ``max_len`` tokens out; a
  beam search stops once ``num_beams`` hypotheses have finished (``early_stopping=True``), as ours.
- Length penalty: HF beam search ranks by ``log_prob / L^alpha`` (``L`` = generated tokens with EOS,
  as ours); our default is GNMT's ``((5 + L) / 6)^alpha`` (``beam_search(penalty_style="power")`` is
  HF's). HF's forced EOS also scores 0 where ours adds its log-probability, and HF has no per-sentence
  length limit (``max_decode_len_a * S + b``), so beams reaching a limit can differ.
- Pre-norm (``norm_first=True``) models are refused: Marian layers are post-norm only.

CTranslate2's own Marian converter assumes Helsinki-NLP's conventions (pad last, dropped; the decoder
started from a zero embedding) and refuses this export (ctranslate2 4.8: a vocabulary size mismatch);
use :mod:`.ct2` for CTranslate2.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer
from ..modules.seq2seq import Seq2SeqTransformer
from ..nn.layers import MultiHeadAttention

# Hooks whose override changes what the network computes, which the exported weights cannot carry.
_COMPUTING_HOOKS = ("make_masks", "encode", "decode_states", "decode", "project")


def export_hf(model: Seq2SeqTransformer, tokenizer: Tokenizer, output: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` to a new folder ``output`` as a ``MarianMTModel``; return it.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
    ``tokenizer.json`` and ``tokenizer_config.json``.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(
            f"{output} exists and is not empty; choose a new output folder (exports never overwrite).")
    _check_exportable(model)
    transformers = _import_transformers()
    marian = transformers.MarianMTModel(_marian_config(transformers, model))
    expected = marian.state_dict()
    weights = _marian_weights(model.transformer)
    own = {name for name in expected if "embed_positions" in name} | {"final_logits_bias"}  # HF's table, zero bias
    unmapped = sorted(expected.keys() - weights.keys() - own)
    if unmapped or weights.keys() - expected.keys():
        raise RuntimeError(f"transformers {transformers.__version__} names Marian weights differently (unmapped: "
                           f"{unmapped}); export with transformers 5.24 (tested) or update {__name__}.")
    marian.load_state_dict({**expected, **weights})
    marian.generation_config = _generation_config(transformers, model)
    output.mkdir(parents=True, exist_ok=True)
    marian.save_pretrained(output)
    _hf_tokenizer(transformers, tokenizer, model.hparams.max_len).save_pretrained(output)
    _name_tokenizer_class(output / "tokenizer_config.json")
    return output


def _import_transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError("exporting to Hugging Face needs transformers and safetensors; "
                          "run `pip install lightning-transformer[hf]`.") from None


def _check_exportable(model: Seq2SeqTransformer) -> None:
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"export_hf exports a Seq2SeqTransformer, got {type(model).__name__}.")
    if model.hparams.norm_first:
        raise ValueError("this model is pre-norm (norm_first=True) but Hugging Face Marian layers are post-norm only; "
                         "export it to CTranslate2 instead (lightning_transformer.export.ct2).")
    changed = [hook for hook in _COMPUTING_HOOKS if getattr(type(model), hook) is not getattr(Seq2SeqTransformer, hook)]
    if changed:
        raise ValueError(f"{type(model).__name__} overrides {changed}, which a Marian export cannot reproduce; "
                         "only a plain Seq2SeqTransformer's computation maps onto MarianMTModel.")


def _marian_config(transformers, model: Seq2SeqTransformer):
    """A ``MarianConfig`` of ``model``'s architecture, ids and dropouts (for fine-tuning in HF)."""
    hp, net = model.hparams, model.transformer
    return transformers.MarianConfig(
        vocab_size=net.src_embed.token.num_embeddings, decoder_vocab_size=net.tgt_embed.token.num_embeddings,
        d_model=hp.d_model, encoder_layers=hp.num_encoder_layers, decoder_layers=hp.num_decoder_layers,
        encoder_attention_heads=hp.nhead, decoder_attention_heads=hp.nhead,
        encoder_ffn_dim=hp.dim_feedforward, decoder_ffn_dim=hp.dim_feedforward, activation_function="relu",
        dropout=hp.dropout, attention_dropout=hp.attention_dropout, activation_dropout=hp.activation_dropout,
        max_position_embeddings=hp.max_len, scale_embedding=True, normalize_embedding=False,
        pad_token_id=hp.pad_token_id, bos_token_id=hp.bos_token_id, eos_token_id=hp.eos_token_id,
        decoder_start_token_id=hp.bos_token_id, forced_eos_token_id=hp.eos_token_id,
        share_encoder_decoder_embeddings=net.src_embed.token is net.tgt_embed.token,
        tie_word_embeddings=net.generator.weight is net.tgt_embed.token.weight,
    )


def _generation_config(transformers, model: Seq2SeqTransformer):
    """Beam size and length penalty of ``model``; pad and BOS never generated, EOS forced at the end."""
    hp = model.hparams
    return transformers.GenerationConfig(
        num_beams=hp.beam_size, length_penalty=hp.length_penalty, early_stopping=True, max_length=hp.max_len + 1,
        suppress_tokens=[hp.pad_token_id, hp.bos_token_id], forced_eos_token_id=hp.eos_token_id,
        pad_token_id=hp.pad_token_id, bos_token_id=hp.bos_token_id, eos_token_id=hp.eos_token_id,
        decoder_start_token_id=hp.bos_token_id,
    )


def _interleaved_to_halves(d_model: int) -> Tensor:
    """``PERM`` ``(d_model,)``: HF Marian channel ``h`` is our channel ``PERM[h]`` (evens, then odds)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def _marian_weights(net: nn.Module) -> dict[str, Tensor]:
    """Our :class:`~lightning_transformer.nn.transformer.Transformer`'s weights under HF Marian names, permuted."""
    perm = _interleaved_to_halves(net.src_embed.token.embedding_dim)
    weights = {
        "model.encoder.embed_tokens.weight": net.src_embed.token.weight[:, perm],
        "model.decoder.embed_tokens.weight": net.tgt_embed.token.weight[:, perm],
        "lm_head.weight": net.generator.weight[:, perm],
    }
    if net.src_embed.token is net.tgt_embed.token:
        weights["model.shared.weight"] = weights["model.decoder.embed_tokens.weight"]
    for i, layer in enumerate(net.encoder_layers):
        prefix = f"model.encoder.layers.{i}"
        weights |= _attention(f"{prefix}.self_attn", layer.self_attn, perm)
        weights |= _layer_norm(f"{prefix}.self_attn_layer_norm", layer.attn_block.norm, perm)
        weights |= _feed_forward(prefix, layer.feed_forward, perm)
        weights |= _layer_norm(f"{prefix}.final_layer_norm", layer.ff_block.norm, perm)
    for i, layer in enumerate(net.decoder_layers):
        prefix = f"model.decoder.layers.{i}"
        weights |= _attention(f"{prefix}.self_attn", layer.self_attn, perm)
        weights |= _layer_norm(f"{prefix}.self_attn_layer_norm", layer.self_block.norm, perm)
        weights |= _attention(f"{prefix}.encoder_attn", layer.cross_attn, perm)
        weights |= _layer_norm(f"{prefix}.encoder_attn_layer_norm", layer.cross_block.norm, perm)
        weights |= _feed_forward(prefix, layer.feed_forward, perm)
        weights |= _layer_norm(f"{prefix}.final_layer_norm", layer.ff_block.norm, perm)
    return {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in weights.items()}


def _reading(name: str, weight: Tensor, bias: Tensor, perm: Tensor) -> dict[str, Tensor]:
    """A linear layer reading the residual stream: its input columns follow the permutation."""
    return {f"{name}.weight": weight[:, perm], f"{name}.bias": bias}


def _writing(name: str, linear: nn.Linear, perm: Tensor) -> dict[str, Tensor]:
    """A linear layer writing the residual stream: its output rows and bias follow the permutation."""
    return {f"{name}.weight": linear.weight[perm], f"{name}.bias": linear.bias[perm]}


def _attention(name: str, attention: MultiHeadAttention, perm: Tensor) -> dict[str, Tensor]:
    """Fused ``qkv_proj`` (or ``q_proj`` + ``kv_proj``) as Marian's separate q, k, v and ``out_proj``."""
    if attention.cross:
        projections = (attention.q_proj.weight, *attention.kv_proj.weight.chunk(2))
        biases = (attention.q_proj.bias, *attention.kv_proj.bias.chunk(2))
    else:
        projections, biases = attention.qkv_proj.weight.chunk(3), attention.qkv_proj.bias.chunk(3)
    weights = _writing(f"{name}.out_proj", attention.out_proj, perm)
    for part, weight, bias in zip("qkv", projections, biases):
        weights |= _reading(f"{name}.{part}_proj", weight, bias, perm)
    return weights


def _feed_forward(prefix: str, feed_forward: nn.Module, perm: Tensor) -> dict[str, Tensor]:
    linear1 = feed_forward.linear1
    return (_reading(f"{prefix}.fc1", linear1.weight, linear1.bias, perm)
            | _writing(f"{prefix}.fc2", feed_forward.linear2, perm))


def _layer_norm(name: str, norm: nn.LayerNorm, perm: Tensor) -> dict[str, Tensor]:
    return {f"{name}.weight": norm.weight[perm], f"{name}.bias": norm.bias[perm]}


def _hf_tokenizer(transformers, tokenizer: Tokenizer, max_len: int):
    """``tokenizer`` as a ``PreTrainedTokenizerFast`` that appends ``</s>`` to every encoded text."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    rust = RustTokenizer.from_str(tokenizer.to_str())
    rust.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A $B:1 {EOS}:1", special_tokens=[(EOS, tokenizer.eos_id)])
    # clean_up_tokenization_spaces off: HF's clean-up would join " ." and " 's", breaking the lossless round trip.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=rust, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=max_len, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids, which Marian's generate refuses
    )


def _name_tokenizer_class(config_path: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load (5 writes its
    new alias ``TokenizersBackend``, unknown to 4)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
