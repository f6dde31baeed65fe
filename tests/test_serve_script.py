"""scripts/serve as a user runs it: its function processes never outlive it, and a function that cannot
start ends it with that function's reason in one line."""
import pytest
from clip import config


@pytest.mark.parametrize("name, value, kind", [("CLIP_MAX_BATCH", "abc", "a whole number"),
                                               ("CLIP_DEADLINE_S", "soon", "a number")])
def test_a_setting_that_is_not_a_number_is_named_in_one_line(monkeypatch, name, value, kind):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as error:
        config.from_env()
    assert str(error.value) == f"{name} must be {kind}, not {value!r}"
