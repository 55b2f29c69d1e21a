"""Joint source/target BPE tokenizer built on Hugging Face ``tokenizers``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Ids are fixed so that masks, losses and checkpoints never depend on training order.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))


class Tokenizer:
    """Byte-pair encoding shared by both languages, stored as JSON only.

    Text is NFKC-normalised and split on spaces with the Metaspace scheme, so
    ``decode(encode(text))`` gives back the normalised text, which is what
    sacreBLEU must score. Ids 0-3 are always ``<pad>``, ``<s>``, ``</s>``, ``<unk>``.

    Args:
        hf_tokenizer: a trained ``tokenizers.Tokenizer`` with the special tokens at ids 0-3.
    """

    def __init__(self, hf_tokenizer: _HFTokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            actual_id = hf_tokenizer.token_to_id(token)
            if actual_id != expected_id:
                raise ValueError(
                    f"The tokenizer maps {token!r} to id {actual_id}, expected {expected_id}. "
                    "Train it with lightning_transformer.tokenizer.Tokenizer.train so special ids are fixed."
                )
        self._tokenizer = hf_tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None
    ) -> Tokenizer:
        """Learn a BPE vocabulary from raw sentences.

        Args:
            texts: sentences of both languages (one string each).
            vocab_size: largest vocabulary, special tokens included; the result
                may be smaller when the text has fewer distinct merges.
            min_frequency: pairs seen fewer times are never merged.
            length: number of sentences, only used for progress reporting.

        Returns:
            The trained tokenizer.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for text tokens after the {len(SPECIAL_TOKENS)} "
                "special tokens. Use a vocab_size of a few hundred or more."
            )
        hf_tokenizer = _HFTokenizer(models.BPE(unk_token=UNK))
        hf_tokenizer.normalizer = normalizers.NFKC()
        hf_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        hf_tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(_non_empty(texts), trainer=trainer, length=length)
        return cls(hf_tokenizer)

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

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text`` without ``<s>`` or ``</s>``."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many sentences in parallel; same result as ``encode`` on each."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

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


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
