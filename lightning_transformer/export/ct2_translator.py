"""Translation, sampling and scoring through a CTranslate2 folder written by :func:`~.ct2.export_ct2`.

:meth:`CT2Translator.translate_ids` reproduces :meth:`Seq2SeqTransformer.translate_ids` on top of
CTranslate2's beam search, which steps as ours does: it keeps the ``2K`` best continuations, ends
those EOS within the top ``K``, continues with the ``K`` best others and stops a sentence once
``K`` have ended (with a nonzero ``length_penalty``; at 0 it stops when the best beam ends). The
rest differs, and is bridged here:

- length penalty: CTranslate2 divides by ``L^alpha`` (``L`` counting EOS), not GNMT's
  ``((5 + L) / 6)^alpha``, and only uses it to choose which ``K`` of the ended hypotheses
  (``num_hypotheses <= beam_size``) come back. A negative exponent makes those the earlier ones,
  then the last step's by log-probability, which keeps GNMT's best among them; the ``K`` are
  then re-ranked by GNMT.
- length limit: one ``max_decoding_length`` per batch, at whose step the ``K`` best continuations
  end whatever their token; ours forces EOS at each sentence's limit ``L``. So sentences go in
  groups of equal ``L`` with ``max_decoding_length = L - 1``, and a hypothesis cut there gets EOS
  appended, as ours would, unless ``K`` had ended already. Inexact in one case: when EOS ends some
  of the ``K`` best at step ``L - 1``, ours continues the next-best beams, which CTranslate2 drops.
- pad and BOS: CTranslate2 suppresses them before its softmax (renormalising), ours after, so its
  log-probabilities exceed ours by ``-log(1 - p(pad) - p(BOS))`` a token (about 1e-5 on a trained
  model) and the search may order candidates that close differently. Hypotheses are scored
  again by teacher forcing (:meth:`CT2Translator.score_ids`, nothing suppressed), so their
  log-probabilities equal ours, unless ``exact_scores=False`` (``translate``, text out) takes
  CTranslate2's own, the length normalisation undone; a hypothesis cut at the limit is scored
  again either way, for the EOS ours forces there.

A source with no tokens is not run by CTranslate2: it gets an empty translation, scored 0.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.tokenizer import Tokenizer
from ..generation.decoding import Hypothesis, max_output_lengths
from ..generation.decoding import length_penalty as gnmt_penalty
from .ct2 import DECODING_FILE, FOLDER_FILES, import_ctranslate2, is_ct2_folder


def encode_sources(tokenizer: Tokenizer, sentences: Sequence[str], max_len: int) -> list[list[int]]:
    """Source ids without EOS, cut to ``max_len - 1`` so that with EOS they fit the model; one warning for all."""
    encoded = tokenizer.encode_batch(list(sentences))
    too_long = sum(len(ids) >= max_len for ids in encoded)
    if too_long:
        warnings.warn(f"{too_long} of {len(encoded)} sentences are longer than the model's max_len={max_len} tokens "
                      "(EOS included) and were truncated to it; split them or use a model with a larger max_len.",
                      stacklevel=2)
    return [ids[: max_len - 1] for ids in encoded]


def _selection_exponent(limit: int) -> float:
    """CTranslate2's ``length_penalty`` for a group of length limit ``limit`` (see the module docstring).

    Negative ``-x``: CTranslate2 then ranks ended hypotheses by ``log_prob * L^x``, shorter ones
    first; ``limit^x = 1e25`` keeps that far from float32's overflow.
    """
    return -25.0 / math.log10(max(limit, 2))


class CT2Translator:
    """A CTranslate2 export decoding as its model does, text or ids in, text or hypotheses out.

    Args:
        path: a folder written by :func:`~lightning_transformer.export.ct2.export_ct2`.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        compute_type: CTranslate2 compute type; ``default`` runs the saved weight type.
        intra_threads: CPU threads per translation (0: CTranslate2's default).
        seed: makes :meth:`sample` reproducible. CTranslate2 seeds each worker thread's generator
            once, from its global seed when that thread first samples, so it is set here, before loading.
    """

    def __init__(self, path: str | Path, device: str = "cpu", compute_type: str = "default",
                 intra_threads: int = 0, seed: int | None = None) -> None:
        ctranslate2 = import_ctranslate2()
        path = Path(path)
        if not is_ct2_folder(path):
            raise FileNotFoundError(f"{path} is no CTranslate2 export of this package (one with "
                                    f"{', '.join(FOLDER_FILES)}); write one with `lightning-transformer export CKPT "
                                    "--format ct2 --output DIR`.")
        self.path = path
        if seed is not None:
            ctranslate2.set_random_seed(seed)
        kind, _, index = device.partition(":")
        self.translator = ctranslate2.Translator(str(path), device=kind, device_index=int(index or 0),
                                                 compute_type=compute_type, intra_threads=intra_threads)
        self.tokenizer = Tokenizer.load(path / "tokenizer.json")
        self.settings = json.loads((path / DECODING_FILE).read_text(encoding="utf-8"))
        shared = path / "shared_vocabulary.json"
        source_file, target_file = (shared, shared) if shared.is_file() else (
            path / "source_vocabulary.json", path / "target_vocabulary.json")
        self.source_tokens = json.loads(source_file.read_text(encoding="utf-8"))
        self.target_tokens = json.loads(target_file.read_text(encoding="utf-8"))
        self.target_ids = {token: index for index, token in enumerate(self.target_tokens)}
        never = (self.settings["pad_token_id"], self.settings["bos_token_id"])
        self._suppressed = [[self.target_tokens[index]] for index in never]

    # ----- text in, text out ------------------------------------------------------------------
    def translate(self, sentences: Sequence[str], beam_size: int | None = None, length_penalty: float | None = None,
                  batch_size: int = 64, progress: bool = False) -> list[str]:
        """The best translation of each sentence, in input order; ``None`` arguments take the model's settings."""
        hypotheses = self.translate_ids(self.encode(sentences), beam_size, length_penalty, 1, batch_size, progress,
                                        exact_scores=False)
        return self.tokenizer.decode_batch([hyps[0].tokens for hyps in hypotheses])

    def translate_nbest(self, sentences: Sequence[str], nbest: int, beam_size: int | None = None,
                        length_penalty: float | None = None,
                        batch_size: int = 64) -> list[list[tuple[str, Hypothesis]]]:
        """Each sentence's ``nbest`` best ``(text, hypothesis)``, best first (``nbest <= beam_size``)."""
        hypotheses = self.translate_ids(self.encode(sentences), beam_size, length_penalty, nbest, batch_size)
        return [[(self.tokenizer.decode(hyp.tokens), hyp) for hyp in hyps] for hyps in hypotheses]

    def sample(self, sentences: Sequence[str], temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, batch_size: int = 64) -> list[str]:
        """One sampled translation per sentence (back-translation), within the same length limit.

        ``top_k`` and ``top_p`` (``None``: off) filter the distribution, pad and BOS excluded;
        ``temperature = 0`` is greedy. The constructor's ``seed`` makes it reproducible.
        """
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} keeps no token; use top_k >= 1, or None to disable it.")
        sources = self.encode(sentences)
        outputs: list[list[int]] = [[] for _ in sources]
        for chunk, limit in self._groups(sources, batch_size):
            if limit == 1:
                continue  # only EOS may follow BOS
            results = self.translator.translate_batch(
                [self._source_tokens(sources[i]) for i in chunk], beam_size=1, sampling_topk=top_k or 0,
                sampling_topp=1.0 if top_p is None else top_p, sampling_temperature=temperature,
                **self._limit_options(limit))
            for i, result in zip(chunk, results):
                outputs[i] = self._ids(result.hypotheses[0])
        return self.tokenizer.decode_batch(outputs)

    def score(self, sources: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """Log-probability of each target token and of the closing EOS, teacher-forced on its source."""
        if len(sources) != len(targets):
            raise ValueError(f"got {len(sources)} sources but {len(targets)} targets; pass one target per source.")
        return self.score_ids(self.encode(sources), self.tokenizer.encode_batch(list(targets)), batch_size)

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Source ids (no EOS: the model adds it), cut to fit the model's ``max_len``."""
        return encode_sources(self.tokenizer, sentences, self.settings["max_len"])

    # ----- ids in, hypotheses out -------------------------------------------------------------
    def translate_ids(self, sources: Sequence[Sequence[int]], beam_size: int | None = None,
                      length_penalty: float | None = None, nbest: int = 1, batch_size: int = 64,
                      progress: bool = False, exact_scores: bool = True) -> list[list[Hypothesis]]:
        """Beam search over source ids (without EOS), as :meth:`Seq2SeqTransformer.translate_ids`.

        ``exact_scores`` scores the hypotheses again by teacher forcing, so that log-probabilities
        equal the model's; without it they are CTranslate2's, which renormalise over all tokens but
        pad and BOS (see the module docstring), and the search costs about 2.5x less.

        Returns:
            Each sentence's ``nbest`` :class:`Hypothesis` (tokens without BOS/EOS, GNMT-normalised
            score, log-probability), best first.
        """
        beam = beam_size or self.settings["beam_size"]
        alpha = self.settings["length_penalty"] if length_penalty is None else length_penalty
        if beam < 1 or not 1 <= nbest <= beam:
            raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got {beam} and {nbest}.")
        results: list[list[Hypothesis]] = [[] for _ in sources]
        with tqdm(total=len(sources), disable=not progress, unit="sent", file=sys.stderr) as bar:
            for chunk, limit in self._groups(sources, batch_size):
                hypotheses = self._beam_search([sources[i] for i in chunk], limit, beam, alpha, exact_scores)
                for i, hyps in zip(chunk, hypotheses):
                    results[i] = hyps[:nbest]
                bar.update(len(chunk))
        return results

    def score_ids(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                  batch_size: int = 64) -> list[list[float]]:
        """Per-token log-probabilities of ``targets`` (ids without BOS/EOS; EOS's comes last) given ``sources``.

        ``batch_size`` pairs are scored together; 0 scores all at once.
        """
        max_len = self.settings["max_len"]
        if any(len(ids) >= max_len for ids in (*sources, *targets)):
            raise ValueError(f"a source or target has {max_len} or more tokens, beyond the model's max_len={max_len} "
                             "with EOS; cut it shorter.")
        results = self.translator.score_batch(
            [self._source_tokens(ids) for ids in sources], [[self.target_tokens[i] for i in ids] for ids in targets],
            max_batch_size=batch_size, max_input_length=0)
        return [list(result.log_probs) for result in results]

    # ----- helpers ----------------------------------------------------------------------------
    def _beam_search(self, sources: list[Sequence[int]], limit: int, beam: int, alpha: float,
                     exact_scores: bool) -> list[list[Hypothesis]]:
        """Hypotheses of sources that share the limit ``limit``, best first by GNMT score."""
        eos = self.settings["eos_token_id"]
        found: list[list[tuple[list[int], float | None]]] = [[([], None)] for _ in sources]  # limit 1: only EOS
        if limit > 1:
            exponent = _selection_exponent(limit)
            results = self.translator.translate_batch(
                [self._source_tokens(ids) for ids in sources], beam_size=beam, num_hypotheses=beam,
                length_penalty=exponent, return_end_token=True, return_scores=True, **self._limit_options(limit))
            found = []
            for result in results:
                hyps = [self._ids(tokens) for tokens in result.hypotheses]
                # CTranslate2 returns log_prob / L^exponent, L counting EOS: undone, it is the log-probability.
                ended = [(hyp[:-1], None if exact_scores else score * len(hyp) ** exponent)
                         for hyp, score in zip(hyps, result.scores) if hyp and hyp[-1] == eos]
                # Cut at the limit: ours appends EOS there, unless K hypotheses ended at that same step.
                cut = [(hyp, None) for hyp in hyps if not hyp or hyp[-1] != eos]
                found.append(ended if len(ended) >= beam else ended + cut)
        # Scored by teacher forcing: every hypothesis for exact scores, else those cut at the limit, for the
        # EOS ours forces there.
        pending = [(i, k) for i, hyps in enumerate(found) if sources[i] for k, (_, lp) in enumerate(hyps) if lp is None]
        rescored = self.score_ids([sources[i] for i, _ in pending], [found[i][k][0] for i, k in pending], batch_size=0)
        for (i, k), token_log_probs in zip(pending, rescored):
            found[i][k] = (found[i][k][0], sum(token_log_probs))
        hypotheses = []
        for ids, hyps in zip(sources, found):
            if not ids:  # never run by CTranslate2
                hypotheses.append([Hypothesis([], 0.0, 0.0)])
                continue
            hypotheses.append(sorted((Hypothesis(hyp, lp / gnmt_penalty(len(hyp) + 1, alpha), lp) for hyp, lp in hyps),
                                     key=lambda h: h.score, reverse=True))
        return hypotheses

    def _limit_options(self, limit: int) -> dict:
        """``translate_batch`` options for a group whose sentences may emit ``limit`` tokens, EOS included."""
        return {"max_decoding_length": limit - 1, "min_decoding_length": 0, "max_input_length": 0,
                "suppress_sequences": self._suppressed}

    def _groups(self, sources: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[list[int], int]]:
        """Batches of source indices, by length, each of one length limit, with that limit."""
        if not sources:
            return
        settings = self.settings
        lengths = torch.tensor([len(ids) + 1 for ids in sources])  # + EOS
        # max_output_lengths counts the non-pad positions of a padded batch; a 0/1 mask of the lengths is one.
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        limits = max_output_lengths(mask, 0, settings["max_decode_len_a"], settings["max_decode_len_b"],
                                    settings["max_len"]).tolist()
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        for limit, group in itertools.groupby(order, key=lambda i: limits[i]):
            group = list(group)
            for start in range(0, len(group), batch_size):
                yield group[start : start + batch_size], limit

    def _source_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.source_tokens[i] for i in ids]

    def _ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.target_ids[token] for token in tokens]
