"""The ESM++ build on synthetic fine-tunes of a tiny model (the zoo-based end-to-end test is in tests/zoo)."""

import dataclasses
import gc
import tempfile
import weakref
from functools import partial
from pathlib import Path
from typing import NoReturn

import pytest
import torch

import esmpp.build
import esmpp.spill
from esmpp.architecture import build_visual, linear_keys
from esmpp.build import BuildOptions, build_artifact
from esmpp.capture import ActivationStats, capture_statistics
from esmpp.checkpoints import Encoder
from esmpp.errors import ConfigError
from esmpp.experts import residual_expert, task_prototypes
from esmpp.merge import TaskSource, apply_task_vector, batches, golden_section_search, merge_streaming
from esmpp.merging import LayerStats, get_method, merge_task_vectors
from tests.conftest import TINY_ARCH


def _finetune(pretrained: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fine-tune-like perturbation: low rank plus small noise on matrices, small noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in pretrained.items():
        if weight.ndim == 2 and min(weight.shape) > 4:
            low_rank = torch.randn(weight.shape[0], 4, generator=generator) @ torch.randn(
                4, weight.shape[1], generator=generator
            )
            delta = scale * low_rank / 4 + 0.1 * scale * torch.randn(weight.shape, generator=generator)
        else:
            delta = 0.1 * scale * torch.randn(weight.shape, generator=generator)
        state[key] = weight + delta
    return state


def _task_images(task: int, count: int, seed: int) -> torch.Tensor:
    """Images of a task: the task's own template plus a little noise."""
    template = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + task))
    return template + 0.1 * torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tasks(num_tasks: int, pretrained: Encoder) -> list[TaskSource]:
    tasks = []
    for t in range(num_tasks):
        state = _finetune(pretrained.state, seed=100 + t)
        tasks.append(
            TaskSource(
                name=f"task{t}",
                load=lambda state=state, t=t: Encoder(TINY_ARCH, state, f"finetuned-{t}"),
                proxy=partial(_task_images, t, 6, 0),
                proxy_count=6,
                head=torch.randn(3, TINY_ARCH.embed_dim, generator=torch.Generator().manual_seed(50 + t)),
                classes=["a", "b", "c"],
            )
        )
    return tasks


def _long_work(*args, **kwargs) -> NoReturn:
    """Stands in for the build's long work in tests of errors that must come before it."""
    raise AssertionError("the long work started before the inputs were checked")


@pytest.fixture
def pretrained() -> Encoder:
    torch.manual_seed(0)
    return Encoder(TINY_ARCH, build_visual(TINY_ARCH).state_dict(), "pretrained")


@pytest.mark.parametrize("kinds", [("qkv", "out", "fc", "proj"), ("patch", "qkv", "out", "fc", "proj")])
def test_one_task_with_full_rank_experts_reproduces_the_fine_tuned_model(pretrained, kinds):
    tasks = _tasks(1, pretrained)
    options = BuildOptions(alpha=1.0, rank=TINY_ARCH.width, routed_kinds=kinds)  # min(d_in, d_out) of every layer
    artifact = build_artifact(pretrained, tasks, options, progress=False)
    finetuned = tasks[0].load().to_module()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        routed = artifact.to_model()(images).embedding
        expected = finetuned(images)
    assert (routed - expected).abs().max() <= 1e-4


def test_build_is_deterministic_and_records_its_choices(pretrained):
    options = BuildOptions(alpha=0.8, rank=4)
    first = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    second = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    for key, layer in first.experts.items():
        assert torch.equal(layer.up, second.experts[key].up) and torch.equal(layer.down, second.experts[key].down)
        assert layer.up.shape == (3, first.backbone[key].shape[0], 4)
        assert layer.prototypes.shape == (3, 1, first.backbone[key].shape[1])
    assert first.build["alpha"] == 0.8 and first.build["method"] == "esm" and first.build["rank"] == 4
    assert set(first.timings) == {"merge", "alpha", "experts", "prototypes"} and "seconds" not in first.build
    assert first.build["router"] == "cosine" and all(layer.prototype_bias is None for layer in first.experts.values())


def test_runtime_prototypes_and_several_prototypes_per_task(pretrained):
    options = BuildOptions(alpha=1.0, rank=2, prototype_source="runtime", prototypes_per_task=2)
    artifact = build_artifact(pretrained, _tasks(2, pretrained), options, progress=False)
    for layer in artifact.experts.values():
        assert layer.prototypes.shape[:2] == (2, 2)
        torch.testing.assert_close(layer.prototypes.norm(dim=-1), torch.ones(2, 2))


@pytest.mark.parametrize(("router", "source"), [("cosine", "finetuned"), ("discriminant", "runtime")])
def test_routing_follows_distinct_proxy_distributions(pretrained, router, source):
    """Tasks whose images differ strongly are routed to their own experts."""
    options = BuildOptions(alpha=0.5, rank=4, router=router, prototype_source=source)
    artifact = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    model = artifact.to_model()
    with torch.no_grad():
        for t in range(3):
            images = _task_images(t, count=5, seed=1)
            assert model(images).task.tolist() == [t] * 5


def test_discriminant_router_is_fitted_on_every_tasks_proxy_features(pretrained):
    options = BuildOptions(alpha=1.0, rank=2, router="discriminant", prototype_source="runtime", prototypes_per_task=2)
    artifact = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    assert artifact.build["router"] == "discriminant"
    for layer in artifact.experts.values():
        assert layer.prototypes.shape[:2] == layer.prototype_bias.shape == (3, 2)
        # LDA weights Σ⁻¹μ are not unit prototypes, and every bias −½ μᵀΣ⁻¹μ is negative
        assert not torch.allclose(layer.prototypes.norm(dim=-1), torch.ones(3, 2))
        assert (layer.prototype_bias < 0).all()


def test_patch_experts_restore_the_fine_tuned_patch_embedding_with_the_task_forced(pretrained):
    """At α = 0 the backbone is the pretrained model; a full-rank patch expert puts back the fine-tuned
    patch embedding exactly (up to the float32 ESD) when the task is forced."""
    tasks = _tasks(2, pretrained)
    options = BuildOptions(alpha=0.0, rank=TINY_ARCH.width, routed_kinds=("patch",))
    model = build_artifact(pretrained, tasks, options, progress=False).to_model()
    images = torch.randn(3, 3, 16, 16)
    outputs = []
    model.visual.conv1.register_forward_hook(lambda module, args, output: outputs.append(output))
    for t, task in enumerate(tasks):
        expected = torch.nn.functional.conv2d(images, task.load().state["conv1.weight"], stride=8)
        with torch.no_grad():
            model(images, torch.full((3,), t))
        torch.testing.assert_close(outputs[-1], expected, atol=1e-4, rtol=1e-4)


def test_alpha_search_uses_validation_data(pretrained):
    tasks = _tasks(2, pretrained)
    for t, task in enumerate(tasks):
        task.validation = (_task_images(t, count=8, seed=2), torch.randint(0, 3, (8,)))
    artifact = build_artifact(pretrained, tasks, BuildOptions(rank=2, alpha_evaluations=4), progress=False)
    assert len(artifact.build["alpha_history"]) == 4
    assert 0.0 <= artifact.build["alpha"] <= 2.0


def test_validation_data_of_only_some_tasks_is_refused_before_the_merge_unless_alpha_is_given(pretrained, monkeypatch):
    tasks = _tasks(3, pretrained)
    tasks[1].validation = (_task_images(1, count=4, seed=2), torch.randint(0, 3, (4,)))
    with monkeypatch.context() as patched:
        patched.setattr("esmpp.build.merge_streaming", _long_work)
        with pytest.raises(ConfigError, match=r"tasks \['task0', 'task2'\] have no validation data .*\(--alpha\)"):
            build_artifact(pretrained, tasks, BuildOptions(rank=2), progress=False)
    given = build_artifact(pretrained, tasks, BuildOptions(rank=2, alpha=0.5), progress=False)
    assert given.build["alpha"] == 0.5 and given.build["alpha_history"] == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda tasks: setattr(tasks[0], "proxy", lambda: torch.zeros(0, 3, 16, 16)), "no proxy images"),
        (lambda tasks: setattr(tasks[0], "head", None), "no head"),
        (lambda tasks: tasks.clear(), "no tasks"),
    ],
)
def test_bad_build_inputs_are_named(pretrained, change, message):
    tasks = _tasks(1, pretrained)
    change(tasks)
    with pytest.raises(ConfigError, match=message):
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0), progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(routed_kinds=("mlp",)), "routed_kinds.0: Input should be 'patch'"),
        (BuildOptions(routed_kinds=()), "routed_kinds: List should have at least 1 item"),
        (BuildOptions(rank_energy=1.5), "rank_energy"),
        (BuildOptions(router="knn"), "router: Input should be 'cosine' or 'discriminant'"),
        (BuildOptions(alpha=float("nan")), "alpha: Input should be a finite number"),
        (BuildOptions(alpha=-3.0), "alpha: Input should be greater than or equal to 0"),
        (BuildOptions(alpha=1e39), "alpha: Input should be less than or equal to 10"),  # its backbone: not finite
        (BuildOptions(router_shrinkage=float("inf")), "router_shrinkage: Input should be a finite number"),
        (BuildOptions(method_options={"scale_factor": float("inf")}), "scale_factor: Input should be a finite number"),
        (BuildOptions(router="discriminant", prototype_source="runtime", router_shrinkage=1.5), "router_shrinkage"),
        # pydantic's "Value error, " prefix is not shown: the message is ours.
        (BuildOptions(router="discriminant"), r"options: the discriminant router .* prototype_source='runtime'"),
        (BuildOptions(rank=33), r"rank 33 is more than the 32 directions .*: set `rank` \(--rank\) to at most 32"),
        (BuildOptions(rank=100_000, routed_kinds=("patch",)), r"rank 100000 .* routed layers \(patch\)"),
        # The rule of every build, not only of config ones: the task's proxy count is known before its images load.
        (
            BuildOptions(prototypes_per_task=7),
            r"prototypes_per_task 7 is more than the 6 proxy images of task 'task0': .* at most 6, or give the task",
        ),
    ],
)
def test_bad_options_are_named_before_the_merge(pretrained, options, message, monkeypatch):
    monkeypatch.setattr("esmpp.build.merge_streaming", _long_work)
    with pytest.raises(ConfigError, match=message):
        build_artifact(pretrained, _tasks(1, pretrained), options, progress=False)


def test_repeated_task_names_are_refused_before_the_merge(pretrained, monkeypatch):
    monkeypatch.setattr("esmpp.build.merge_streaming", _long_work)
    tasks = [dataclasses.replace(task, name="cars") for task in _tasks(2, pretrained)]
    with pytest.raises(ConfigError, match=r"tasks named more than once: cars\. Give each task its own name\."):
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)


def test_a_task_source_need_not_know_its_proxy_count(pretrained):
    """proxy_count is optional (TaskSources written before it existed still build); the images are counted as
    they load."""
    tasks = [dataclasses.replace(task, proxy_count=None) for task in _tasks(2, pretrained)]
    artifact = build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)
    assert [task.name for task in artifact.tasks] == ["task0", "task1"]


@pytest.mark.parametrize("method", ["esm", "task_arithmetic"])  # images loaded in the merge, or first for experts
def test_more_prototypes_than_the_images_of_a_task_of_unknown_proxy_count_are_refused_as_they_load(
    pretrained, method, monkeypatch
):
    """They used to fail after the merge, in task_prototypes, with a raw ValueError."""
    tasks = [dataclasses.replace(task, proxy_count=None) for task in _tasks(2, pretrained)]
    tasks[0].proxy = partial(_task_images, 0, 2, 0)
    for work in ("esmpp.merge.capture_blockwise", "esmpp.build.capture_statistics", "esmpp.build.residual_expert"):
        monkeypatch.setattr(work, _long_work)
    with pytest.raises(
        ConfigError,
        match=r"^prototypes_per_task 3 is more than the 2 proxy images of task 'task0': set `prototypes_per_task` "
        r"\(--prototypes-per-task\) to at most 2, or give the task more proxy images\.$",
    ):
        build_artifact(
            pretrained, tasks, BuildOptions(alpha=1.0, rank=2, prototypes_per_task=3, method=method), progress=False
        )


def test_a_proxy_count_the_images_contradict_is_refused_when_they_load(pretrained):
    tasks = [dataclasses.replace(task, proxy_count=32) for task in _tasks(2, pretrained)]  # each gives 6
    with pytest.raises(ConfigError, match="task 'task0': its proxy gave 6 images, its proxy_count says 32"):
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)


def test_golden_section_finds_the_peak():
    alpha, history = golden_section_search(lambda a: -((a - 0.7) ** 2), 0.0, 2.0, evaluations=20)
    assert abs(alpha - 0.7) < 1e-3 and len(history) == 20


# The lean build (proxy images loaded per task, statistics captured block by block, ESM's per-task
# subspaces parked on disk) against the straightforward one it replaces.


def _reference_build(
    pretrained: Encoder, tasks: list[TaskSource], options: BuildOptions
) -> tuple[dict[str, torch.Tensor], dict[str, list[tuple[torch.Tensor, ...]]]]:
    """Backbone and, per routed key, each task's (up, down, prototypes, retained shares) at ``options.rank``,
    computed with every block's statistics of a task captured at once and every ESM summary in memory."""
    keys = linear_keys(pretrained.arch)
    deltas: dict[str, list[torch.Tensor]] = {key: [] for key in pretrained.state}
    stats: dict[str, list[LayerStats]] = {key: [] for key in keys}
    captured = []
    for task in tasks:
        finetuned = task.load()
        task_stats = capture_statistics(finetuned.to_module(), batches(task.proxy(), options.batch_size), keys)
        captured.append(task_stats)
        for key, weight in pretrained.state.items():
            deltas[key].append(finetuned.state[key] - weight)
        for key in keys:
            stats[key].append(LayerStats(task_stats[key].gram, task_stats[key].mean, task_stats[key].num_tokens))
    backbone = apply_task_vector(pretrained.state, merge_task_vectors("esm", deltas, stats), options.alpha)
    experts: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for key in linear_keys(pretrained.arch, options.routed_kinds):
        for task, task_stats in zip(tasks, captured, strict=True):
            residual = task.load().state[key] - backbone[key]
            up, down, retained = residual_expert(
                residual, task_stats[key].gram, task_stats[key].num_tokens, options.rank
            )
            prototypes = task_prototypes(task_stats[key].image_means)
            experts.setdefault(key, []).append((up, down, prototypes, retained))
    return backbone, experts


def test_lean_build_equals_the_in_memory_build(pretrained, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where ESM parks its summaries
    tasks = _tasks(3, pretrained)
    options = BuildOptions(alpha=0.7, rank=3, batch_size=4)  # 6 proxy images: two batches
    artifact = build_artifact(pretrained, tasks, options, progress=False)
    backbone, experts = _reference_build(pretrained, tasks, options)
    for key, weight in backbone.items():
        torch.testing.assert_close(artifact.backbone[key], weight, msg=key)
    for key, per_task in experts.items():
        for t, (up, down, prototypes, _) in enumerate(per_task):
            torch.testing.assert_close(artifact.experts[key].up[t], up)
            torch.testing.assert_close(artifact.experts[key].down[t], down)
            torch.testing.assert_close(artifact.experts[key].prototypes[t], prototypes)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("method", "options", "kinds"),
    [("esm", {}, ("qkv", "fc", "proj")), ("esm", {"esd_kinds": ("fc",)}, ("fc",)), ("tsv", {}, ())],
)
def test_the_merge_captures_only_the_layers_its_method_reads_and_shows_them(pretrained, method, options, kinds):
    seen: list[tuple[int, str, bool]] = []
    merge_method = get_method(method)(options, num_tasks=2)
    merge_streaming(
        pretrained,
        _tasks(2, pretrained),
        merge_method,
        progress=False,
        on_statistics=lambda t, key, stats: seen.append((t, key, stats.projected)),
    )
    narrowing = set(linear_keys(pretrained.arch, ("proj",)))  # ESM takes the moment of their shift
    expected = [(t, key, key in narrowing) for t in range(2) for key in linear_keys(pretrained.arch, kinds)]
    assert seen == expected


def test_rank_energy_gives_each_layer_the_fewest_directions_that_every_task_needs(pretrained):
    tasks = _tasks(3, pretrained)
    options = BuildOptions(alpha=0.7, rank=12, rank_energy=0.9)
    artifact = build_artifact(pretrained, tasks, options, progress=False)
    _, experts = _reference_build(pretrained, tasks, options)  # every task's expert at rank 12
    ranks = {}
    for key, per_task in experts.items():
        rank = ranks[key] = artifact.experts[key].up.shape[2]
        shares = [float(retained[rank - 1]) for *_, retained in per_task]
        fewer = [float(retained[rank - 2]) for *_, retained in per_task] if rank > 1 else [0.0]
        assert min(shares) >= 0.9 - 1e-9 and min(fewer) < 0.9, (key, rank, shares, fewer)
        for t, (up, down, *_) in enumerate(per_task):
            torch.testing.assert_close(artifact.experts[key].up[t], up[:, :rank])
            torch.testing.assert_close(artifact.experts[key].down[t], down[:rank])
    assert max(ranks.values()) < 12, ranks  # the share is reached before the rank cap
    assert artifact.build["rank_energy"] == 0.9


@pytest.mark.parametrize(
    ("options", "experts_pass"),
    [
        # ESM captured the routed layers' Grams: the experts' pass reloads the checkpoints only.
        (BuildOptions(alpha=1.0, rank=2), ("checkpoint",)),
        # TSV-M captures nothing, and ESM's statistics of a narrowing layer are its shift's moment.
        (BuildOptions(alpha=1.0, rank=2, method="tsv"), ("checkpoint", "proxy")),
        (BuildOptions(alpha=1.0, rank=2, routed_kinds=("qkv", "proj")), ("checkpoint", "proxy")),
    ],
)
def test_proxy_images_are_loaded_per_task_when_needed(pretrained, options, experts_pass):
    events: list[tuple[str, str]] = []
    tasks = _tasks(3, pretrained)

    def logged(kind: str, name: str, load):
        return lambda: (events.append((kind, name)), load())[1]

    for task in tasks:
        task.load, task.proxy = logged("checkpoint", task.name, task.load), logged("proxy", task.name, task.proxy)
    build_artifact(pretrained, tasks, options, progress=False)
    merge_pass = ("checkpoint", "proxy") if options.method == "esm" else ("checkpoint",)
    expected = [(kind, f"task{t}") for kinds in (merge_pass, experts_pass) for t in range(3) for kind in kinds]
    assert events == expected


def _build_by_reference_counting(pretrained: Encoder, tasks: list[TaskSource]) -> None:
    """A small build with the cycle collector off, so that what it frees is freed by reference counting alone,
    when its last reference goes, as the tests that watch tensors die need."""
    gc.collect()
    gc.disable()
    try:
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)
    finally:
        gc.enable()


def test_one_fine_tuned_encoder_is_alive_at_a_time(pretrained):
    """Both passes drop a task's weights, and the module and closures that share them, before the next
    task loads: by reference counting alone (the cycle collector is off), so the peak holds one model."""
    tasks = _tasks(3, pretrained)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    loaded: list[weakref.ref] = []
    alive_at_each_load: list[int] = []

    def tracked(load):
        def fresh_copy() -> Encoder:
            alive_at_each_load.append(sum(ref() is not None for ref in loaded))
            encoder = load()  # the test's closure keeps its state: the build gets copies only it holds
            encoder = Encoder(encoder.arch, {k: v.clone() for k, v in encoder.state.items()}, encoder.source)
            loaded.append(weakref.ref(encoder.state[key]))
            return encoder

        return fresh_copy

    for task in tasks:
        task.load = tracked(task.load)
    _build_by_reference_counting(pretrained, tasks)
    assert alive_at_each_load == [0] * 6  # three loads in the merge, three in the experts' pass


def test_the_experts_pass_holds_no_stack_of_experts_while_it_loads_fine_tuned_models(pretrained):
    """The tasks' experts wait on disk until the last fine-tuned model is gone, so that they do not add to
    the pass's peak (a fine-tuned model and its statistics): no [T, ...] stack of experts is alive at a load."""
    tasks = _tasks(3, pretrained)
    live_stack_shapes_at_each_load: list[list[torch.Size]] = []

    def stacks_of_shape(shapes: set[torch.Size]) -> list[torch.Size]:
        return [o.shape for o in gc.get_objects() if type(o) is torch.Tensor and o.shape in shapes]

    def observed(load):
        def load_and_observe() -> Encoder:
            live_stack_shapes_at_each_load.append(stacks_of_shape(stack_shapes))
            return load()

        return load_and_observe

    # Shapes of the stacks, from a build that is not observed; the observed build repeats it.
    reference = build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)
    stack_shapes = {t.shape for layer in reference.experts.values() for t in (layer.up, layer.down)}
    assert len(stack_shapes) > 1 and all(shape[0] == 3 for shape in stack_shapes)
    del reference
    for task in tasks:
        task.load = observed(task.load)
    artifact = build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)
    assert live_stack_shapes_at_each_load == [[]] * 6
    assert stacks_of_shape(stack_shapes)  # the artifact's stacks are tensors the scan does see
    del artifact


def test_the_experts_pass_loads_one_parked_gram_at_a_time(pretrained, monkeypatch):
    """The Grams the merge parked come back one routed layer at a time (d_in² float64 each; 24 of them are
    113 MB a task on ViT-B/32): at each expert's decomposition only its own layer's Gram is alive."""
    loaded_grams: list[weakref.ref] = []
    alive_at_each_expert: list[int] = []
    load, decompose = esmpp.spill.Parked.load, esmpp.build.residual_expert

    def tracked_load(self):
        item = load(self)
        if isinstance(item, ActivationStats):
            loaded_grams.append(weakref.ref(item.gram))
        return item

    def observed_decompose(*args, **kwargs):
        alive_at_each_expert.append(sum(ref() is not None for ref in loaded_grams))
        return decompose(*args, **kwargs)

    monkeypatch.setattr(esmpp.spill.Parked, "load", tracked_load)
    monkeypatch.setattr(esmpp.build, "residual_expert", observed_decompose)
    _build_by_reference_counting(pretrained, _tasks(3, pretrained))
    routed_layers = 2 * TINY_ARCH.layers  # qkv and fc of each block
    assert len(loaded_grams) == 3 * routed_layers  # every routed Gram came from the merge
    assert alive_at_each_expert == [1] * (3 * routed_layers)


def test_the_merged_task_vector_is_freed_and_its_memory_given_back_before_the_experts_pass(pretrained, monkeypatch):
    """Once the backbone is formed, the merged task vector (as large as a model) is dropped and malloc's free
    pages returned before the experts' pass loads its first fine-tuned model: left in the heap, they stayed
    resident under that pass's peak (ViT-B/32, T = 20: 2446 MiB with them, 2092 without)."""
    merged: list[weakref.ref] = []
    events: list[tuple[str, int | None]] = []  # ("release", merged tensors still alive) or ("load", None)
    merge, release = esmpp.build.merge_streaming, esmpp.build.release_free_memory

    def tracked_merge(*args, **kwargs):
        task_vector = merge(*args, **kwargs)
        merged.extend(weakref.ref(tensor) for tensor in task_vector.values())
        return task_vector

    def tracked_release() -> bool:
        events.append(("release", sum(ref() is not None for ref in merged)))
        return release()

    def tracked(load):
        def load_and_record() -> Encoder:
            events.append(("load", None))
            return load()

        return load_and_record

    monkeypatch.setattr(esmpp.build, "merge_streaming", tracked_merge)
    monkeypatch.setattr(esmpp.build, "release_free_memory", tracked_release)
    tasks = _tasks(2, pretrained)
    for task in tasks:
        task.load = tracked(task.load)
    _build_by_reference_counting(pretrained, tasks)
    loads = [index for index, (kind, _) in enumerate(events) if kind == "load"]
    first_load_of_the_experts_pass = loads[len(tasks)]  # after one load per task in the merge
    assert events[first_load_of_the_experts_pass - 1] == ("release", 0)


@pytest.mark.parametrize("failing_load", [3, 5], ids=["merge", "experts' pass"])
def test_parked_summaries_are_removed_when_the_build_fails(pretrained, tmp_path, monkeypatch, failing_load):
    """ESM parks its summaries in the merge, the experts' pass parks the experts: both go on failure."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tasks = _tasks(3, pretrained)
    parked: list[Path] = []
    loads = iter(range(1, 7))

    def counted(load):
        def fails_at_the_failing_load() -> Encoder:
            if next(loads) == failing_load:
                parked.extend(tmp_path.glob("esmpp-spill-*/*.safetensors"))
                raise OSError("checkpoint unreadable")
            return load()

        return fails_at_the_failing_load

    for task in tasks:
        task.load = counted(task.load)
    with pytest.raises(OSError, match="unreadable"):
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0, rank=2), progress=False)
    assert parked and list(tmp_path.iterdir()) == []
