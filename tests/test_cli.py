"""The command line on the tiny zoo: build → inspect → predict → eval (one-line errors: test_cli_errors.py)."""

import json

import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from esmpp.artifact import load_artifact
from esmpp.checkpoints import load_encoder
from esmpp.cli import app
from esmpp.images import preprocess_uint8

runner = CliRunner()


@pytest.fixture
def cache(tiny_zoo, monkeypatch):
    monkeypatch.setenv("ESMPP_CACHE", str(tiny_zoo.root.parent.parent))
    return tiny_zoo


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_build_inspect_predict_eval(cache, tmp_path):
    out = tmp_path / "artifact"
    summary = _invoke("build", "--zoo", "tiny", "--out", out, "--rank", 4, "--alpha", 0.5)
    assert "artifact:" in summary and "rank 4" in summary and "alpha 0.500" in summary
    assert "task digits" in _invoke("inspect", out)

    images, _ = cache.split("digits", "test")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    lines = _invoke("predict", out, *paths, "--json", "--routes").strip().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert len(predictions) == 3 and all(p["routed"] and len(p["routes"]) == 4 for p in predictions)
    given = json.loads(_invoke("predict", out, paths[0], "--task", "digits", "--json"))
    assert given["task"] == "digits" and not given["routed"]

    table = _invoke("eval", out, "--zoo", "tiny")
    assert "task_given" in table and "routing" in table


def test_zoo_build_out_help_states_the_real_default_and_how_the_other_commands_find_a_zoo():
    command = typer.main.get_command(app).commands["zoo"].commands["build"]
    help_text = next(param.help for param in command.params if param.name == "out")
    assert "$ESMPP_CACHE/zoo/PRESET" in help_text and "~/.cache/esmpp/zoo/PRESET without ESMPP_CACHE" in help_text
    assert "set ESMPP_CACHE instead of --out" in help_text


def test_zoo_build_out_elsewhere_says_the_other_commands_will_not_read_it(tiny_zoo, monkeypatch, tmp_path):
    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path))  # the other commands read tmp_path/zoo/tiny
    note = _invoke("zoo", "build", "--preset", "tiny", "--out", tiny_zoo.root)  # reused, not rebuilt
    assert f"the other commands' --zoo tiny read {tmp_path / 'zoo' / 'tiny'}, not this zoo" in note
    assert "set ESMPP_CACHE=DIR instead of --out" in note
    monkeypatch.setenv("ESMPP_CACHE", str(tiny_zoo.root.parent.parent))
    assert "note" not in _invoke("zoo", "build", "--preset", "tiny", "--out", tiny_zoo.root)


def _accuracy_table(output: str) -> dict[str, dict[str, str]]:
    """The first markdown table of ``output`` as {method: {task: cell}}."""
    table = output.split("\n\n")[1]
    header, _, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines())
    return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def test_eval_measures_each_artifact_task_on_the_zoo_task_of_its_name(cache, tmp_path):
    order = ["stripes", "digits"]  # two of the zoo's four tasks, in another order than the zoo's
    out = tmp_path / "subset"
    _invoke("build", "--zoo", "tiny", "--tasks", ",".join(order), "--out", out, "--rank", 4, "--alpha", 0.5)
    table = _accuracy_table(_invoke("eval", out, "--zoo", "tiny"))
    model = load_artifact(out).to_model()
    for index, task in enumerate(order):
        images, labels = cache.split(task, "test")
        pixels = preprocess_uint8(images, cache.arch)
        with torch.inference_mode():
            given = model(pixels, torch.full((len(labels),), index)).logits.argmax(-1)
            routed = model(pixels).task
        assert table["subset task_given"][task] == f"{100 * (given.numpy() == labels).mean():.1f}"
        assert table["subset routing"][task] == f"{100 * (routed.numpy() == index).mean():.1f}"


def test_eval_reads_a_folder_that_is_not_an_artifact_as_a_checkpoint(cache, tmp_path):
    """A sharded safetensors checkpoint (a folder, as Hugging Face writes large models) was refused as an
    incomplete artifact: it is measured as the same weights in one file are."""
    file = cache.finetuned_path("digits")
    state = load_encoder(file).state
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({key: state[key] for key in shard_keys}, folder / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    by_folder = _accuracy_table(_invoke("eval", folder, "--zoo", "tiny"))
    by_file = _accuracy_table(_invoke("eval", file, "--zoo", "tiny"))
    assert by_folder["sharded"] == by_file[file.name]


def test_build_needs_exactly_one_source(tmp_path):
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "either a CONFIG file or --zoo" in str(result.exception)


def test_flags_override_the_config_options_only_when_given():
    from esmpp.cli import PrototypeSource, _build_options
    from esmpp.config import OptionsConfig

    base = OptionsConfig(rank=2, routed_kinds=["fc"])
    kept = _build_options("build", base, rank=None, routed_kinds=None, prototype_source=None)
    assert kept.rank == 2 and kept.routed_kinds == ("fc",) and kept.method == "esm"
    changed = _build_options("build", base, rank=5, routed_kinds="qkv, proj", prototype_source=PrototypeSource.runtime)
    assert changed.rank == 5 and changed.routed_kinds == ("qkv", "proj") and changed.prototype_source == "runtime"
    assert changed.rank_energy is None and _build_options("build", base, rank_energy=0.9).rank_energy == 0.9


def test_method_options_from_the_command_line_join_the_configs():
    from esmpp.cli import _build_options, _method_option_values
    from esmpp.config import OptionsConfig

    given = _method_option_values(["rank_fraction=0.5", "layer_scaling=false"])
    assert given == {"rank_fraction": 0.5, "layer_scaling": False}  # values read as YAML
    base = OptionsConfig(method_options={"rank_fraction": 0.25, "centered": True})
    options = _build_options("build", base, method_options=given)
    assert options.method_options == {"rank_fraction": 0.5, "centered": True, "layer_scaling": False}
    assert _build_options("build", base).method_options == {"rank_fraction": 0.25, "centered": True}


def test_methods_lists_each_option_with_its_default_and_meaning():
    listing = _invoke("methods")
    assert "\nesm\n" in listing and "  rank_fraction = 1.0  Share of d_out the tasks split" in listing
    assert '  esd_kinds = ["qkv", "fc", "proj"]' in listing
    assert "averaging\n  (no options)" in listing


def _leaf_commands(group, path=()):
    """(command path, click command) of every command under the click ``group``, subgroups' included."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_command_takes_debug_after_its_name():
    commands = dict(_leaf_commands(typer.main.get_command(app)))
    assert {"build", "eval", "compare"} <= {" ".join(path) for path in commands} and ("zoo", "build") in commands
    for path, command in commands.items():
        assert any("--debug" in param.opts for param in command.params), " ".join(path)


def test_alpha_help_states_the_bound_and_the_search_range_the_build_uses():
    from esmpp.build import ALPHA_SEARCH, MAX_ALPHA

    command = typer.main.get_command(app).commands["build"]
    help_text = next(param.help for param in command.params if param.name == "alpha")
    low, high = ALPHA_SEARCH
    assert f"in [0, {MAX_ALPHA:g}] (the search covers [{low:g}, {high:g}])" in help_text
