"""The template host's settings (template/python3-debian/settings.py): one declaration per variable, read
and checked once at start; a bad value stops the function with one line naming the variable, the value
given and what is allowed, and exit status 78 (EX_CONFIG), never a traceback."""
from pathlib import Path

import pytest
import settings
from settings import Setting, SettingError, read

from localrun import FunctionProcess
from localrun.functions import FUNCTION_DIRS
from localrun.processes import wait_until

FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")

BATCH = Setting("CLIP_MAX_BATCH", int, 0, minimum=0, maximum=256)


def one_line(setting, value):
    with pytest.raises(SettingError) as caught:
        read([setting], {setting.name: value})
    return str(caught.value)


# ---- unit: values in, values or one line out -------------------------------------------------------

@pytest.mark.parametrize("setting, value, expected", [
    (BATCH, "eight", "CLIP_MAX_BATCH must be a whole number from 0 to 256, not 'eight'"),
    (BATCH, "257", "CLIP_MAX_BATCH must be a whole number from 0 to 256, not '257'"),
    (BATCH, "1.5", "CLIP_MAX_BATCH must be a whole number from 0 to 256, not '1.5'"),
    (Setting("N", int, 1, minimum=1), "0", "N must be a whole number of at least 1, not '0'"),
    (Setting("N", int, 1, maximum=9), "10", "N must be a whole number of at most 9, not '10'"),
    (Setting("N", int, 1), "x", "N must be a whole number, not 'x'"),
    (Setting("T", float, 1.0, minimum=0, maximum=0.5), "0.75", "T must be a number from 0 to 0.5, not '0.75'"),
    (Setting("T", float, 1.0, minimum=0), "nan", "T must be a number of at least 0, not 'nan'"),
    (Setting("T", float, 1.0), "inf", "T must be a number, not 'inf'"),
    (Setting("CLIP_DTYPE", str, "auto", choices=("auto", "fp32", "bf16", "fp16")), "fp64",
     "CLIP_DTYPE must be one of auto, fp32, bf16, fp16, not 'fp64'"),
    (Setting("B", bool, False), "maybe", "B must be true or false (also 1/0, yes/no, on/off), not 'maybe'"),
    (Setting("SETS", "list", (), choices=("cifar10", "cifar100")), "cifar10, mnist",
     "SETS must be a comma-separated list of cifar10, cifar100, not 'cifar10, mnist'"),
])
def test_a_bad_value_is_one_line_naming_the_variable_the_value_and_what_is_allowed(setting, value, expected):
    assert one_line(setting, value) == expected


def test_a_pasted_file_is_not_the_line():
    line = one_line(BATCH, "x" * 10_000 + "\nsecond line")
    assert "\n" not in line and len(line) < 200 and line.startswith("CLIP_MAX_BATCH must be")


@pytest.mark.parametrize("setting, value, expected", [
    (BATCH, " 8 ", 8),
    (BATCH, "", 0),  # empty: the default
    (BATCH, "   ", 0),
    (Setting("T", float, 1.0, minimum=0), "0.25", 0.25),
    (Setting("CLIP_DTYPE", str, "auto", choices=("auto", "fp32")), "FP32", "fp32"),
    (Setting("LOG_LEVEL", str, "INFO", choices=("DEBUG", "INFO")), "debug", "DEBUG"),
    (Setting("NAME", str, "x"), " free text ", "free text"),
    (Setting("B", bool, False), "Yes", True),
    (Setting("B", bool, True), "0", False),
    (Setting("HOSTS", "list", ()), " a.example, ,b.example,", ("a.example", "b.example")),
    (Setting("SETS", "list", ("cifar100",), choices=("cifar10", "cifar100")), "CIFAR10", ("cifar10",)),
])
def test_good_values_are_read_as_their_kind(setting, value, expected):
    assert read([setting], {setting.name: value}) == {setting.name: expected}


def test_unset_variables_take_their_defaults():
    assert read([BATCH, Setting("T", float, 2.5)], {}) == {"CLIP_MAX_BATCH": 0, "T": 2.5}


def test_a_declaration_of_an_unknown_kind_is_refused():
    with pytest.raises(TypeError):
        Setting("X", list, ())


def test_the_hosts_own_settings_have_one_default_each(monkeypatch):
    for declared in settings.HOST_SETTINGS:
        monkeypatch.delenv(declared.name, raising=False)
    settings.host.cache_clear()
    try:
        values = settings.host()
        assert values["MAX_BODY_BYTES"] == 32 * 1024 * 1024
        assert (values["FUNCTION_PORT"], values["FUNCTION_THREADS"], values["FUNCTION_WORKERS"]) == (5000, 48, 1)
        monkeypatch.setenv("MAX_BODY_BYTES", "1000")
        assert settings.host()["MAX_BODY_BYTES"] == 32 * 1024 * 1024, "read once"
    finally:
        settings.host.cache_clear()


# ---- the real host: a bad value ends it at start, with its line and 78 -------------------------------

def run_until_exit(tmp_path, env):
    """The probe function's host alone (no watchdog: its own exit status), run until it ends."""
    fn = FunctionProcess("probe", tmp_path, env)
    fn.start(wait_ready=False)
    try:
        wait_until(lambda: fn.process.poll() is not None, 60, what="the host to exit")
        return fn.process.returncode, fn.output()
    finally:
        fn.stop()


@pytest.mark.parametrize("env, line", [
    ({"PROBE_SLEEP_CAP_S": "ten"}, "PROBE_SLEEP_CAP_S must be a number from 0 to 60, not 'ten'"),  # the function's
    ({"MAX_BODY_BYTES": "32MB"}, "MAX_BODY_BYTES must be a whole number of at least 1, not '32MB'"),  # the host's
    ({"FUNCTION_WORKERS": "2", "PROBE_SLEEP_CAP_S": "-1"},  # in a worker: the function ends with it too
     "PROBE_SLEEP_CAP_S must be a number from 0 to 60, not '-1'"),
])
def test_a_bad_setting_stops_the_host_at_start_with_one_line_and_status_78(tmp_path, env, line):
    status, output = run_until_exit(tmp_path, env)
    assert status == 78, output
    assert "Traceback" not in output, output
    errors = {text.partition(" ERROR ")[2] for text in output.splitlines() if " ERROR " in text}
    assert errors == {line}, output  # each worker says the same line
