"""plugins.toml is checked against its schema (file, key and expected type named), a missing or binary file is a
clear error, and names nothing offers are warned about."""
import pytest

from nanovllm.core.plugins import load_plugins, load_settings
from tests.conftest import debug_messages

WRONG_TYPES = [
    ('[backends]\norder = "x"\n', r"\[backends\] order is a string \('x'\), expected a list of strings"),
    ("backends = 5\n", r"backends is an integer \(5\), expected a table \(\[backends\]\)"),
    ("[kernels]\ncpu_ref = 5\n", r"\[kernels\] cpu_ref is an integer \(5\), expected a table \[kernels.cpu_ref\]"),
    ('[kernels.cpu_ref]\n"attention.decode" = "torch_loop"\n',
     r"\[kernels.cpu_ref\] 'attention.decode' is a string \('torch_loop'\), expected a list of strings"),
    ("[backends]\ndisabled = [1, 2]\n", r"\[backends\] disabled is a list \(\[1, 2\]\), expected a list of strings"),
    ("kernels = []\n", r"kernels is a list \(\[\]\), expected a table of \[kernels.<backend>\] tables"),
    ('[tune.cuda]\nops = "sampler"\n', r"\[tune.cuda\] ops is a string \('sampler'\), expected a list of strings"),
]


def user_file(tmp_path, monkeypatch, content: str | bytes):
    path = tmp_path / "plugins.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(path))
    return path


@pytest.mark.parametrize("text, message", WRONG_TYPES, ids=[t.replace("\n", " ") for t, _ in WRONG_TYPES])
def test_wrong_types_name_file_key_and_type(tmp_path, monkeypatch, text, message):
    path = user_file(tmp_path, monkeypatch, text)
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        load_settings()


def test_missing_file_named_by_the_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(tmp_path / "nowhere.toml"))
    with pytest.raises(ValueError, match=r"NANOVLLM_PLUGINS_TOML='.*nowhere.toml': no such file; point it at a "
                                         r"plugins.toml, or unset it"):
        load_settings()


def test_binary_file_or_folder_is_a_clear_error(tmp_path, monkeypatch):
    path = user_file(tmp_path, monkeypatch, bytes(range(256)))
    with pytest.raises(ValueError, match=rf"{path}: not a text file \(not UTF-8\)"):
        load_settings()
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(tmp_path))
    with pytest.raises(ValueError, match=r"is a folder, not a plugins.toml file"):
        load_settings()


def test_unknown_names_are_warned_about(tmp_path, monkeypatch):
    user_file(tmp_path, monkeypatch, '[backends]\norder = ["cdua", "cpu_ref"]\ndisabled = ["nosuch"]\n'
                                     'disabled_kernels = ["cpu_ref/nope"]\nfrobnicate = 1\n'
                                     '[kernels.cpu_ref]\n"attention.decod" = ["torch_loop"]\n'
                                     '"attention.decode" = ["missing_kernel", "torch_loop"]\n'
                                     '[kernels.nosuchbackend]\n"sampler" = ["x"]\n')
    with debug_messages("nanovllm.core.plugins_toml") as messages:
        plugins = load_plugins()
    text = "\n".join(messages)
    for expected in ["order names 'cdua', which no loaded plugin offers",
                     "disabled names 'nosuch', which is no installed plugin",
                     "disabled_kernels names 'cpu_ref/nope', which no plugin registers",
                     "unknown key 'frobnicate' in [backends] is ignored",
                     "[kernels.cpu_ref] names unknown op 'attention.decod'",
                     "'attention.decode' names kernel 'missing_kernel', which no plugin registers for cpu_ref",
                     "[kernels.nosuchbackend]: no loaded plugin offers backend 'nosuchbackend'"]:
        assert expected in text
    assert "cpu_ref" in plugins.backends  # warnings only: everything else still loads


def test_the_packaged_file_and_a_valid_user_file_give_no_warning(tmp_path, monkeypatch):
    user_file(tmp_path, monkeypatch, '[kernels.cpu_ref]\n"attention.decode" = ["torch_loop"]\n')
    with debug_messages("nanovllm.core.plugins_toml") as messages:
        load_plugins()
    assert messages == []
