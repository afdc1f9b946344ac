"""The one registry shape: register, look up, list, and the errors that name the choices."""

import pytest

from mist_fed.errors import ConfigError, TaskError
from mist_fed.registry import Registry


def test_register_and_add_file_values_under_names() -> None:
    # Prepare
    reg: Registry[int] = Registry("number")

    # Execute
    @reg.register("two")
    def _two() -> int:
        return 2

    reg.add("one", lambda: 1)

    # Assert
    assert reg.get("two") is _two and reg.get("one")() == 1
    assert "one" in reg and "three" not in reg
    assert reg.names() == ["one", "two"] and len(reg) == 2


def test_unknown_name_lists_the_choices() -> None:
    # Prepare
    reg: Registry[str] = Registry("edge block")
    reg.add("mlp", "m")
    reg.add("lae", "l")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"unknown edge block 'nope'; choose one of lae, mlp$"):
        reg.get("nope")
    with pytest.raises(ConfigError, match="choose one of none"):
        Registry[str]("gather").get("x")


def test_duplicate_name_is_an_error_and_keeps_the_first() -> None:
    # Prepare
    reg: Registry[str] = Registry("task", TaskError)
    reg.add("a", "first")
    # Execute / Assert
    with pytest.raises(TaskError, match="task 'a' is already registered"):
        reg.add("a", "second")
    with pytest.raises(TaskError, match="already registered"):
        reg.register("a")("third")
    assert reg.get("a") == "first"


def test_the_project_registries_are_registries() -> None:
    import mist_fed.data  # noqa: F401  (registers the tasks)
    from mist_fed.cloud.backbone import _BACKBONES, registered_backbones
    from mist_fed.cloud.gather import _GATHER_FNS
    from mist_fed.core.edge_nets import _BLOCKS, _NETS
    from mist_fed.data.tasks import _TASKS

    registered_backbones()  # the built-in backbones register on first use, not on import
    for reg in (_TASKS, _BACKBONES, _GATHER_FNS, _BLOCKS, _NETS):
        assert isinstance(reg, Registry) and len(reg) > 0
