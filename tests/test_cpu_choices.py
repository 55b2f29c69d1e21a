import json
import time

import pytest
import torch

from lightning_transformer.nn import cpu_choices
from lightning_transformer.nn.cpu_choices import cached_choice, cpu_model, longest_winning_length, machine_key


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "lightning_transformer" / "cpu_choices.json"


def test_a_choice_is_measured_once_per_machine_then_read_back(cache_home):
    calls = []
    measure = lambda: calls.append(1) or 128  # noqa: E731
    assert cached_choice("attention", measure) == 128
    assert cached_choice("attention", measure) == 128 and len(calls) == 1
    stored = json.loads(cache_home.read_text())
    assert stored == {machine_key(): {"attention": 128}}


def test_another_machine_or_thread_count_measures_again(cache_home, monkeypatch):
    cached_choice("attention", lambda: 128)
    monkeypatch.setattr(cpu_choices, "machine_key", lambda: "Another CPU | 4 threads | torch 2.13.0+cpu")
    assert cached_choice("attention", lambda: 0) == 0
    assert len(json.loads(cache_home.read_text())) == 2


def test_the_machine_key_names_the_cpu_threads_and_torch():
    key = machine_key()
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key


def _cpuinfo(family: int, model: int) -> str:
    processor = f"vendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n" \
                "stepping\t: 1\nflags\t\t: fpu avx512_bf16\n"
    return f"processor\t: 0\n{processor}\nprocessor\t: 1\n{processor}"


def test_processor_generations_with_one_name_get_their_own_key():
    genoa, turin = cpu_model(_cpuinfo(25, 17)), cpu_model(_cpuinfo(26, 2))
    assert genoa == "AMD EPYC (family 25 model 17 stepping 1)" and turin != genoa
    assert cpu_model("model name\t: Some CPU\n") == "Some CPU" and cpu_model("") == ""


def test_an_unwritable_cache_still_gives_the_measured_value(tmp_path, monkeypatch):
    (tmp_path / "lightning_transformer").write_text("a file where the folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cached_choice("attention", lambda: 64) == 64


@pytest.mark.parametrize("faster, expected", [
    ({16: True, 32: True, 64: False, 128: True}, 32),  # a win past the first loss is noise, not a range
    ({16: False, 32: True}, 0),
    ({16: True, 512: True}, 512),
])
def test_the_crossover_is_the_end_of_the_first_run_of_wins(faster, expected):
    assert longest_winning_length(faster) == expected


def test_measurements_leave_the_random_state_and_grad_mode_alone():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        modes = ("train", "forward", "step")
        longest = [cpu_choices.measure_attention(16, torch.bfloat16, mode, tokens=64) for mode in modes]
        cheap = cpu_choices.measure_cheap_dropout((64, 64))
        bf16 = cpu_choices.measure_bf16_matmuls(tokens=64, width=32)
        assert not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert set(longest) <= {0, *cpu_choices.ATTENTION_LENGTHS} and isinstance(cheap, bool) and isinstance(bf16, bool)


def test_a_race_times_the_two_in_turn_and_picks_the_faster():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    assert cpu_choices.beats(fast, slow, repeats=3) and not cpu_choices.beats(slow, fast, repeats=3)
    assert calls[:8] == ["fast", "slow"] * 4  # alternating, so a burst of load hits both
