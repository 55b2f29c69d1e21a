"""A trained :class:`Seq2SeqTransformer` as a CTranslate2 model folder, weight by weight.

CTranslate2's ``TransformerSpec`` runs the same network once three conventions are written down
instead of left to its defaults:

- positions: its built-in table is ``[sin | cos]`` concatenated, with the tensor2tensor timescales
  and positions counted from 1; ours is the paper's, interleaved and from 0, so the table is
  stored explicitly (``position_encodings.encodings``, row ``t`` for position ``t``);
- the embedding scale ``sqrt(d_model)`` and the LayerNorm epsilon are stored as values;
- post-norm (the paper) or pre-norm with a final LayerNorm, as the model was built.

The folder also holds ``tokenizer.json`` and ``decoding.json`` (beam size, length penalty, length
limit, special ids), which :class:`~lightning_transformer.export.ct2_translator.CT2Translator`
reads to decode as :meth:`Seq2SeqTransformer.translate_ids` does.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ..data.tokenizer import Tokenizer
from ..modules.seq2seq import Seq2SeqTransformer

DECODING_FILE = "decoding.json"
#: What a CTranslate2 export folder of this package holds; :func:`is_ct2_folder` checks for it.
FOLDER_FILES = ("model.bin", "config.json", "tokenizer.json", DECODING_FILE)
#: CTranslate2's weight types (``ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES``).
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
# The hooks CTranslate2 cannot run: a subclass overriding one would export as a different model.
_FIXED_HOOKS = ("make_masks", "encode", "decode_states", "decode", "project", "translate_ids")


def import_ctranslate2():
    """The ``ctranslate2`` module, imported on first use since it is an optional extra."""
    try:
        import ctranslate2
    except ImportError:
        raise ImportError(
            "ctranslate2 is not installed; install it with `pip install lightning-transformer[ct2]`."
        ) from None
    return ctranslate2


def is_ct2_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_ct2`."""
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in FOLDER_FILES)


def export_ct2(model: Seq2SeqTransformer, tokenizer: Tokenizer, output: str | Path,
               quantization: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a CTranslate2 model folder at ``output``; returns its path.

    Args:
        model: the trained model (any device; its weights are copied to the CPU).
        tokenizer: the model's tokenizer; its token strings become the CTranslate2 vocabulary, so
            CTranslate2 index ``i`` is our id ``i``.
        output: a folder that does not exist yet, or is empty; an export never overwrites.
        quantization: CTranslate2 weight type (``int8``, ``int8_float32``, ``float16``,
            ``bfloat16``, ...); ``None`` keeps float32.
    """
    ctranslate2 = import_ctranslate2()
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty folder; choose a new output folder, "
                              "an export never overwrites.")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    _check_exportable(model)
    spec = _transformer_spec(ctranslate2.specs, model, tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    # Written beside the target and renamed into place, so a failed export leaves no half folder.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        spec.save(str(staging))
        tokenizer.save(staging / "tokenizer.json")
        (staging / DECODING_FILE).write_text(json.dumps(_decoding_settings(model), indent=2) + "\n", encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above; renaming onto a folder fails on some systems
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _check_exportable(model: Seq2SeqTransformer) -> None:
    overridden = [name for name in _FIXED_HOOKS if getattr(type(model), name) is not getattr(Seq2SeqTransformer, name)]
    if overridden:
        raise ValueError(f"{type(model).__qualname__} overrides {', '.join(overridden)}, which CTranslate2 cannot "
                         "run; export a plain Seq2SeqTransformer (or translate this one with its checkpoint).")


def _decoding_settings(model: Seq2SeqTransformer) -> dict:
    """The hyperparameters :meth:`Seq2SeqTransformer.translate_ids` decodes with."""
    names = ("beam_size", "length_penalty", "max_decode_len_a", "max_decode_len_b", "max_len",
             "pad_token_id", "bos_token_id", "eos_token_id")
    return {name: model.hparams[name] for name in names}


def _vocabulary(tokenizer: Tokenizer, size: int) -> list[str]:
    """Token string of each id ``0 .. size - 1``; ids the tokenizer lacks get unique placeholders."""
    state = json.loads(tokenizer.to_str())
    by_id = {index: token for token, index in state["model"]["vocab"].items()}
    by_id.update({added["id"]: added["content"] for added in state["added_tokens"]})
    tokens = [by_id.get(index, f"<unused_{index}>") for index in range(size)]
    if len(set(tokens)) != size:
        raise ValueError("the tokenizer maps two ids to one token string; retrain it with Tokenizer.train.")
    return tokens


def _transformer_spec(specs, model: Seq2SeqTransformer, tokenizer: Tokenizer):
    """``TransformerSpec`` with every weight of ``model.transformer`` set (``specs``: ``ctranslate2.specs``)."""
    network, hp = model.transformer, model.hparams
    first_layer = network.encoder_layers[0]
    spec = specs.TransformerSpec.from_config(
        (len(network.encoder_layers), len(network.decoder_layers)),
        first_layer.self_attn.nhead,
        pre_norm=first_layer.attn_block.norm_first,
        no_final_norm=not isinstance(network.encoder_norm, nn.LayerNorm),
        activation=specs.Activation.RELU,
    )
    _set_embeddings(spec.encoder, network.src_embed, [spec.encoder.embeddings[0]])
    _set_embeddings(spec.decoder, network.tgt_embed, [spec.decoder.embeddings])
    for layer_spec, layer in zip(spec.encoder.layer, network.encoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.attn_block.norm)
        _set_feed_forward(layer_spec.ffn, layer.feed_forward, layer.ff_block.norm)
    for layer_spec, layer in zip(spec.decoder.layer, network.decoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.self_block.norm)
        _set_attention(layer_spec.attention, layer.cross_attn, layer.cross_block.norm)
        _set_feed_forward(layer_spec.ffn, layer.feed_forward, layer.ff_block.norm)
    if isinstance(network.encoder_norm, nn.LayerNorm):
        _set_layer_norm(spec.encoder.layer_norm, network.encoder_norm)
        _set_layer_norm(spec.decoder.layer_norm, network.decoder_norm)
    _set_linear(spec.decoder.projection, network.generator)  # tied: CTranslate2 aliases equal weights on save

    vocabulary = _vocabulary(tokenizer, network.src_embed.token.num_embeddings)
    target_vocabulary = _vocabulary(tokenizer, network.tgt_embed.token.num_embeddings)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(target_vocabulary)
    config = spec.config
    config.unk_token = target_vocabulary[tokenizer.unk_id]
    config.bos_token = config.decoder_start_token = target_vocabulary[hp.bos_token_id]
    config.eos_token = target_vocabulary[hp.eos_token_id]
    config.add_source_eos = True  # the encoder reads ids + EOS, no BOS, as in training
    config.layer_norm_epsilon = first_layer.attn_block.norm.eps
    return spec


def _numpy(tensor):
    # A copy: CTranslate2's int8 quantization rewrites the arrays in place, which would corrupt the model.
    return tensor.detach().to("cpu", torch.float32, copy=True).numpy()


def _set_embeddings(stack_spec, embeddings, table_specs) -> None:
    for table_spec in table_specs:
        table_spec.weight = _numpy(embeddings.token.weight)
    stack_spec.scale_embeddings = embeddings.scale
    stack_spec.position_encodings.encodings = _numpy(embeddings.positions)


def _set_attention(spec, attention, norm: nn.LayerNorm) -> None:
    # CTranslate2 fuses projections as we do: self-attention [q; k; v], cross-attention q then [k; v].
    projections = [attention.q_proj, attention.kv_proj] if attention.cross else [attention.qkv_proj]
    for linear_spec, linear in zip(spec.linear, [*projections, attention.out_proj], strict=True):
        _set_linear(linear_spec, linear)
    _set_layer_norm(spec.layer_norm, norm)


def _set_feed_forward(spec, feed_forward, norm: nn.LayerNorm) -> None:
    _set_linear(spec.linear_0, feed_forward.linear1)
    _set_linear(spec.linear_1, feed_forward.linear2)
    _set_layer_norm(spec.layer_norm, norm)


def _set_linear(spec, linear: nn.Linear) -> None:
    spec.weight = _numpy(linear.weight)
    if linear.bias is not None:
        spec.bias = _numpy(linear.bias)


def _set_layer_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma = _numpy(norm.weight)
    spec.beta = _numpy(norm.bias)
