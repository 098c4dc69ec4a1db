"""`nanovllm batch`: options checked before any file is read or written."""
import pytest

from nanovllm import cli


@pytest.mark.parametrize("size", ["0", "-2"])
def test_batch_refuses_a_batch_size_below_one_before_touching_the_output(tmp_path, capsys, size):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    target.write_text("kept\n")
    assert cli.main(["batch", str(source), str(target), "--batch-size", size]) == 2
    assert f"--batch-size {size} is invalid: expected an integer >= 1" in capsys.readouterr().err
    assert target.read_text() == "kept\n"
