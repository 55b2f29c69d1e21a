"""Speed choices that depend on the processor: timed once on the running machine, then cached.

Which attention kernel wins (in training, in inference forward passes, in decoding steps), whether
drawing dropout masks 16 bits at a time pays, and whether bf16 is faster than float32 at all differ
between CPUs (an AMX Xeon and an AVX512-BF16 EPYC disagree on the kernels, see
``benchmarks/results/attention_paths*.md``; a Xeon without either emulates bf16 matmuls at a quarter
of its float32 rate). So none is a constant: each is measured the first time a process needs it and stored in
``$XDG_CACHE_HOME/lightning_transformer/cpu_choices.json`` under the CPU model, thread count and
torch version, for every later run on the same machine. A measurement takes about a second, uses
its own random numbers, and changes no global state. Delete the file, or edit a value in it, to
choose again.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

#: Key lengths timed for the attention choice: the range where the kernels trade places.
ATTENTION_LENGTHS = (16, 32, 64, 128, 256, 512)


def cache_path() -> Path:
    """Where measured choices are kept: ``$XDG_CACHE_HOME/lightning_transformer/cpu_choices.json``."""
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return root / "lightning_transformer" / "cpu_choices.json"


def machine_key() -> str:
    """The CPU model, the threads torch uses and torch's version: what the choices depend on."""
    return f"{cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cpu_name() -> str:
    """This machine's :func:`cpu_model`, or the platform's processor name where there is no ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = cpu_model(handle.read())
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def cpu_model(cpuinfo: str) -> str:
    """The first processor's name in ``/proc/cpuinfo`` text, with its family, model and stepping.

    The name alone does not tell processor generations apart: virtual machines on an AMD EPYC Genoa
    and on a Turin both report "AMD EPYC", yet their vector units differ.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    generation = " ".join(f"{label} {fields[field]}" for label, field in
                          (("family", "cpu family"), ("model", "model"), ("stepping", "stepping")) if fields.get(field))
    name = fields.get("model name", "")
    return f"{name} ({generation})" if name and generation else name


def cached_choice(name: str, measure: Callable[[], object]):
    """``name``'s value for this machine: read from :func:`cache_path`, or ``measure()``-d once and stored."""
    path, key = cache_path(), machine_key()
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    if name in stored.get(key, {}):
        return stored[key][name]
    value = measure()
    stored.setdefault(key, {})[name] = value
    try:  # a read-only home only costs a measurement per process
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return value


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one ``run()``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one warm-up call."""
    run()
    return statistics.median(seconds(run) for _ in range(repeats))


def beats(candidate: Callable[[], object], incumbent: Callable[[], object], repeats: int = 5) -> bool:
    """Whether ``candidate()``'s median time is below ``incumbent()``'s, the two timed in turn, so that
    load from other processes slows both alike."""
    candidate(), incumbent()
    pairs = [(seconds(candidate), seconds(incumbent)) for _ in range(repeats)]
    return statistics.median(a for a, _ in pairs) < statistics.median(b for _, b in pairs)


def isolated(measure: Callable[..., object]) -> Callable[..., object]:
    """Run a measurement in training conditions whatever the caller's: grad on, no autocast, the caller's
    random state restored afterwards (so a measurement never shifts a seeded run)."""

    @functools.wraps(measure)
    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast("cpu", enabled=False):
            return measure(*args, **kwargs)

    return run


def longest_winning_length(faster: dict[int, bool]) -> int:
    """The longest length up to which the candidate won at every timed length (0 if it lost the shortest)."""
    longest = 0
    for length in sorted(faster):
        if not faster[length]:
            break
        longest = length
    return longest


@isolated
def measure_attention(head_dim: int, dtype: torch.dtype, mode: str = "train", tokens: int = 1024,
                      heads: int = 4) -> int:
    """Longest key length at which :func:`~.layers.matmul_attention` beats SDPA in ``dtype`` for ``mode``:
    ``"train"`` forward + backward with a query per key, ``"forward"`` the same without gradients,
    ``"step"`` an incremental decoding step: one query per row over ``tokens // 4`` rows, no gradients."""
    from .layers import matmul_attention

    generator = torch.Generator().manual_seed(0)
    faster = {}
    for length in ATTENTION_LENGTHS:
        batch, queries = (tokens // 4, 1) if mode == "step" else (max(1, tokens // length), length)
        q = torch.randn(batch, heads, queries, head_dim, generator=generator).to(dtype)
        k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype) for _ in range(2))
        mask = torch.ones(queries, length, dtype=torch.bool).tril(length - queries)
        if mode == "train":
            q, k, v = (t.requires_grad_() for t in (q, k, v))

        def run(attend):
            if mode == "train":
                return lambda: attend(q, k, v, mask).float().sum().backward()
            return lambda: torch.no_grad()(attend)(q, k, v, mask)

        faster[length] = beats(run(matmul_attention),
                               run(lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3])))
    return longest_winning_length(faster)


@isolated
def measure_cheap_dropout(shape: tuple[int, int] = (4096, 512)) -> bool:
    """Whether :func:`~.layers.sixteen_bit_dropout` beats ``F.dropout``, forward + backward."""
    from .layers import sixteen_bit_dropout

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    return beats(lambda: sixteen_bit_dropout(x, 0.1).sum().backward(), lambda: F.dropout(x, 0.1, True).sum().backward())


@isolated
def measure_bf16_matmuls(tokens: int = 1024, width: int = 256) -> bool:
    """Whether a feed-forward block (``width`` to ``4 * width`` and back, ReLU between), forward +
    backward over ``tokens`` rows, runs faster in bf16 than in float32: true where the CPU multiplies
    bf16 natively (AVX512-BF16, AMX), false where oneDNN emulates it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator)
    w1, w2 = torch.randn(width, 4 * width, generator=generator), torch.randn(4 * width, width, generator=generator)

    def block(dtype: torch.dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
        return lambda: (torch.relu(inputs[0] @ inputs[1]) @ inputs[2]).sum().backward()

    return beats(block(torch.bfloat16), block(torch.float32))


# The choices this process has read or measured. Not functools.cache: torch.compile would trace
# through its wrapper into the cache file's reading, and break the graph at every attention and
# dropout call; with assume_constant_result it takes each choice as a constant.
_chosen: dict[str, object] = {}


def _once(name: str, measure: Callable[[], object]):
    if name not in _chosen:
        _chosen[name] = cached_choice(name, measure)
    return _chosen[name]


@torch.compiler.assume_constant_result
def matmul_attention_max_keys(mode: str, head_dim: int, dtype: torch.dtype) -> int:
    """Up to how many keys :func:`~.layers.matmul_attention` is the faster kernel on this CPU for ``mode``
    (see :func:`measure_attention`)."""
    name = f"matmul_attention_max_keys/{mode}/{head_dim}/{str(dtype).removeprefix('torch.')}"
    return int(_once(name, lambda: measure_attention(head_dim, dtype, mode)))


@torch.compiler.assume_constant_result
def cheap_dropout_pays() -> bool:
    """Whether :class:`~.layers.Dropout` should draw 16-bit masks on this CPU."""
    return bool(_once("cheap_dropout", measure_cheap_dropout))


def bf16_pays() -> bool:
    """Whether training in bf16 is faster than in float32 on this CPU (see :func:`measure_bf16_matmuls`)."""
    return bool(_once("bf16_matmuls_faster", measure_bf16_matmuls))
