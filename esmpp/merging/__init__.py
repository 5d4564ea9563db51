"""Static merge methods behind a registry; importing this package registers all of them."""

from esmpp.merging import averaging, esm, iso_c, iso_cts, task_arithmetic, ties, tsv  # noqa: F401
from esmpp.merging.base import LayerStats, MergeMethod
from esmpp.merging.merge import merge_task_vectors
from esmpp.merging.registry import available_methods, check_run_options, get_method, options_share, register_method

__all__ = [
    "LayerStats",
    "MergeMethod",
    "available_methods",
    "check_run_options",
    "get_method",
    "merge_task_vectors",
    "options_share",
    "register_method",
]
