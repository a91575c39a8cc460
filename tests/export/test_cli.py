"""``nsa-compile export`` through `add_export_command` / `run_export` (wired into the main CLI separately)."""

import argparse
import json

import onnx
import pytest

from nsa_compile.export import add_export_command, run_export


def run(argv):
    parser = argparse.ArgumentParser(prog="nsa-compile")
    add_export_command(parser.add_subparsers(dest="command", required=True))
    return run_export(parser.parse_args(["export", *argv]))


def test_export_tiny_language_model_decomposed_and_verify(tmp_path, capsys):
    out = tmp_path / "lm.onnx"
    assert run(["--out", str(out), "--layers", "2", "--frames", "4", "--preset", "paper", "--top-n", "2",
                "--verify", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == str(out) and out.exists()
    assert res["inputs"] == ["inputs_embeds", "position_ids", "nsa_video_mask"] and res["outputs"] == ["logits"]
    assert res["rewritten"] == ["language_model.layers.0.self_attn", "language_model.layers.1.self_attn"]
    assert res["dynamic_axes"]["position_ids"] == {"1": "batch", "2": "sequence"}
    errors = res["max_rel_error"]
    assert len(errors) == 2 and max(errors.values()) <= 1e-4
    assert res["video_tokens"] > 32 and res["top_n"] == 2


def test_export_plugin_human_output(tmp_path, capsys):
    out = tmp_path / "lm_plugin.onnx"
    assert run(["--out", str(out), "--mode", "plugin", "--layers", "1", "--frames", "2"]) == 0
    text = capsys.readouterr().out
    assert "plugin" in text and "1 attention layers rewritten" in text
    nodes = [n for n in onnx.load(out).graph.node if n.domain == "nsa_compile"]
    assert len(nodes) == 1


@pytest.mark.parametrize("argv, message", [
    (["--opset", "17"], "opset 17 is not supported"),
    (["--preset", "nope"], "unknown NSA preset"),
    (["--top-n", "0"], "top_n must be an int ≥ 1"),
    (["--frames", "0"], "--frames must be positive"),
    (["--mode", "plugin", "--verify"], "--verify runs the decomposed file"),
    (["--format", "tensorrt"], "GPU|not installed"),
    (["--model", "/nonexistent/checkpoint"], "nonexistent"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    assert run(["--out", str(tmp_path / "x.onnx"), "--layers", "1", "--frames", "2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsa-compile: error: ")
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not (tmp_path / "x.onnx").exists()
