import pytest

from esmpp.errors import ConfigError
from esmpp.merging import MergeMethod, available_methods, get_method, register_method
from esmpp.merging.ties import Ties, TiesOptions


def test_all_methods_are_registered():
    assert set(available_methods()) == {
        "averaging",
        "task_arithmetic",
        "ties",
        "tsv",
        "iso_c",
        "iso_cts",
        "esm",
    }
    for name in available_methods():
        method = get_method(name)
        assert issubclass(method, MergeMethod)
        assert method.name == name
        assert method.needs_grams == (name == "esm")
        method.Options()  # every option has a default


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"Unknown merge method 'tsvm'.*averaging.*tsv"):
        get_method("tsvm")


def test_a_second_method_with_a_taken_name_is_refused():
    class Impostor(Ties):
        name = "ties"

    with pytest.raises(ValueError, match="registered twice"):
        register_method(Impostor)


def test_options_from_mapping_model_or_defaults():
    assert Ties({"keep_fraction": 0.5}, num_tasks=2).options.keep_fraction == 0.5
    assert Ties(TiesOptions(keep_fraction=0.3), num_tasks=2).options.keep_fraction == 0.3
    assert Ties(None, num_tasks=2).options == TiesOptions()


@pytest.mark.parametrize("options", [{"keep_fraction": 2.0}, {"keep_fraction_typo": 0.1}])
def test_invalid_options_name_the_method_and_its_options(options):
    with pytest.raises(ConfigError, match=r"'ties'.*keep_fraction"):
        Ties(options, num_tasks=2)


def test_num_tasks_must_be_positive():
    with pytest.raises(ConfigError, match="num_tasks"):
        Ties(None, num_tasks=0)
