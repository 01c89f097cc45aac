"""Registries: register, create by name, list, plugins, and the errors on unknown names or
parameters."""
import sys

import pytest

from benchmark import registry
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
    with pytest.raises(ValueError, match="widget 'square' is registered twice"):
        reg.register("square")(lambda side: side)


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


# Plugins ------------------------------------------------------------------------------------
# The README's example plugin, as another package would ship it.
PLUGIN_SOURCE = '''
"""A third-party method: random over-sampling of the embeddings."""
from benchmark.methods import Method
from benchmark.registry import METHODS


@METHODS.register("random-over")
class RandomOver(Method):
    """Random over-sampling of the embeddings, then the head is retrained."""

    def embedding_resampler(self, random_state):
        from imblearn.over_sampling import RandomOverSampler

        return RandomOverSampler(random_state=random_state)
'''


def install(site, distribution: str, module: str, source: str) -> None:
    """An installed distribution as importlib.metadata sees one: the module next to a
    ``*.dist-info`` folder with its metadata and entry points, in a folder on sys.path."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{distribution}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.PLUGIN_GROUP}]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder of installed distributions on sys.path; the registries, the modules imported
    from it and the plugin state are as before once the test ends."""
    folder = tmp_path / "site"
    folder.mkdir()
    registry.load_plugins()
    for reg in (DATASETS, BACKBONES, LOSSES, METHODS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(folder) in sys.modules[name].__file__:
            del sys.modules[name]
    monkeypatch.undo()
    registry.reload_plugins()


def test_plugin_method_is_listed_and_created(site, capsys):
    from benchmark.__main__ import main
    from benchmark.methods import Method

    install(site, "mymethods", "mymethods", PLUGIN_SOURCE)
    assert "random-over" not in METHODS._entries
    registry.reload_plugins()
    capsys.readouterr()
    assert main(["list"]) == 0
    listed = capsys.readouterr()
    methods = listed.out.split("methods:\n", 1)[1].splitlines()
    assert ["random-over", "Random over-sampling of the embeddings, then the head is retrained."] \
        in [line.strip().split(None, 1) for line in methods]
    assert listed.err == ""
    method = METHODS.create("random-over")
    assert isinstance(method, Method)
    X, y = [[0.0], [1.0], [2.0], [3.0]], [0, 0, 0, 1]
    assert list(method.embedding_resampler(0).fit_resample(X, y)[1]).count(1) == 3
    # Loading again imports nothing twice and registers nothing twice.
    registry.reload_plugins()
    assert "random-over" in METHODS


def test_registering_again_replaces_only_the_same_definition():
    reg = Registry("widget")

    def make():
        """A widget."""

    reg.register("w")(make)
    reg.register("w")(make)  # the same module's same function: a module imported again
    assert reg.get("w") is make

    def other():
        """Another widget."""

    with pytest.raises(ValueError, match="registered twice"):
        reg.register("w")(other)


def test_broken_plugin_warns_once_and_the_rest_works(site, mlflow_store, capsys):
    from benchmark.__main__ import main

    install(site, "broken-plugin", "brokenplugin", "import no_such_module_here\n")
    install(site, "mymethods", "mymethods", PLUGIN_SOURCE)
    registry.reload_plugins()
    err = capsys.readouterr().err
    assert err == ("warning: plugin 'brokenplugin' (brokenplugin) failed to import and is left "
                   "out: ModuleNotFoundError: No module named 'no_such_module_here'\n")
    assert main(["list"]) == 0
    listed = capsys.readouterr()
    assert "random-over" in listed.out and "eos" in listed.out and listed.err == ""
    with pytest.raises(UnknownNameError, match="plugin 'brokenplugin' failed to import "
                                               r"\(ModuleNotFoundError: .*\) and may provide it"):
        METHODS.get("my-broken-method")
    assert main(["run", "--method", "my-broken-method"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'my-broken-method'") and err.count("\n") == 1
    assert "brokenplugin" in err
