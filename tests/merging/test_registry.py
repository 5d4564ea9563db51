import pytest

from esmpp.errors import ConfigError
from esmpp.merging import (
    MergeMethod,
    available_methods,
    check_run_options,
    get_method,
    options_share,
    register_method,
)
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


def test_options_set_for_a_run_go_to_the_methods_that_have_them():
    given = {"rank_fraction": 0.5, "keep_fraction": 0.3}
    assert options_share(get_method("esm"), given) == {"rank_fraction": 0.5}
    assert options_share(get_method("ties"), given) == {"keep_fraction": 0.3}
    assert options_share(get_method("tsv"), given) == {}
    check_run_options(["esm", "ties", "tsv"], given)


def test_a_run_option_no_method_has_or_an_invalid_value_is_refused_before_the_run():
    with pytest.raises(
        ConfigError,
        match=r"'rank_fraction' is an option of none.*tsv: rank_per_task; task_arithmetic: none.*esmpp methods",
    ):
        check_run_options(["tsv", "task_arithmetic"], {"rank_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"Invalid options for merge method 'esm'.*rank_fraction"):
        check_run_options(["esm", "tsv"], {"rank_fraction": 2.0})  # a share of d_out: at most 1


def test_a_method_named_twice_is_listed_once_in_the_unknown_option_error():
    """esm++ builds on esm: a run of both used to list esm's options twice."""
    with pytest.raises(ConfigError) as refused:
        check_run_options(["esm", "tsv", "esm"], {"magic": 1})
    assert str(refused.value).count("esm:") == 1
