"""Synthetic tasks: every label recomputed by brute force in plain Python, determinism,
shapes and masks, and the accuracy metric on known predictions."""

from collections import Counter

import pytest
import torch

from minrnn.data.tasks import (
    CHOMSKY_TASKS,
    EVAL_LENGTHS,
    IGNORE_INDEX,
    TASKS,
    TRAIN_LENGTHS,
    accuracy,
    eval_set,
    random_length_batch,
)
from minrnn.data.tasks.selective_copying import BLANK, MARKER, VOCAB_SIZE

SC_OPTIONS = {"num_tokens": 4}


def options(name):
    return SC_OPTIONS if name == "selective_copying" else {}


def rows(name, length, batch=64, seed=0):
    """(inputs, answers) per row as Python lists: the symbols asked about and what is asked."""
    b = TASKS[name](seed, batch, length, **options(name))
    out = []
    for x, y in zip(b.input_ids.tolist(), b.targets.tolist()):
        asked = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
        out.append((x, asked, [y[i] for i in asked]))
    return out


# --- brute-force labels ------------------------------------------------------------------


def brute_parity(symbols):
    return sum(symbols) % 2


def brute_even_pairs(symbols):
    return sum(1 for a, b in zip(symbols, symbols[1:]) if a != b) % 2


def brute_cycle_nav(symbols):
    state = 0
    for s in symbols:
        state = (state + {0: -1, 1: 0, 2: 1}[s]) % 5
    return state


def brute_majority(symbols):
    counts = Counter(symbols)
    top = max(counts.values())
    return max(s for s, c in counts.items() if c == top)


def brute_majority_count(symbols):
    return max(Counter(symbols).values())


ONE_ANSWER = {
    "parity_check": (2, brute_parity),
    "even_pairs": (2, brute_even_pairs),
    "cycle_nav": (3, brute_cycle_nav),
    "majority": (63, brute_majority),
    "majority_count": (63, brute_majority_count),
}


@pytest.mark.parametrize("name", sorted(ONE_ANSWER))
@pytest.mark.parametrize("length", [1, 2, 7])
def test_single_answer_labels(name, length):
    query, label = ONE_ANSWER[name]
    for x, asked, answers in rows(name, length):
        assert len(x) == length + 1 and x[-1] == query and query not in x[:-1]
        assert asked == [length] and answers == [label(x[:-1])]


def test_labels_take_every_value():
    # a constant label would pass the brute-force checks on a broken generator only by luck
    for name, classes in [("parity_check", 2), ("even_pairs", 2), ("cycle_nav", 5)]:
        seen = {a[0] for _, _, a in rows(name, 9, batch=256)}
        assert seen == set(range(classes)), name


def test_majority_tie_goes_to_largest_symbol():
    # length 2 with distinct symbols: both occur once, the larger one is the answer
    ties = [(x, a) for x, _, a in rows("majority", 2, batch=256) if x[0] != x[1]]
    assert ties and all(a == [max(x[:2])] for x, a in ties)


@pytest.mark.parametrize("length", [1, 3, 8])
def test_bucket_sort_targets_are_the_sorted_inputs(length):
    for x, asked, answers in rows("bucket_sort", length):
        assert len(x) == 2 * length and x[length:] == [10] * length
        assert asked == list(range(length, 2 * length))
        assert answers == sorted(x[:length])


@pytest.mark.parametrize("length", [1, 2, 6])
def test_missing_duplicate_finds_the_missing_symbol(length):
    for seed in range(8):
        for x, asked, answers in rows("missing_duplicate", length, batch=8, seed=seed):
            m = len(x) - 1 - length
            assert 0 <= m < length and x[-1] == 9
            w = x[:length]
            assert x[length:-1] == w[:m]  # the repeat so far
            assert asked == [len(x) - 1] and answers == [w[m]]


def test_missing_duplicate_cut_varies_between_batches():
    cuts = {TASKS["missing_duplicate"](seed, 2, 10).input_ids.shape[1] for seed in range(40)}
    assert len(cuts) > 3


@pytest.mark.parametrize("length", [4, 5, 30])
def test_selective_copying_answers_are_the_memorised_tokens_in_order(length):
    k = SC_OPTIONS["num_tokens"]
    for x, asked, answers in rows("selective_copying", length):
        assert len(x) == length + k and x[length:] == [MARKER] * k
        data = [s for s in x[:length] if s != BLANK]
        assert len(data) == k and all(1 <= s <= 14 for s in data)
        assert asked == list(range(length, length + k)) and answers == data


def test_selective_copying_paper_size():
    b = TASKS["selective_copying"](0, 2, 4096)
    assert b.input_ids.shape == b.targets.shape == (2, 4096 + 16)
    assert ((b.input_ids[:, :4096] != BLANK).sum(1) == 16).all()
    assert VOCAB_SIZE == TASKS["selective_copying"].vocab_size == 16


def test_selective_copying_positions_spread_over_the_span():
    b = TASKS["selective_copying"](3, 1000, 64, num_tokens=2)
    used = (b.input_ids[:, :64] != BLANK).any(0)
    assert used.all()  # every position gets used somewhere: not a fixed layout


# --- shared properties -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_dtypes_vocab_and_mask(name):
    task = TASKS[name]
    length = 12
    b = task(1, 5, length, **options(name))
    assert b.input_ids.dtype == b.targets.dtype == torch.long
    assert b.input_ids.shape == b.targets.shape and b.input_ids.shape[0] == 5
    assert 0 <= b.input_ids.min() and b.input_ids.max() < task.vocab_size
    asked = b.targets != IGNORE_INDEX
    assert (b.targets[asked] >= 0).all() and (b.targets[asked] < task.vocab_size).all()
    per_row = asked.sum(1)
    assert (per_row == per_row[0]).all() and per_row[0] >= 1
    if task.answer == "last":
        assert per_row[0] == 1 and asked[:, -1].all()
    # answers are asked only after the symbols they depend on: never in the first half
    assert not asked[:, : b.input_ids.shape[1] // 2].any()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_per_seed_and_different_across_seeds(name):
    task = TASKS[name]
    a = task(7, 16, 20, **options(name))
    b = task(torch.Generator().manual_seed(7), 16, 20, **options(name))
    c = task(8, 16, 20, **options(name))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert a.input_ids.shape != c.input_ids.shape or not torch.equal(a.input_ids, c.input_ids)


def test_random_length_batch_draws_lengths_in_range():
    task = TASKS["parity_check"]
    lengths = {random_length_batch(task, s, 2, *TRAIN_LENGTHS).input_ids.shape[1] - 1 for s in range(200)}
    assert min(lengths) >= TRAIN_LENGTHS[0] and max(lengths) <= TRAIN_LENGTHS[1] and len(lengths) > 25
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):  # a shared generator gives a reproducible stream of batches
        assert torch.equal(random_length_batch(task, g1, 4, 1, 40).input_ids,
                           random_length_batch(task, g2, 4, 1, 40).input_ids)


def test_eval_set_is_fixed_per_length():
    task = TASKS["cycle_nav"]
    full = eval_set(task, range(EVAL_LENGTHS[0], EVAL_LENGTHS[0] + 3), batch_size=4, num_batches=2)
    alone = eval_set(task, [EVAL_LENGTHS[0] + 1], batch_size=4, num_batches=2)
    assert sorted(full) == [40, 41, 42]
    assert all(b.input_ids.shape == (4, 42) for b in full[41])
    assert torch.equal(full[41][1].input_ids, alone[41][1].input_ids)  # independent of other lengths
    assert not torch.equal(full[41][0].input_ids, full[41][1].input_ids)
    other_seed = eval_set(task, [41], batch_size=4, seed=1)
    assert not torch.equal(other_seed[41][0].input_ids, full[41][0].input_ids)


def test_chomsky_registry_and_eval_range():
    assert sorted(CHOMSKY_TASKS) == sorted(["parity_check", "even_pairs", "cycle_nav", "bucket_sort",
                                            "majority", "majority_count", "missing_duplicate"])
    assert TRAIN_LENGTHS == (1, 40) and EVAL_LENGTHS == (40, 256)
    for name in CHOMSKY_TASKS:  # the longest evaluation length can be drawn by every task
        TASKS[name](0, 1, EVAL_LENGTHS[1])


def test_bad_arguments_are_named():
    task = TASKS["parity_check"]
    with pytest.raises(ValueError, match="batch_size"):
        task(0, 0, 5)
    with pytest.raises(ValueError, match="length"):
        task(0, 2, 0)
    with pytest.raises(TypeError, match="seed"):
        task(1.5, 2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        TASKS["selective_copying"](0, 2, 8, num_tokens=9)
    with pytest.raises(ValueError, match="majority_count: length must be <= 256"):
        TASKS["majority_count"](0, 2, 257)


# --- the metric ---------------------------------------------------------------------------------


def test_accuracy_is_one_on_the_targets_and_counts_partial_errors():
    b = TASKS["bucket_sort"](0, 4, 5)  # 5 answers per row, 20 in all
    truth = torch.where(b.targets == IGNORE_INDEX, torch.zeros_like(b.targets), b.targets)
    perfect = accuracy(truth, b.targets)
    assert (perfect.accuracy, perfect.exact_match, perfect.answers) == (1.0, 1.0, 20)
    # one-hot logits of the truth give the same
    assert accuracy(torch.nn.functional.one_hot(truth, 11).float(), b.targets).accuracy == 1.0
    wrong = truth.clone()
    wrong[0, 5] = (wrong[0, 5] + 1) % 10        # row 0: one answer wrong
    wrong[1, 5:] = (wrong[1, 5:] + 1) % 10      # row 1: all five wrong
    wrong[2, :5] = 7                            # row 2: only positions that are not asked
    got = accuracy(wrong, b.targets)
    assert got.correct == 14 and got.accuracy == pytest.approx(14 / 20)
    assert got.exact_match == pytest.approx(2 / 4)
    total = got + perfect  # counts add up over batches
    assert total.accuracy == pytest.approx(34 / 40) and total.exact_match == pytest.approx(6 / 8)


def test_accuracy_rejects_bad_shapes():
    b = TASKS["parity_check"](0, 2, 3)
    with pytest.raises(ValueError, match="same"):
        accuracy(b.input_ids[:, :-1], b.targets)
    with pytest.raises(ValueError, match="logits"):
        accuracy(torch.zeros(2, 4), b.targets)
