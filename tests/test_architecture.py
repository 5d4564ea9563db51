from __future__ import annotations

import pytest

from esmpp.architecture import Architecture
from esmpp.errors import ArchitectureError


def test_a_description_round_trips() -> None:
    arch = Architecture.from_name("ViT-B-32")
    assert Architecture.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize(
    "data",
    [3, None, [1, 2], "ViT-B-32", {"embed_dim": 512}, {"embed_dim": "wide", "vision": {}}, {"vision": {}}],
    ids=["number", "null", "list", "string", "no vision", "embed_dim not a number", "no embed_dim"],
)
def test_an_invalid_description_is_an_architecture_error(data: object) -> None:
    """Descriptions come from files (manifests, checkpoint metadata): a wrong type is a one-line error too."""
    with pytest.raises(ArchitectureError, match="Invalid architecture description"):
        Architecture.from_dict(data)  # type: ignore[arg-type]


def test_an_unknown_name_lists_open_clip_names_and_offers_no_option_that_does_not_exist() -> None:
    with pytest.raises(ArchitectureError) as refused:
        Architecture.from_name("ViT-X")
    assert "'ViT-X'" in str(refused.value) and "ViT-B-32" in str(refused.value)
    assert "JSON" not in str(refused.value)  # no command or config takes a JSON architecture file
