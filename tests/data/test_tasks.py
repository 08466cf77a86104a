"""lmforge.data.tasks: graders, well-formedness, deterministic disjoint splits, specs, Wilson intervals, JSONL."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.data.tasks import (
    HELDOUT_FRACTION,
    Example,
    available_tasks,
    exact_match_interval,
    examples,
    get_task,
    parse_task_list,
    split_of,
)

# Wrong replies for each task's first held-out example, built from the right one.
PERTURB = {
    "int": lambda a: [str(int(a) + 1), str(int(a) - 1), a + "0", a + " ", f"{a}.", f"The answer is {a}", f"{a}\n{a}"],
    "word": lambda a: [a[::-1] + "x", a[1:], a.upper(), a + " " + a, f'"{a}"', f"{a}."],
    "list": lambda a: [" ".join(reversed(a.split())), a.replace(" ", ","), a + " 0", f"[{a}]", a.replace(" ", "  ")],
}
KIND = {"add": "int", "sub": "int", "mul": "int", "max": "int", "count": "int", "reverse": "word", "copy": "word",
        "sort": "list"}  # fmt: skip


def test_every_task_is_listed_and_round_trips_its_spec():
    assert set(available_tasks()) == set(KIND)
    for name in available_tasks():
        task = get_task(name)
        assert get_task(task.spec()) == task and task.spec().startswith(name)
    assert get_task("add").spec() == "add:digits=3" and get_task("add:digits=3") == get_task("add")
    assert get_task("sub:negative=true,digits=2").spec() == "sub:digits=2,negative=true"


@pytest.mark.parametrize("name", sorted(KIND))
def test_grader_accepts_the_answer_and_rejects_perturbations(name):
    task = get_task(name)
    for ex in examples(task, "heldout", 20):
        assert isinstance(ex, Example) and ex.task == task.spec()
        assert ex.prompt.isascii() and ex.answer.isascii() and "\n" not in ex.prompt and len(ex.prompt) < 80
        assert task.grade(ex, ex.answer) and task.grade(ex, f"  {ex.answer}\n")
        assert task.well_formed(ex.answer) and task.well_formed(f" {ex.answer} ")
        wrong = [w for w in PERTURB[KIND[name]](ex.answer) if w.strip() != ex.answer]
        assert wrong and not any(task.grade(ex, w) for w in wrong), wrong
        assert not task.grade(ex, "") and not task.well_formed("") and not task.well_formed(f"answer: {ex.answer}")
        assert ex.messages() == [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
        assert ex.prompt_messages() == ex.messages()[:1]


def test_answers_are_right():
    rng = random.Random(0)
    for _ in range(200):
        ex = get_task("add").sample(rng)
        a, b = map(int, ex.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert int(ex.answer) == a + b
        ex = get_task("sub").sample(rng)
        a, b = map(int, ex.prompt.removeprefix("What is ").removesuffix("?").split(" - "))
        assert int(ex.answer) == a - b >= 0
        ex = get_task("sort").sample(rng)
        numbers = sorted(map(int, ex.prompt.split(": ")[1].split()))
        assert ex.answer == " ".join(map(str, numbers))
        ex = get_task("count").sample(rng)
        letter, text = ex.prompt.removeprefix("Count the letter ").split(" in: ")
        assert int(ex.answer) == text.count(letter)
    assert any(int(e.answer) < 0 for e in examples("sub:negative=true", "train", 50))


def test_well_formed_is_about_form_not_truth():
    assert get_task("add").well_formed("12") and get_task("sub").well_formed("-3")
    assert not any(get_task("add").well_formed(s) for s in ("1 2", "012", "1.5", "+4", "twelve", "١٢"))
    assert get_task("reverse").well_formed("abc") and not get_task("reverse").well_formed("ab c")
    assert get_task("sort").well_formed("1 2 30") and not get_task("sort").well_formed("1, 2, 3")
    assert not get_task("sort").well_formed("1  2")


def test_examples_are_deterministic_distinct_and_seeded():
    a = examples("add:digits=3", "train", 300, seed=0)
    assert a == examples("add:digits=3", "train", 300, seed=0)
    assert a[:100] == examples("add:digits=3", "train", 100, seed=0)  # a prefix of a longer draw
    assert a != examples("add:digits=3", "train", 300, seed=1)
    assert len({e.prompt for e in a}) == 300
    assert examples("add", "heldout", 50) == examples("add:digits=3", "heldout", 50)


@pytest.mark.parametrize("name", ["add:digits=2", "reverse:min_len=2,max_len=3", "sort:length=3,max_value=30",
                                  "count:min_len=4,max_len=6,letters=4"])  # fmt: skip
def test_train_and_heldout_are_disjoint_with_a_sane_heldout_fraction(name):
    task = get_task(name)
    train = examples(task, "train", 3000)
    heldout = examples(task, "heldout", 400)
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert all(split_of(task, e) == "train" for e in train) and all(split_of(task, e) == "heldout" for e in heldout)
    rng = random.Random(1)
    drawn = [task.sample(rng).prompt for _ in range(4000)]
    share = sum(split_of(task, p) == "heldout" for p in drawn) / len(drawn)
    assert abs(share - HELDOUT_FRACTION) < 0.05, share


def test_add_keeps_both_orders_of_a_sum_in_one_split_whatever_the_digits():
    task = get_task("add:digits=2")
    for a, b in [(12, 34), (3, 98), (50, 7)]:
        assert split_of(task, f"What is {a} + {b}?") == split_of(task, f"What is {b} + {a}?")
        assert split_of(task, f"What is {a} + {b}?") == split_of("add:digits=3", f"What is {a} + {b}?")


def test_digits_option_is_respected():
    for digits in (1, 2, 4):
        for ex in examples(f"add:digits={digits}", "train", 30):
            operands = ex.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert all(len(x) <= digits for x in operands)
    assert max(len(e.prompt.split()[2]) for e in examples("mul:digits=4", "train", 100)) == 4


def test_a_too_small_prompt_space_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct heldout prompts.*100 prompts"):
        examples("add:digits=1", "heldout", 20)  # 100 prompts, ~1/8 held out
    with pytest.raises(ValueError, match="cannot draw"):
        examples("reverse:min_len=1,max_len=1", "train", 27)  # 26 prompts at all
    assert len(examples("add:digits=1", "train", 60)) == 60


@pytest.mark.parametrize(
    "spec, words",
    [("divide", ["unknown task 'divide'", "add, sub, mul"]), ("add:digit=3", ["bad option", "digits="]),
     ("add:digits=x", ["integer"]), ("add:digits=0", ["digits"]), ("sub:negative=maybe", ["true or false"]),
     ("reverse:min_len=5,max_len=2", ["min_len <= max_len"]), ("add:digits", ["bad option"])],
)  # fmt: skip
def test_get_task_bad_spec_names_the_choices(spec, words):
    with pytest.raises(ValueError) as e:
        get_task(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_task_lists_split_on_commas_and_keep_options_with_their_task():
    assert parse_task_list("add:digits=3,reverse") == ["add:digits=3", "reverse"]
    assert parse_task_list("sub:digits=2,negative=true,sort") == ["sub:digits=2,negative=true", "sort"]
    assert parse_task_list("count,letters=3") == ["count:letters=3"]
    with pytest.raises(ValueError, match="no task before"):
        parse_task_list("digits=3,add")


def wilson(k, n, z=1.959963984540054):
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def test_wilson_interval():
    rate, lo, hi = exact_match_interval(41, 100)
    assert rate == 0.41 and (lo, hi) == pytest.approx(wilson(41, 100), abs=1e-12)
    _, lo50, hi50 = exact_match_interval(50, 100)  # the textbook value: [0.404, 0.596]
    assert round(lo50, 3) == 0.404 and round(hi50, 3) == 0.596
    assert exact_match_interval(0, 10)[1] == 0.0 and exact_match_interval(10, 10)[2] == 1.0
    assert exact_match_interval(0, 10)[2] == pytest.approx(0.2775, abs=1e-4)  # not the empty [0, 0]
    _, lo99, hi99 = exact_match_interval(41, 100, level=0.99)
    assert lo99 < lo and hi99 > hi
    for bad in [(5, 0), (-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            exact_match_interval(*bad)
