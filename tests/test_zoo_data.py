"""The zoo's task data (taskvec.zoo.data): every task builds from package data, is clean and deterministic.

No model is loaded; each task is built once per module (small per_class) and shared by the tests.
"""
import json

import pytest

from taskvec.errors import ParameterError
from taskvec.zoo import data
from taskvec.zoo.data import SHIFT, SPLITS, TASK_VERSIONS, TASKS, TaskData, load_task, split_balanced

PER_CLASS = 40


@pytest.fixture(scope="module")
def built():
    return {name: load_task(name, seed=0, per_class=PER_CLASS) for name in TASKS}


def test_task_lists_are_registered_and_disjoint():
    groups = [data.FINETUNED_TASKS, data.CONTROL_TASKS, data.HELDOUT_TASKS]
    assert len(data.FINETUNED_TASKS) >= 8 and data.CONTROL_TASKS == ("iso_names",) and len(data.HELDOUT_TASKS) >= 1
    assert data.FINETUNED_TASKS[:4] == ("sentiment", "language", "offensive", "pydoc")
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)) and set(names) <= set(TASKS)
    assert set(TASK_VERSIONS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_builds_with_labels_prompts_and_provenance(built, name):
    td = built[name]
    assert td.name == name and len(td.labels) >= 2 and len(set(td.labels)) == len(td.labels)
    assert len(td.prompts) == len(td.labels) and all(p.strip() for p in td.prompts)
    assert len(set(td.prompts)) == len(td.prompts)
    assert td.source and "?" not in td.source.split(":")[0] and td.description
    assert set(SPLITS) <= set(td.splits) <= set(SPLITS) | {SHIFT}
    assert td.control == (name in data.CONTROL_TASKS)
    for split in SPLITS:
        counts = [sum(1 for _, y in td.splits[split] if y == k) for k in range(len(td.labels))]
        assert all(c > 0 for c in counts), (split, counts)
        assert max(counts) <= PER_CLASS
    assert td.sizes()["test"] >= td.sizes()["train"] * 0.5  # test is the second-largest split


@pytest.mark.parametrize("name", sorted(TASKS))
def test_no_text_under_two_labels_or_in_two_splits(built, name):
    td = built[name]
    where: dict[str, tuple[str, int]] = {}
    for split, rows in td.splits.items():
        for text, label in rows:
            assert isinstance(text, str) and text.strip() and 0 <= label < len(td.labels)
            assert len(text) <= 300
            assert where.setdefault(text, (split, label)) == (split, label), text
    # also case-insensitively across the shift split (it must not repeat training text)
    if SHIFT in td.splits:
        regular = {t.lower() for s in SPLITS for t, _ in td.splits[s]}
        assert not regular & {t.lower() for t, _ in td.splits[SHIFT]}


def test_label_ambiguity_is_dropped_in_the_full_pools():
    """The full data (no cap) of a few cheap tasks: no text under two labels anywhere."""
    for name in ("name_gender", "emotion", "job_titles", "language"):
        td = load_task(name, per_class=None)
        owner: dict[str, int] = {}
        for rows in td.splits.values():
            for text, label in rows:
                assert owner.setdefault(text, label) == label, (name, text)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_for_a_seed(built, name):
    again = load_task(name, seed=0, per_class=PER_CLASS)
    assert again.to_json() == built[name].to_json() and again.fingerprint() == built[name].fingerprint()


def test_another_seed_gives_other_splits(built):
    other = load_task("sentiment", seed=1, per_class=PER_CLASS)
    assert other.splits["test"] != built["sentiment"].splits["test"]


def test_shift_split_of_the_language_task(built):
    td = built["language"]
    assert td.shift_source and "emoji" in td.shift_source
    shift = td.splits[SHIFT]
    assert {y for _, y in shift} == set(range(len(td.labels)))  # same labels
    assert any(" " in t for t, _ in shift)  # phrases, not single words
    counts = [sum(1 for _, y in shift if y == k) for k in range(len(td.labels))]
    assert max(counts) <= int(PER_CLASS * data.FRACTIONS[-1])
    assert td.sizes()[SHIFT] == len(shift)
    assert all(SHIFT not in built[n].splits or built[n].shift_source for n in TASKS)


@pytest.mark.parametrize("name", ["language", "code"])
def test_json_round_trip_keeps_prompts_and_shift(built, name):
    td = built[name]
    back = TaskData.from_json(json.loads(json.dumps(td.to_json())))
    assert back.to_json() == td.to_json() and back.fingerprint() == td.fingerprint()
    assert back.prompts == td.prompts and back.shift_source == td.shift_source and back.sizes() == td.sizes()


def test_old_json_without_prompts_defaults_to_labels(built):
    old = built["sentiment"].to_json()
    del old["prompts"], old["shift_source"]
    td = TaskData.from_json(old)
    assert td.prompts == td.labels and td.shift_source is None


def test_prompts_must_match_labels():
    with pytest.raises(ParameterError, match="prompts"):
        TaskData("t", ["a", "b"], {}, source="s", description="d", prompts=["only one"])


def test_split_fractions_favour_test():
    splits = split_balanced({0: [f"a{i}" for i in range(100)], 1: [f"b{i}" for i in range(100)]}, 0, None)
    assert {k: len(v) for k, v in splits.items()} == {"probe": 20, "train": 80, "val": 40, "test": 60}
    with pytest.raises(ParameterError, match="no split"):
        TaskData.from_json(json.loads(json.dumps(load_task("iso_names", per_class=20).to_json()))).texts("dev")
