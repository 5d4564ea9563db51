"""The command line on the tiny zoo: build → inspect → predict → eval (one-line errors: test_cli_errors.py)."""

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from esmpp.cli import app

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


def test_build_needs_exactly_one_source(tmp_path):
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "either a CONFIG file or --zoo" in str(result.exception)


def test_flags_override_the_config_options_only_when_given():
    from esmpp.cli import PrototypeSource, _build_options
    from esmpp.config import OptionsConfig

    base = OptionsConfig(rank=2, routed_kinds=["fc"])
    kept = _build_options(base, rank=None, routed_kinds=None, prototype_source=None)
    assert kept.rank == 2 and kept.routed_kinds == ("fc",) and kept.method == "esm"
    changed = _build_options(base, rank=5, routed_kinds="qkv, proj", prototype_source=PrototypeSource.runtime)
    assert changed.rank == 5 and changed.routed_kinds == ("qkv", "proj") and changed.prototype_source == "runtime"
    assert changed.rank_energy is None and _build_options(base, rank_energy=0.9).rank_energy == 0.9


def test_method_options_from_the_command_line_join_the_configs():
    from esmpp.cli import _build_options, _method_option_values
    from esmpp.config import OptionsConfig

    given = _method_option_values(["rank_fraction=0.5", "layer_scaling=false"])
    assert given == {"rank_fraction": 0.5, "layer_scaling": False}  # values read as YAML
    base = OptionsConfig(method_options={"rank_fraction": 0.25, "centered": True})
    options = _build_options(base, method_options=given)
    assert options.method_options == {"rank_fraction": 0.5, "centered": True, "layer_scaling": False}
    assert _build_options(base).method_options == {"rank_fraction": 0.25, "centered": True}


def test_methods_lists_each_option_with_its_default_and_meaning():
    listing = _invoke("methods")
    assert "\nesm\n" in listing and "  rank_fraction = 1.0  Share of d_out the tasks split" in listing
    assert '  esd_kinds = ["qkv", "fc", "proj"]' in listing
    assert "averaging\n  (no options)" in listing
