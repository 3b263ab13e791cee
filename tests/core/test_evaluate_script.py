"""Bad options of scripts/evaluate_digit_model.py stop it before ComfyUI starts, with a message that names the value."""

from pathlib import Path

import pytest

from tests.script_module import loaded_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_digit_model.py"


@pytest.fixture(scope="module")
def script():
    with loaded_script(SCRIPT, "evaluate_digit_model") as module:
        yield module


@pytest.mark.parametrize(("argv", "message"), [
    (["--count", "0"], "--count must be at least 1, got 0"),
    (["--steps", "-2"], "--steps must be at least 1, got -2"),
    (["--confidence", "1.5"], "--confidence must lie strictly between 0 and 1, got 1.5"),
    (["no_such_model.safetensors"], "model file(s) not found: no_such_model.safetensors"),
])
def test_bad_option_rejected(script, capsys, argv, message):
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert message in capsys.readouterr().err


def test_default_is_shipped_model_a(script):
    args = script.parse_args([])
    assert args.models == [script.DEFAULT_MODEL]
    assert args.seeds == [0, 1, 2, 3]
