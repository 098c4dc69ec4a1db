"""`nanovllm batch`: options checked before any file is read or written."""
import pytest

from nanovllm import cli


@pytest.mark.parametrize("size", ["0", "-2"])
def test_batch_refuses_sizes_below_one_before_touching_the_output(tmp_path, capsys, size):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    target.write_text("kept\n")
    for option in ("--batch-size", "--replicas"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["batch", str(source), str(target), option, size])
        assert exit_info.value.code == 2
        assert f"argument {option}: {size} is invalid: expected an integer >= 1" in capsys.readouterr().err
    assert target.read_text() == "kept\n"
