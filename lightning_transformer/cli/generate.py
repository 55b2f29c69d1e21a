"""``lightning-transformer generate``: prompts in, continuations out, from a language-model checkpoint alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data.tokenizer import Tokenizer
from ..modules.causal_lm import CausalLMTransformer
from . import io
from .loading import load_model


def continue_prompts(model: CausalLMTransformer, tokenizer: Tokenizer, prompts: Sequence[str], batch_size: int = 64,
                     generator: torch.Generator | None = None, **sampling) -> list[str]:
    """Each prompt's continuation as text (prompt excluded), in input order.

    Every prompt starts with ``<s>``, as the training lines did; ``sampling`` holds
    :meth:`CausalLMTransformer.generate`'s ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``beam_size`` and ``length_penalty``.
    """
    encoded = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(list(prompts))]
    outputs = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids = pad_sequence([torch.tensor(row) for row in chunk], batch_first=True, padding_value=tokenizer.pad_id)
        generated = model.generate(ids.to(model.device), generator=generator, **sampling)
        # generate packs each prompt to the front, so its continuation starts at the prompt's length.
        outputs += tokenizer.decode_batch([row[len(prompt):].tolist() for prompt, row in zip(chunk, generated)])
    return outputs


def main(argv: Sequence[str] | None = None) -> None:
    parser = io.ArgumentParser(prog="lightning-transformer generate", description=__doc__)
    parser.add_argument("checkpoint",
                        help="a .ckpt file of a CausalLMTransformer written by `lightning-transformer fit`")
    parser.add_argument("--input", "-i", default="-", help="one prompt a line; '-' reads stdin")
    parser.add_argument("--max-new-tokens", type=io.non_negative_int, default=None,
                        help="default: the model's max_new_tokens")
    parser.add_argument("--temperature", type=io.temperature, default=None, help="0 is greedy; default: the model's")
    parser.add_argument("--top-k", type=io.top_k, default=None, help="sample among the k likeliest tokens only")
    parser.add_argument("--top-p", type=io.top_p, default=None, help="sample within the nucleus of mass p only")
    parser.add_argument("--beam-size", type=io.positive_int, default=None,
                        help="keep the best of this many beams (no sampling flags then); default: the model's")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="GNMT length-penalty exponent of beam search; default: the model's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling, for reproducible output")
    parser.add_argument("--batch-size", type=io.positive_int, default=64, help="prompts generated together")
    parser.add_argument("--device", type=io.device, default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    with io.one_line_errors():
        prompts = io.read_lines(args.input, "prompt")
        if not prompts:
            raise ValueError("no prompts were given; pass one prompt a line through --input or stdin.")
        empty = [i + 1 for i, prompt in enumerate(prompts) if not prompt.strip()]
        if empty:
            raise ValueError(f"prompt line {empty[0]} is empty; give every line at least one word to continue.")
        io.check_cuda(args.device, torch.cuda.device_count())
        model, tokenizer = load_model(args.checkpoint, CausalLMTransformer, args.device)
        generator = torch.Generator(model.device).manual_seed(args.seed)
        continuations = continue_prompts(model, tokenizer, prompts, args.batch_size, generator,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, beam_size=args.beam_size,
                                         length_penalty=args.length_penalty)
        io.write_lines(None, continuations)
