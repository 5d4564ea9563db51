"""The comparison table on the tiny zoo: every row present, ESM++ improves on the static backbone it extends."""

import pytest

from esmpp.artifact import TaskInfo
from esmpp.build import BuildOptions
from esmpp.compare import compare_on_zoo, evaluate_routed
from esmpp.errors import ConfigError
from tests.conftest import random_artifact


def test_compare_on_tiny_zoo(tiny_zoo):
    report = compare_on_zoo(tiny_zoo, ["task_arithmetic", "esm"], [BuildOptions(rank=8)], progress=False)
    rows = {row["method"]: row for row in report["rows"]}
    label = "ESM++ r=8 qkv+fc finetuned×1 cosine"
    given, routed, agnostic = f"{label} task given", f"{label} routed", f"{label} task-agnostic"
    assert list(rows) == ["pretrained", "fine-tuned", "task_arithmetic", "esm", given, routed, agnostic]
    for row in rows.values():
        assert set(row["accuracy"]) == set(tiny_zoo.tasks)
        assert all(0.0 <= value <= 100.0 for value in row["accuracy"].values())

    def average(name):
        return sum(rows[name]["accuracy"].values()) / len(tiny_zoo.tasks)

    # The experts add back what the static merge lost, with the task given.
    assert average(given) > average("esm")
    # A task-agnostic hit is a routed hit (same embedding; the routed task's head is the true one).
    assert all(rows[agnostic]["accuracy"][t] <= rows[routed]["accuracy"][t] for t in tiny_zoo.tasks)
    assert average("fine-tuned") > average("pretrained")
    assert 0.0 <= report["esmpp"][label]["routing_average"] <= 100.0
    assert set(report["artifacts"]) == {label}
    assert 0.0 <= rows["esm"]["alpha"] <= 2.0


def test_options_set_for_the_run_reach_the_methods_that_have_them_and_name_their_rows(tiny_zoo):
    options = BuildOptions(rank=2, method_options={"rank_fraction": 0.5})
    report = compare_on_zoo(tiny_zoo, ["tsv", "esm"], [options], progress=False, run_options={"rank_fraction": 0.5})
    methods = [row["method"] for row in report["rows"]]
    label = "ESM++ r=2 qkv+fc finetuned×1 cosine on esm (rank_fraction=0.5)"
    assert methods[2:4] == ["tsv", "esm (rank_fraction=0.5)"] and f"{label} task given" in methods
    assert report["esmpp"][label]["options"]["rank_fraction"] == 0.5


def test_a_task_whose_classes_differ_from_the_zoos_is_refused_not_measured(tiny_zoo):
    artifact = random_artifact()
    artifact.tasks[0] = TaskInfo("digits", ["c0", "c1"])  # the zoo's digits labels index other classes
    with pytest.raises(ConfigError, match="task 'digits' has the classes"):
        evaluate_routed(artifact, tiny_zoo)
