"""rnan_jax.cli.run: what every command-line entry point does with a misuse and with Ctrl-C."""
import pytest
from absl import app

from rnan_jax import cli


def _run(main, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/somewhere/rnan_jax/upscale.py"])
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    return e.value.code, capsys.readouterr().err


def test_ctrl_c_ends_in_one_line_with_status_130(monkeypatch, capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert _run(main, monkeypatch, capsys) == (130, "\nupscale: interrupted\n")


def test_a_usage_error_is_one_line_naming_the_program(monkeypatch, capsys):
    def main(argv):
        raise app.UsageError("--overlap (8) must be smaller than --tile (8)")

    code, err = _run(main, monkeypatch, capsys)
    assert (code, err) == ("upscale: error: --overlap (8) must be smaller than --tile (8) (see --helpshort)", "")
