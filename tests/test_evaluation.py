from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from esmpp.architecture import build_visual
from esmpp.evaluation import evaluate, format_table, head_logits, normalized_accuracy, summarize_rows
from esmpp.zoo import Zoo


def test_head_logits_are_scaled_cosines() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    head = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    torch.testing.assert_close(head_logits(features, head), torch.tensor([[6.0, 8.0], [0.0, -10.0]]))


def test_normalized_accuracy_divides_by_the_expert() -> None:
    assert normalized_accuracy({"a": 45.0, "b": 90.0}, {"a": 90.0, "b": 90.0}) == {"a": 50.0, "b": 100.0}


ROWS = [
    {"method": "fine-tuned", "accuracy": {"mnist": 98.0, "faces": 90.0}, "seconds": 0.0},
    {"method": "task arithmetic", "accuracy": {"mnist": 49.0, "faces": 81.0}, "seconds": 1.25},
]


def test_summary_rows_are_json_ready() -> None:
    summary = summarize_rows(ROWS, ROWS[0]["accuracy"])
    assert summary[1]["average"] == pytest.approx(65.0)
    assert summary[1]["normalized"] == {"mnist": 50.0, "faces": 90.0}
    assert summary[1]["normalized_average"] == pytest.approx(70.0)
    assert "normalized" not in summarize_rows(ROWS)[0]


def test_format_table_is_markdown_with_average_and_normalised_table() -> None:
    table = format_table(ROWS, ROWS[0]["accuracy"])
    assert "| method | mnist | faces | avg | seconds |" in table
    assert "| task arithmetic | 49.0 | 81.0 | 65.0 | 1.2 |" in table
    assert "| task arithmetic | 50.0 | 90.0 | 70.0 | 1.2 |" in table
    assert "Normalised" not in format_table(ROWS)


def _encoder(zoo: Zoo, path) -> torch.nn.Module:
    encoder = build_visual(zoo.arch)
    encoder.load_state_dict(load_file(path))
    return encoder


def test_experts_beat_the_pretrained_model_on_most_tiny_tasks(tiny_zoo: Zoo) -> None:
    pretrained = evaluate(_encoder(tiny_zoo, tiny_zoo.pretrained_path), tiny_zoo)
    expert = {
        task: evaluate(_encoder(tiny_zoo, tiny_zoo.finetuned_path(task)), tiny_zoo, [task])[task]
        for task in tiny_zoo.tasks
    }
    assert set(pretrained) == set(tiny_zoo.tasks)
    assert sum(expert[t] > pretrained[t] for t in tiny_zoo.tasks) > len(tiny_zoo.tasks) / 2
    # the manifest records the same numbers the harness measures
    for task in tiny_zoo.tasks:
        assert tiny_zoo.manifest["tasks"][task]["accuracy"]["finetuned"]["test"] == pytest.approx(expert[task])
