import pytest

from rl.errors import UnknownNameError
from rl.registry import Registry


def test_register_get_and_helpful_unknown_name():
    reg = Registry("loss")

    @reg.register("gspo")
    def gspo():
        return 1

    assert reg.get("gspo") is gspo and "gspo" in reg and reg.names() == ["gspo"]
    with pytest.raises(UnknownNameError, match=r"unknown loss 'gsop'; did you mean 'gspo'\? Known: gspo"):
        reg.get("gsop")


def test_double_registration_is_an_error():
    reg = Registry("thing")
    reg.register("a")(object())
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(object())


def test_builtin_modules_load_lazily():
    reg = Registry("alias", builtin_modules=("rl.models",))
    assert reg._loaded is False
    reg.names()
    assert reg._loaded is True
