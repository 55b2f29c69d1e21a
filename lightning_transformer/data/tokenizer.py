"""Joint source/target BPE tokenizer built on Hugging Face ``tokenizers``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Ids are fixed so that masks, losses and checkpoints never depend on training order.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
# Ids 4-259: one token per byte, so a character missing from the vocabulary is spelled as its UTF-8 bytes.
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
NORMALIZATIONS = ("none", "nfkc")


class Tokenizer:
    """Byte-pair encoding shared by both languages, stored as JSON only.

    Lossless by default: ``decode(encode(text)) == text`` for any text, including characters never
    seen in training (spelled as UTF-8 byte tokens) and every space, so hypotheses can be scored
    against raw references. ``normalization="nfkc"`` folds compatibility forms (full-width
    punctuation, ligatures, superscripts) before encoding; then ``decode(encode(text))`` equals
    ``normalize(text)``. Ids 0-3 are always ``<pad>``, ``<s>``, ``</s>``, ``<unk>``.

    Args:
        hf_tokenizer: a trained ``tokenizers.Tokenizer`` with the special tokens at ids 0-3.
    """

    def __init__(self, hf_tokenizer: _HFTokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            actual_id = hf_tokenizer.token_to_id(token)
            if actual_id != expected_id:
                raise ValueError(
                    f"The tokenizer maps {token!r} to id {actual_id}, expected {expected_id}. "
                    "Train it with lightning_transformer.data.tokenizer.Tokenizer.train so special ids are fixed."
                )
        self._tokenizer = hf_tokenizer
        # The normalizer's JSON; tokenizers saved before normalization became an option hold NFKC alone.
        normalizer = hf_tokenizer.normalizer.__getstate__() if hf_tokenizer.normalizer is not None else b""
        self.normalization = "nfkc" if b'"NFKC"' in normalizer else "none"

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None,
        normalization: str = "none",
    ) -> Tokenizer:
        """Learn a BPE vocabulary from raw sentences.

        Args:
            texts: sentences of both languages (one string each).
            vocab_size: largest vocabulary, special and 256 byte tokens included; the result
                may be smaller when the text has fewer distinct merges.
            min_frequency: pairs seen fewer times are never merged.
            length: number of sentences, only used for progress reporting.
            normalization: ``"none"`` (lossless) or ``"nfkc"`` (Unicode compatibility folding).

        Returns:
            The trained tokenizer.
        """
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization={normalization!r} is not supported; use 'none' (lossless, the default) or 'nfkc'."
            )
        reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for text tokens after the {len(SPECIAL_TOKENS)} special "
                f"and {len(BYTE_TOKENS)} byte tokens. Use a vocab_size of {reserved + 256} or more "
                "(8000 or more for real corpora)."
            )
        hf_tokenizer = _pipeline(_HFTokenizer(models.BPE(unk_token=UNK)), normalization)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(BYTE_TOKENS),
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # Rarer characters than fit the budget are left to the byte tokens.
            limit_alphabet=vocab_size - reserved,
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(_non_empty(texts), trainer=trainer, length=length)
        return cls(_with_byte_fallback(hf_tokenizer, normalization))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def normalize(self, text: str) -> str:
        """``text`` as ``decode(encode(text))`` gives it back: itself, or its NFKC form."""
        return normalizers.NFKC().normalize_str(text) if self.normalization == "nfkc" else text

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text`` without ``<s>`` or ``</s>``."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many sentences in parallel; same result as ``encode`` on each."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def with_dropout(self, p: float) -> Tokenizer:
        """A copy that skips each BPE merge with probability ``p`` (BPE-dropout, Provilkov et al., 2020).

        Each call to ``encode`` then segments a word anew, so training sees several spellings of it; the
        text still decodes back exactly. For training only: evaluation and decoding use the plain
        tokenizer. The random numbers are ``tokenizers``' own, which cannot be seeded.
        """
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {p}; 0.1 is the paper's choice.")
        copy = _HFTokenizer.from_str(self.to_str())
        copy.model.dropout = p or None
        return Tokenizer(copy)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: token ids; a 1-D tensor works too.
            skip_special_tokens: drop ``<pad>``, ``<s>``, ``</s>`` and ``<unk>``.

        Returns:
            The detokenised sentence.
        """
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` applied to each sequence of ``batch``."""
        sequences = [[int(i) for i in ids] for ids in batch]
        return self._tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """Serialise to the ``tokenizer.json`` format (a JSON string)."""
        return self._tokenizer.to_str()

    @classmethod
    def from_str(cls, json_text: str) -> Tokenizer:
        """Rebuild a tokenizer from ``to_str`` output."""
        try:
            hf_tokenizer = _HFTokenizer.from_str(json_text)
        except Exception as error:
            raise ValueError(
                f"Could not parse the tokenizer JSON ({error}). Pass the text written by Tokenizer.to_str "
                "or a tokenizer.json saved by Tokenizer.save."
            ) from None
        return cls(hf_tokenizer)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` to ``path``, creating parent folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer file at {path}. Pass the path of a tokenizer.json written by Tokenizer.save, "
                "or leave tokenizer_path unset to train one."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"Could not parse the tokenizer JSON in {path}: it is binary, not UTF-8 text. Pass a tokenizer.json "
                "saved by Tokenizer.save (tokenizers are only read from JSON, never unpickled)."
            ) from None
        return cls.from_str(text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _pipeline(hf_tokenizer: _HFTokenizer, normalization: str) -> _HFTokenizer:
    """Set how text is split into words and joined back, losslessly apart from ``normalization``.

    Words keep their leading plain space as a character, instead of Metaspace's ``▁`` (which would
    turn a literal ``▁`` into a space, and drops leading spaces); one space is prepended so a
    sentence's first word is tokenised like any other, and stripped again by the decoder.
    """
    prepend = normalizers.Prepend(" ")
    nfkc = normalization == "nfkc"
    hf_tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), prepend]) if nfkc else prepend
    hf_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    hf_tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return hf_tokenizer


def _with_byte_fallback(trained: _HFTokenizer, normalization: str) -> _HFTokenizer:
    """``trained`` with the byte tokens at ids 4-259 and its own tokens after them."""
    model = json.loads(trained.to_str())["model"]
    # A learned token spelled like a byte token would decode as that byte, so it is left out.
    learned = [t for t in sorted(model["vocab"], key=model["vocab"].get) if t not in {*SPECIAL_TOKENS, *BYTE_TOKENS}]
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *learned))}
    merges = [(a, b) for a, b in model["merges"] if a in vocab and b in vocab and a + b in vocab]
    hf_tokenizer = _HFTokenizer(models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True))
    hf_tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return _pipeline(hf_tokenizer, normalization)


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
