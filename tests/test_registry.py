"""Registries: register, create by name, list, and the errors on unknown names or parameters."""
import pytest

from benchmark.errors import UserError
from benchmark.registry import BACKBONES, DATASETS, LOSSES, METHODS, Registry, UnknownNameError


def test_register_create_and_list():
    reg = Registry("widget")

    @reg.register("square")
    def square(side: int = 2):
        """A square of the given side."""
        return side * side

    assert reg.create("square", side=3) == 9
    assert reg.names() == ["square"]
    assert reg.describe() == [("square", "A square of the given side.")]
    with pytest.raises(ValueError):
        reg.register("square")(square)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        METHODS.get("eso")
    assert "unknown method 'eso'" in str(err.value)
    for name in ("eos", "eos-ref", "smote", "bsmote", "balsvm", "none"):
        assert name in str(err.value)


def test_family_entry_receives_member_name():
    reg = Registry("model")

    @reg.register("zoo:")
    def zoo(member: str, size: int = 1):
        """Any member of the zoo."""
        return (member, size)

    assert reg.create("zoo:lion", size=4) == ("lion", 4)
    with pytest.raises(UnknownNameError):
        reg.get("park:lion")


def test_check_params_rejects_unknown_keywords():
    BACKBONES.check_params("resnet32", {})
    with pytest.raises(UserError, match="takes no parameter widen_factor"):
        BACKBONES.check_params("resnet32", {"widen_factor": 2})


def test_every_entry_has_a_description():
    for registry in (DATASETS, BACKBONES, LOSSES, METHODS):
        for name, text in registry.describe():
            assert text, f"{registry.kind} {name} has no description"
