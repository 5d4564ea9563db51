import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export.serve_onnx import ServingError
from export.triton import TRITON_TYPES, main, write_triton_repository

REPO = Path(__file__).parents[2]
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')


def _tokens(text):
    position, tokens = 0, []
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        assert match, f"cannot tokenise {text[position : position + 20]!r}"
        tokens.append(match.group(0).strip())
        position = match.end()
    return tokens


def _value(tokens):
    token = tokens.pop(0)
    if token == "{":
        return _message(tokens, closing="}")
    if token.startswith('"'):
        return token[1:-1]
    return int(token) if re.fullmatch(r"-?\d+", token) else token


def _message(tokens, closing=None):
    """Protobuf text format → dict; every field maps to the list of its values (repeated or not)."""
    fields = {}
    while tokens and tokens[0] != closing:
        name = tokens.pop(0)
        if tokens[0] == ":":
            tokens.pop(0)
        if tokens[0] == "[":
            tokens.pop(0)
            values = []
            while tokens[0] != "]":
                values.append(_value(tokens))
                if tokens[0] == ",":
                    tokens.pop(0)
            tokens.pop(0)
        else:
            values = [_value(tokens)]
        fields.setdefault(name, []).extend(values)
    if closing:
        assert tokens.pop(0) == closing
    return fields


def parse_pbtxt(text):
    tokens = _tokens(text)
    return _message(tokens)


def test_parser_reads_nested_messages_lists_and_enums():
    parsed = parse_pbtxt('name: "m"\ninput [ { dims: [ 1, 2 ] reshape { shape: [ ] } }, { kind: KIND_GPU } ]')
    assert parsed == {"name": ["m"], "input": [{"dims": [1, 2], "reshape": [{"shape": []}]}, {"kind": ["KIND_GPU"]}]}


def _graph_tensors(values):
    """ONNX inputs/outputs → {name: (Triton type, shape without the batch axis)}."""
    return {
        v.name: (TRITON_TYPES[v.type.tensor_type.elem_type], [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
        for v in values
    }


def _config_tensors(entries):
    """config entries → {name: (type, the shape the model sees: dims, or reshape's shape)}."""
    tensors = {}
    for entry in entries:
        shape = entry["reshape"][0]["shape"] if "reshape" in entry else entry["dims"]
        tensors[entry["name"][0]] = (entry["data_type"][0], shape)
    return tensors


def test_config_matches_the_onnx_graph(exported_model, tmp_path):
    model_path, task_input = exported_model
    model_dir = write_triton_repository(model_path, tmp_path / "repo", name="esmpp", max_batch_size=32)
    assert (model_dir / "1" / "model.onnx").read_bytes() == model_path.read_bytes()
    assert (model_dir / "esmpp.json").is_file()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == ["esmpp"] and config["backend"] == ["onnxruntime"]
    assert config["max_batch_size"] == [32]
    assert config["dynamic_batching"][0]["preferred_batch_size"] == [8, 16, 32]
    assert config["instance_group"][0]["kind"] == ["KIND_GPU"]
    graph = onnx.load(str(model_path)).graph
    inputs = _config_tensors(config["input"])
    assert inputs == _graph_tensors(graph.input)
    assert list(inputs) == (["pixel_values", "forced_task_id"] if task_input else ["pixel_values"])
    assert inputs["pixel_values"] == ("TYPE_FP32", [3, 16, 16])
    outputs = _config_tensors(config["output"])
    assert outputs == _graph_tensors(graph.output)
    assert outputs["task_id"] == ("TYPE_INT64", []) and outputs["logits"] == ("TYPE_FP32", [4])
    # a batch-only tensor is declared [1] for the client and reshaped to the model's [batch]
    assert [e["dims"] for e in config["output"] if e["name"] == ["task_id"]] == [[1]]


def test_a_fixed_batch_axis_is_refused(exported_model, tmp_path):
    model_path, _ = exported_model
    model = onnx.load(str(model_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    with pytest.raises(ValueError, match="pixel_values: the first axis must be a dynamic batch axis"):
        write_triton_repository(fixed, tmp_path / "repo")


def _plain_onnx(path):
    """A valid ONNX model with a batch axis that `esmpp export` did not write (no esmpp metadata)."""
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [value], [])
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]))
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_command_line_errors_are_one_line_and_write_nothing(exported_model, tmp_path, capsys):
    """Each used to end in a traceback (the first four) or to write a repository Triton rejects or ignores, or
    an esmpp.json of `{}`, with exit code 0."""
    model_path, _ = exported_model
    repo = tmp_path / "repo"
    (tmp_path / "notes.txt").write_text("not a model")
    cases = {
        "missing model": ([tmp_path / "none.onnx", repo], "none.onnx: no such model file"),
        "not ONNX": ([tmp_path / "notes.txt", repo], "notes.txt is not a readable ONNX model"),
        "a folder as the model": ([model_path.parent, repo], "is a folder: pass the model.onnx file"),
        "a file as the repository": ([model_path, tmp_path / "notes.txt"], "notes.txt is a file: give a folder"),
        "batch size 0": ([model_path, repo, "--max-batch-size", "0"], "max_batch_size (--max-batch-size) must"),
        "negative batch size": ([model_path, repo, "--max-batch-size", "-3"], "must be at least 1, got -3"),
        "version 0": ([model_path, repo, "--version", "0"], "version (--version) must be at least 1, got 0"),
        "not esmpp's": ([_plain_onnx(tmp_path / "plain.onnx"), repo], "was not written by `esmpp export`"),
    }
    for name, (args, expected) in cases.items():
        with pytest.raises(SystemExit) as exited:
            main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert exited.value.code == 1, name
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (name, captured.err)
        assert expected in captured.err, (name, captured.err)
        assert not repo.exists(), name


def test_a_missing_weights_file_is_named_before_anything_is_written(exported_model, tmp_path):
    model_path, _ = exported_model
    model = onnx.load(str(model_path))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ServingError, match=r"model\.onnx\.data is missing: model\.onnx keeps its weights there"):
        write_triton_repository(tmp_path / "model.onnx", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_the_module_runs_from_the_folder_that_holds_the_kit(exported_model, tmp_path):
    model_path, _ = exported_model
    command = [sys.executable, "-m", "export.triton", str(model_path), str(tmp_path / "repo"), "--version", "3"]
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert output.returncode == 0, output.stderr
    assert (tmp_path / "repo" / "esmpp" / "3" / "model.onnx").is_file()
