"""The `esmpp` command line (typer). The only module that knows about typer and terminal output."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from esmpp.atomic import (
    check_writable_folder,
    claimed_destination,
    exit_on_terminate,
    folders_made_undone,
    storage_errors,
)
from esmpp.errors import ConfigError, EsmppError, plain

if TYPE_CHECKING:
    from esmpp.artifact import Artifact
    from esmpp.build import BuildOptions


class OneLineValueErrors(TyperGroup):
    """The commands, with a value typer refuses (not a number, below an option's ``min``, not a choice, missing)
    reported as the one-line error every other user error is (exit 1), not as typer's usage panel (exit 2)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            from pydantic import ValidationError

            # typer checks values with pydantic, whose messages ("Input should be greater than or equal to 1")
            # mostly leave out the value given.
            message, cause = plain(exc.format_message()).rstrip("."), exc.__cause__
            if isinstance(cause, ValidationError) and repr(given := cause.errors()[0]["input"]) not in message:
                message += f" (got {given!r})"
            command = (exc.ctx or ctx).command_path
            raise ConfigError(f"{message}. See `{command} --help`.") from exc


app = typer.Typer(
    cls=OneLineValueErrors,
    help="Merge fine-tuned CLIP vision encoders into one model with ESM and dynamic ESM++ routing.\n\n"
    "Typical flow: `esmpp zoo build` (offline demo models) → `esmpp build` (artifact) → "
    "`esmpp predict` / `esmpp export`. `esmpp demo` runs the whole chain on the offline zoo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The offline model zoo: a small pretrained ViT and experts fine-tuned from it.")
app.add_typer(zoo_app, name="zoo")

_debug = {"on": False}


class Preset(str, Enum):
    tiny = "tiny"
    mini = "mini"


class PrototypeSource(str, Enum):
    finetuned = "finetuned"
    runtime = "runtime"


class Router(str, Enum):
    cosine = "cosine"
    discriminant = "discriminant"


DEBUG_HELP = "Show full tracebacks instead of one-line errors."


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False) -> None:
    _debug["on"] = debug  # set anew on every run; a command's own --debug can only turn it on (below)


def _turn_on_debug(value: bool) -> None:
    if value:
        _debug["on"] = True


# Every command takes --debug after its name too (`esmpp build ... --debug`), with the effect of `esmpp --debug
# build ...`: the option's callback sets the flag, so a command never reads the value (it is not passed).
DebugOpt = Annotated[
    # Eager: processed before the other options, so that a value refused on the line before it shows the traceback.
    bool,
    typer.Option("--debug", help=DEBUG_HELP, callback=_turn_on_debug, expose_value=False, is_eager=True),
]


def _zoo(preset: Preset, root: Path | None, force: bool = False):
    from esmpp.zoo import build_zoo

    return build_zoo(preset.value, root=root, force=force, progress=True)


def _build_options(command: str, base=None, **overrides):
    """Build options: the config's ``options:`` (or the defaults), with the flags given to ``command`` (e.g.
    ``build``, whose --help the error points to) on top."""
    from pydantic import ValidationError

    from esmpp.build import OptionsConfig, method_options
    from esmpp.errors import validation_problems

    given = {key: value for key, value in overrides.items() if value is not None}
    if "routed_kinds" in given:
        given["routed_kinds"] = list(_csv(given["routed_kinds"], "--routed-kinds"))
    for key in ("prototype_source", "router"):
        if key in given:
            given[key] = given[key].value
    merged = (base or OptionsConfig()).model_dump()
    given["method_options"] = merged["method_options"] | given.get("method_options", {})  # flags win per key
    merged |= given
    try:
        options = OptionsConfig.model_validate(merged).to_build_options()
    except ValidationError as exc:
        raise ConfigError(f"invalid build options: {validation_problems(exc)}. See `esmpp {command} --help`.") from exc
    method_options(options)  # an unknown method or method option fails now, before the models load
    return options


MethodOpt = Annotated[
    str | None, typer.Option(help="Static method for the shared backbone (see `esmpp methods`). (default: esm)")
]
RankOpt = Annotated[
    int | None, typer.Option(help="Rank r of each task's low-rank expert (8 is already strong). (default: 32)")
]
RankEnergyOpt = Annotated[
    float | None,
    typer.Option(
        help="Choose r per routed layer by retained energy: the fewest directions (at most --rank) that keep this "
        "share, in (0, 1], of every task's residual activation shift there, e.g. 0.9. (default: --rank everywhere)"
    ),
]
KindsOpt = Annotated[
    str | None,
    typer.Option(
        help="Routed kinds, comma-separated: qkv, out, fc, proj (the blocks' linear layers) and patch (the patch "
        "embedding, which fine-tuning moves most on the zoo). (default: qkv,fc)"
    ),
]
ProtoOpt = Annotated[
    PrototypeSource | None,
    typer.Option(
        help="Prototypes from the fine-tuned models (authors) or measured in the routed runtime. (default: finetuned)"
    ),
]
ProtoCountOpt = Annotated[
    int | None,
    typer.Option(
        help="Prototypes per task (>1: spherical k-means with faiss), at most a task's proxy images. (default: 1)"
    ),
]
RouterOpt = Annotated[
    Router | None,
    typer.Option(
        help="How a routed layer scores tasks: cosine similarity to the prototypes (the paper's), or a linear "
        "discriminant fitted on the proxy features of the routed model (needs --prototypes runtime; weighs the "
        "directions that separate tasks: routing 66 → 74 % on the mini zoo). (default: cosine)"
    ),
]
ShrinkageOpt = Annotated[
    float | None,
    typer.Option(
        help="Discriminant router: shrinkage of the within-task covariance towards the identity, in [0, 1]. "
        "(default: 0.1)"
    ),
]
# The bound is build.MAX_ALPHA's, written out: importing esmpp.build (torch) here would slow every command.
AlphaOpt = Annotated[
    float | None,
    typer.Option(
        help="Scaling α of the merged task vector, in [0, 10] (the search covers [0, 2]); default: searched on every "
        "task's validation data (1 without any)."
    ),
]
MethodOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method-option",
        metavar="KEY=VALUE",
        help="An option of the backbone's merge method, repeatable (`esmpp methods` lists them; values are read "
        "as YAML). rank_fraction=0.5 halves ESM's rank budget (the authors' is ⌊d_out/T⌋): ESM++ on ViT-B/32 "
        "at T = 8 then builds in 105 s instead of 158 s, within about a point on the mini zoo (see README).",
    ),
]


def _method_option_values(items: list[str] | None) -> dict:
    """``--method-option`` KEY=VALUE strings → {key: value}, each value read as YAML (0.5, true, [a, b])."""
    import yaml

    values = {}
    for item in items or []:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise EsmppError(
                f"--method-option takes KEY=VALUE, e.g. rank_fraction=0.5; got {item!r}. See `esmpp methods`."
            )
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EsmppError(f"--method-option {item!r}: the value is not valid YAML ({exc}).") from exc
    return values


@zoo_app.command("build")
def zoo_build(
    preset: Annotated[
        Preset, typer.Option(help="tiny: seconds, for tests. mini: the benchmark (~15 min on 2 cores).")
    ] = Preset.mini,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Zoo directory. (default: $ESMPP_CACHE/zoo/PRESET, or ~/.cache/esmpp/zoo/PRESET without ESMPP_CACHE: "
            "the only place the other commands' --zoo PRESET reads. For a zoo they read elsewhere, set ESMPP_CACHE "
            "instead of --out, for this command and theirs.)"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a complete zoo is cached.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Build (or reuse) the offline zoo: pretrain a small ViT, fine-tune one expert per task."""
    from esmpp.zoo import default_root

    zoo = _zoo(preset, out, force)
    typer.echo(f"zoo '{preset.value}' at {zoo.root}: {len(zoo.tasks)} tasks ({', '.join(zoo.tasks)})")
    read_by_the_others = default_root(preset.value)
    if zoo.root.resolve() != read_by_the_others.resolve():
        typer.echo(
            f"note: the other commands' --zoo {preset.value} read {read_by_the_others}, not this zoo. To build one "
            f"they read, set ESMPP_CACHE=DIR instead of --out (the zoo goes to DIR/zoo/{preset.value}), and run them "
            "with the same ESMPP_CACHE."
        )


@app.command()
def methods(debug: DebugOpt = False) -> None:
    """List the static merge methods and their options, with defaults (set them with --method-option KEY=VALUE
    or under `method_options:` in a build config)."""
    from esmpp.merging import available_methods, get_method

    for name in available_methods():
        options = get_method(name).Options
        typer.echo(name)
        for key, option in options.model_fields.items():
            default = json.dumps(option.get_default(call_default_factory=True), ensure_ascii=False)
            typer.echo(f"  {key} = {default}  {option.description or ''}".rstrip())
        if not options.model_fields:
            typer.echo("  (no options)")


@app.command()
def build(
    config: Annotated[Path | None, typer.Argument(help="YAML build config (see README). Omit with --zoo.")] = None,
    out: Annotated[Path, typer.Option(help="Artifact directory to write.")] = Path("esmpp-artifact"),
    zoo: Annotated[Preset | None, typer.Option(help="Build from the offline zoo instead of a config.")] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="With --zoo: a comma-separated subset of its tasks, in the artifact's order. Not with a CONFIG: "
            "the artifact gets the tasks the config lists."
        ),
    ] = None,
    method: MethodOpt = None,
    rank: RankOpt = None,
    rank_energy: RankEnergyOpt = None,
    routed_kinds: KindsOpt = None,
    prototypes: ProtoOpt = None,
    prototypes_per_task: ProtoCountOpt = None,
    router: RouterOpt = None,
    router_shrinkage: ShrinkageOpt = None,
    alpha: AlphaOpt = None,
    method_option: MethodOptionOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact at --out.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Build an ESM++ artifact: merged backbone + low-rank expert per task + task prototypes.

    Command-line options override the config's `options:` section."""
    from esmpp.artifact import check_artifact_destination, save_artifact
    from esmpp.build import build_artifact

    if (config is None) == (zoo is None):
        raise EsmppError("give either a CONFIG file or --zoo tiny|mini (not both). See `esmpp build --help`.")
    if config is not None and tasks is not None:
        raise ConfigError(f"--tasks selects tasks of the --zoo; with a config, list the tasks in {config} instead.")
    flags = {
        "method": method,
        "rank": rank,
        "rank_energy": rank_energy,
        "routed_kinds": routed_kinds,
        "prototype_source": prototypes,
        "prototypes_per_task": prototypes_per_task,
        "router": router,
        "router_shrinkage": router_shrinkage,
        "alpha": alpha,
        "method_options": _method_option_values(method_option),
    }
    start = time.perf_counter()
    # Claimed for the whole command: a second build to this --out is refused now, not after its build.
    with claimed_destination(out):
        if zoo is not None:
            from esmpp.sources import zoo_sources

            subset = _zoo_task_subset(zoo, tasks) if tasks is not None else None
            options = _build_options("build", **flags)
            _check_options_on_zoo(options, zoo, subset)
            check_artifact_destination(out, overwrite)  # before the long work: the zoo may be built
            pretrained, sources = zoo_sources(_zoo(zoo, None), subset)
        else:
            from esmpp.config import load_config
            from esmpp.sources import config_sources

            build_config = load_config(config)
            options = _build_options("build", build_config.options, **flags)
            # --out is checked once the config's files are good, before the slow part of reading the config
            # (zero-shot heads, validation images) and the build. The check leaves no folder for it behind.
            pretrained, sources = config_sources(
                build_config, options, before_slow_work=lambda: check_artifact_destination(out, overwrite)
            )
        artifact = build_artifact(pretrained, sources, options)
        save_artifact(artifact, out, overwrite=overwrite)
    _print_summary(out, artifact, time.perf_counter() - start)


def _zoo_task_subset(zoo: Preset, tasks: str) -> list[str]:
    """The zoo's tasks that ``--tasks`` names, in its order; checked against the zoo's preset, so that a typo
    fails before the zoo is built."""

    names = list(_csv(tasks, "--tasks"))
    if not names:
        raise ConfigError(
            f"--tasks {tasks!r} names no task: list some of the {zoo.value} zoo's, comma-separated, or leave "
            "--tasks out for all of them."
        )
    _check_zoo_tasks(zoo, names, "--tasks", "Correct the names (comma-separated).")
    return names


def _print_summary(path: Path, artifact, seconds: float) -> None:
    from esmpp.artifact import expert_ranks

    sizes = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
    build = artifact.build
    typer.echo(
        f"artifact: {path}  ({sum(sizes.values()) / 1e6:.2f} MB: "
        + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in sizes.items())
        + ")"
    )
    typer.echo(f"tasks: {', '.join(t.name for t in artifact.tasks)}")
    ranks = sorted(set(expert_ranks(artifact.experts).values()))
    typer.echo(
        f"backbone: {build['method']}, alpha {build['alpha']:.3f}; experts: "
        + (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}")
        + f" on {len(artifact.experts)} layers ({', '.join(build['routed_kinds'])})"
    )
    typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in artifact.timings.items()) + f", total {seconds:.1f}")


@app.command()
def inspect(artifact: Annotated[Path, typer.Argument(help="Artifact directory.")], debug: DebugOpt = False) -> None:
    """Check an artifact as loading does, then show its manifest: architecture, tasks, routed layers, ranks, α,
    build options."""
    from esmpp.architecture import Architecture
    from esmpp.artifact import load_artifact, read_manifest

    load_artifact(artifact)  # refuses a manifest that does not describe the tensors, rather than print it
    manifest = read_manifest(artifact)
    arch = Architecture.from_dict(manifest["architecture"])
    typer.echo(f"esmpp artifact v{manifest['format_version']} (esmpp {manifest.get('esmpp_version')})")
    typer.echo(
        f"architecture: {arch.name} width {arch.vision.get('width')} layers "
        f"{arch.vision.get('layers')} image {arch.vision.get('image_size')}"
    )
    for task in manifest["tasks"]:
        typer.echo(
            f"task {task['name']}: {len(task['classes'])} classes ({', '.join(task['classes'][:6])}"
            + (", …" if len(task["classes"]) > 6 else "")
            + ")"
        )
    typer.echo(f"routed layers: {len(manifest['routed_layers'])}, ranks {sorted(set(manifest['ranks'].values()))}")
    typer.echo("build: " + json.dumps({k: v for k, v in manifest["build"].items() if k != "alpha_history"}))


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[
        str | None,
        typer.Option(
            help="Task: a name, or an index from 0 in the artifact's order (a task named like a number is that "
            "name); default: routed per image."
        ),
    ] = None,
    routes: Annotated[bool, typer.Option(help="Show each routed layer's choice.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    mode: Annotated[
        str | None, typer.Option(help="Routing: hard (one expert per layer) or soft (top-k mixed). (default: hard)")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="Experts mixed by soft routing, 1 to the artifact's tasks. (default: 2; 1 for a one-task artifact)"
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Softmax temperature of soft routing. (default: 0.05)")
    ] = None,
    route_once: Annotated[bool, typer.Option(help="Route at the first routed layer only and reuse it.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Predict images with an artifact; without --task the router picks each image's task."""
    from dataclasses import asdict

    from esmpp.images import check_image_exists, check_image_file
    from esmpp.runtime.predictor import Predictor

    for path in images:  # a mistyped path fails now, not after the artifact loads
        check_image_exists(path)
    # Only the flags given: the Predictor holds the defaults and checks the values (one-line ConfigError).
    given = {"mode": mode, "top_k": top_k, "temperature": temperature}
    routing = {name: value for name, value in given.items() if value is not None}
    predictor = Predictor.load(artifact, route_once=route_once, **routing)
    # A bad image fails before the first batch, not after the batches before it ran (their results, printed at the
    # end, would be lost). The check decodes each image once more: on the CPU, 0.5-2 ms for a web-sized JPEG
    # (decoded reduced), 24 ms for a 12-megapixel one, against 110 ms for a ViT-B/32 forward per image.
    for path in images:
        check_image_file(path, predictor.artifact.arch.image_size)
    # --task is text: digits are an index, as the Predictor's error for an unknown task offers, unless a task
    # has that name.
    index = task is not None and task.isdecimal() and task not in predictor.task_names
    chosen = int(task) if index else task
    for path, result in zip(images, predictor.predict(list(images), task=chosen, return_routes=routes)):
        if as_json:
            typer.echo(json.dumps({"image": str(path), **asdict(result)}))
        else:
            line = f"{path}: {result.task}/{result.label} ({result.score:.3f}{', routed' if result.routed else ''})"
            typer.echo(line + (f" routes {result.routes}" if routes else ""))


@app.command("eval")
def eval_encoder(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="An encoder checkpoint (a file, or a Hugging Face or open_clip model folder), or an artifact folder."
        ),
    ],
    zoo: Annotated[Preset, typer.Option(help="Zoo whose test splits and heads to use.")] = Preset.mini,
    debug: DebugOpt = False,
) -> None:
    """Accuracy of one encoder (or an ESM++ artifact) on the zoo's test splits. An artifact's tasks are
    matched to the zoo's by name: one built on some of the zoo's tasks, in any order, is measured on them."""
    from esmpp.artifact import load_artifact, names_an_artifact
    from esmpp.checkpoints import load_encoder
    from esmpp.compare import evaluate_routed
    from esmpp.evaluation import evaluate, format_table
    from esmpp.folders import folder_kind
    from esmpp.zoo import get_preset

    # The argument is read and checked against the zoo's preset before the zoo is built (15 minutes for mini).
    # What the artifact loader takes for an artifact (a damaged one, a folder holding one) goes to it: its
    # messages say what is wrong with it, where the checkpoint loader's would ask for model weights.
    if names_an_artifact(checkpoint):
        artifact = load_artifact(checkpoint)
        _check_artifact_fits_zoo(artifact, checkpoint, zoo)
        results = evaluate_routed(artifact, _zoo(zoo, None))
        rows = [{"method": f"{checkpoint.name} {k}", "accuracy": v} for k, v in results.items()]
    elif (kind := folder_kind(checkpoint)) is not None:  # a zoo, an ONNX export: no encoder to load
        raise ConfigError(
            f"{checkpoint} is {kind}, which eval does not measure: give an encoder checkpoint (a file, or a "
            "Hugging Face or open_clip model folder) or an esmpp artifact folder."
        )
    else:  # a file, or any other folder: the checkpoint loader reads model folders or says what it lacks
        # The zoo fixes the architecture: naming another (the loader's usual advice) cannot help here.
        fix = f"eval measures encoders of the {zoo.value} zoo's architecture; give a checkpoint fine-tuned from it"
        encoder = load_encoder(checkpoint, arch=get_preset(zoo.value).arch, fix=fix)
        rows = [{"method": checkpoint.name, "accuracy": evaluate(encoder.to_module(), _zoo(zoo, None))}]
    typer.echo(format_table(rows))


def _check_artifact_fits_zoo(artifact: Artifact, path: Path, zoo: Preset) -> None:
    """Refuse an artifact that the zoo cannot measure (images of another size, a task the zoo lacks) from the
    zoo's preset, before the zoo is built."""
    from esmpp.zoo import get_preset

    fix = f"Evaluate it on the zoo it was built from (--zoo {'|'.join(preset.value for preset in Preset)})."
    size, zoo_size = artifact.arch.image_size, get_preset(zoo.value).arch.image_size
    if size != zoo_size:
        raise ConfigError(
            f"artifact {path} takes {size}×{size} images, the {zoo.value} zoo's are {zoo_size}×{zoo_size}. {fix}"
        )
    _check_zoo_tasks(zoo, [task.name for task in artifact.tasks], f"artifact {path}", fix)


def _check_options_on_zoo(options: BuildOptions, zoo: Preset, tasks: list[str] | None = None) -> None:
    """Refuse, from the zoo's preset and before the zoo is built, a --rank above its routed layers' width and
    more --prototypes-per-task than the proxy images of its ``tasks`` (default: all)."""
    from esmpp.build import check_prototypes_per_task, check_rank
    from esmpp.zoo import get_preset

    preset = get_preset(zoo.value)
    check_rank(options, preset.arch)
    check_prototypes_per_task(options, dict.fromkeys(tasks or preset.tasks, preset.sizes.proxy), more_images=None)


def _check_zoo_tasks(zoo: Preset, names: list[str], where: str, fix: str) -> None:
    """Refuse the task ``names`` that the zoo does not have (see :func:`esmpp.zoo.check_zoo_tasks`): its preset
    lists them, so no zoo is built for it."""
    from esmpp.zoo import check_zoo_tasks, get_preset

    check_zoo_tasks(names, zoo.value, get_preset(zoo.value).tasks, where, fix)


@app.command()
def compare(
    zoo: Annotated[Preset, typer.Option(help="Zoo to benchmark on.")] = Preset.mini,
    methods_: Annotated[
        str, typer.Option("--methods", help="Comma-separated static methods; 'all' for the registry.")
    ] = "all",
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("esmpp-compare.json"),
    artifact_out: Annotated[Path | None, typer.Option("--artifact", help="Also save the ESM++ artifact here.")] = None,
    rank: RankOpt = None,
    rank_energy: RankEnergyOpt = None,
    routed_kinds: KindsOpt = None,
    prototypes: ProtoOpt = None,
    prototypes_per_task: ProtoCountOpt = None,
    router: RouterOpt = None,
    router_shrinkage: ShrinkageOpt = None,
    method_option: MethodOptionOpt = None,
    debug: DebugOpt = False,
) -> None:
    """The benchmark table: pretrained, fine-tuned, every merge method and ESM++ on the zoo's test splits.

    A --method-option goes to every method that has it, the ESM++ backbone's included."""
    from dataclasses import replace

    from esmpp.merging import get_method, options_share

    given = _method_option_values(method_option)
    options = _build_options(
        "compare",
        rank=rank,
        rank_energy=rank_energy,
        routed_kinds=routed_kinds,
        prototype_source=prototypes,
        prototypes_per_task=prototypes_per_task,
        router=router,
        router_shrinkage=router_shrinkage,
    )
    options = replace(options, method_options=options_share(get_method(options.method), given))
    _compare(zoo, methods_, out, artifact_out, [options], given)


def _compare(
    zoo: Preset,
    methods_: str,
    out: Path,
    artifact_out: Path | None,
    variants,
    method_options=None,
    report_is_a_folder: str | None = None,
    report_folder: str | None = None,
):
    """Run the comparison, print the tables and routing, write the JSON report; save the last ESM++
    variant's artifact to ``artifact_out`` when given. ``method_options`` go to the static methods that
    have them; ``report_is_a_folder`` is the error when ``out`` is a folder, ``report_folder`` how the errors name
    the folder that holds it (see :func:`_prepare_output`).
    Returns the zoo."""
    from esmpp.artifact import check_artifact_destination, save_artifact
    from esmpp.compare import compare_on_zoo
    from esmpp.evaluation import format_table, summarize_rows
    from esmpp.merging import available_methods, check_run_options

    names = available_methods() if methods_ == "all" else list(_csv(methods_, "--methods"))
    method_options = method_options or {}
    check_run_options([*names, *(variant.method for variant in variants)], method_options)
    for variant in variants:
        _check_options_on_zoo(variant, zoo)
    if artifact_out is not None and out.resolve().is_relative_to(artifact_out.resolve()):
        raise ConfigError(
            f"--out {out} is inside --artifact {artifact_out}, which the new artifact replaces whole: write the "
            f"report elsewhere, e.g. --out {artifact_out.parent / out.name}."
        )
    _prepare_output(out, report_is_a_folder, report_folder)
    artifact_elsewhere = "choose another folder for the artifact"  # --artifact of compare, --out of demo
    # --artifact is claimed for the whole comparison, as build claims its --out.
    with contextlib.ExitStack() as claims:
        if artifact_out is not None:
            claims.enter_context(claimed_destination(artifact_out, artifact_elsewhere))
            check_artifact_destination(artifact_out, overwrite=True, elsewhere=artifact_elsewhere)
        z = _zoo(zoo, None)
        report = compare_on_zoo(z, names, variants, run_options=method_options)
        artifacts = report.pop("artifacts")
        typer.echo(format_table(report["rows"], report["finetuned"]))
        for label, summary in report["esmpp"].items():
            routing = summary["routing_accuracy"]
            typer.echo(
                f"\n{label} routing accuracy (%): "
                + ", ".join(f"{t} {v:.1f}" for t, v in routing.items())
                + f"; average {summary['routing_average']:.1f}"
            )
        report["rows"] = summarize_rows(report["rows"], report["finetuned"])
        report["zoo"] = {"preset": zoo.value, "root": str(z.root)}
        _write_report(out, report)
        typer.echo(f"report: {out}")
        if artifact_out is not None:
            save_artifact(list(artifacts.values())[-1], artifact_out, overwrite=True, elsewhere=artifact_elsewhere)
            typer.echo(f"ESM++ artifact ({list(artifacts)[-1]}): {artifact_out}")
    return z


@app.command()
def demo(
    zoo: Annotated[Preset, typer.Option(help="mini: the benchmark zoo; tiny: a one-minute smoke run.")] = Preset.mini,
    out: Annotated[Path, typer.Option(help="Folder for the report and the artifact.")] = Path("esmpp-demo"),
    debug: DebugOpt = False,
) -> None:
    """The whole chain offline: zoo (cached) → every method + ESM++ → table → a few task-agnostic predictions.

    ESM++ runs three times: with the authors' defaults (qkv + c_fc routed, one prototype per task from the
    fine-tuned models, cosine router); with the patch embedding and every linear kind routed (the best when
    the task is given); and with every linear kind routed, four prototypes per task measured in the routed
    model and the discriminant router (the best when the router must find the task: it serves the
    predictions). See the README for what the numbers say."""
    from esmpp.build import BuildOptions
    from esmpp.runtime.predictor import Predictor

    every_linear = ("qkv", "out", "fc", "proj")
    variants = [
        BuildOptions(),
        BuildOptions(routed_kinds=("patch", *every_linear)),
        BuildOptions(
            routed_kinds=every_linear, prototype_source="runtime", prototypes_per_task=4, router="discriminant"
        ),
    ]
    from esmpp.folders import folder_kind

    # demo's --out is a folder of its own: not a file, nor an esmpp folder it would write into.
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; demo writes a folder there (a report and an artifact).")
    if out.is_dir() and (kind := folder_kind(out)) is not None:
        raise ConfigError(f"--out {out} is {kind}; demo writes a folder of its own there: choose another --out.")
    report = out / "compare.json"
    # compare's advice to give the report's file in --out would be wrong here.
    report_is_a_folder = f"{report} is a folder, where demo writes its report: remove it, or choose another --out."
    z = _compare(
        zoo,
        "all",
        report,
        out / "artifact",
        variants,
        report_is_a_folder=report_is_a_folder,
        report_folder=f"--out {out}",
    )
    predictor = Predictor.load(out / "artifact")
    typer.echo("\nTask-agnostic predictions on test images (the router picks the task):")
    for task in z.tasks:
        images, labels = z.split(task, "test")
        for label, result in zip(labels[:2], predictor.predict(list(images[:2]))):
            truth = z.class_names(task)[int(label)]
            typer.echo(f"  true {task}/{truth:<12} → {result.task}/{result.label} ({result.score:.2f})")


@app.command("export")
def export_model(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write: model.onnx (+ model.onnx.data) and export.json.")],
    # Literal numbers: importing esmpp.onnx (torch) for MIN_OPSET/MAX_OPSET would slow every command; test_onnx
    # checks that this help matches them.
    opset: Annotated[int | None, typer.Option(help="ONNX opset, 18 to 25 (default: the exporter's, 20).")] = None,
    fp16: Annotated[bool, typer.Option(help="float16 weights and compute (float32 inputs/outputs).")] = False,
    task_input: Annotated[
        bool, typer.Option(help="Take the task as a second input (forced_task_id) instead of routing.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Export an artifact to ONNX (routing inside the graph) and check it against PyTorch with onnxruntime."""
    from esmpp.onnx import export_onnx

    report = export_onnx(artifact, out, opset=opset, fp16=fp16, task_input=task_input, overwrite=overwrite)
    typer.echo(
        f"model: {report.path} ({report.size_bytes / 1e6:.2f} MB, {report.mode}, opset {report.opset}"
        f"{', fp16' if report.fp16 else ''}) in {report.seconds:.1f} s"
    )
    typer.echo(f"provider: {', '.join(report.providers)}")
    parity = report.parity
    typer.echo(
        f"parity on {parity.batch_size} images: routing agreement {parity.routing_agreement:.1%}, "
        f"logits error {parity.logits_error:.2e}, embedding error {parity.embedding_error:.2e} "
        f"(tolerance {parity.tolerance['logits']:g}); tasks covered: "
        + ", ".join(f"{name} {count}" for name, count in parity.coverage.items())
    )


def _items(text: str) -> tuple[str, ...]:
    """The non-empty items of the comma-separated ``text``, stripped: ``" a, ,b"`` → ``("a", "b")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _csv(text: str, option: str) -> tuple[str, ...]:
    """The :func:`_items` of ``text`` given to ``option``. An item given twice is refused: it would run the same
    work twice, or keep one of the two."""
    from esmpp.artifact import repeated_names

    items = _items(text)
    repeated = repeated_names(list(items))
    if repeated:
        raise ConfigError(f"{option} names {', '.join(repeated)} more than once: give each once.")
    return items


@app.command()
def bench(
    arch: Annotated[
        str, typer.Option(help="open_clip architectures, comma-separated (ViT-B-32,ViT-B-16,ViT-L-14).")
    ] = "ViT-B-32",
    tasks: Annotated[str, typer.Option(help="Task counts T, comma-separated (e.g. 2,8,20).")] = "2,8",
    methods: Annotated[
        str, typer.Option(help="'esm++' (full build) and static methods, comma-separated; '' for the runtime only.")
    ] = "esm++,esm,tsv,task_arithmetic",
    proxy_images: Annotated[int, typer.Option(min=1, help="Proxy images per task.")] = 32,
    rank: Annotated[int, typer.Option(min=1, help="Rank r of each task's low-rank expert.")] = 32,
    build_repeats: Annotated[
        int,
        typer.Option(
            min=1, help="Builds per workload (median; each in a fresh process, in rounds that build every method once)."
        ),
    ] = 1,
    runtime_repeats: Annotated[int, typer.Option(min=1, help="Timed forwards per runtime figure (median).")] = 5,
    batch_sizes: Annotated[str, typer.Option(help="Runtime batch sizes, comma-separated.")] = "1,32",
    runtime: Annotated[bool, typer.Option(help="Measure the routed vs plain runtime.")] = True,
    onnx: Annotated[
        bool, typer.Option(help="Also time both models in onnxruntime (exports them once per architecture).")
    ] = True,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: torch's choice).")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the synthetic checkpoints are written (reused).")] = Path(
        "esmpp-bench-work"
    ),
    out: Annotated[Path, typer.Option(help="JSON report to write.")] = Path("esmpp-bench.json"),
    method_option: MethodOptionOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Measure build time and peak memory per stage, and routed runtime cost, on synthetic tasks.

    A --method-option goes to every method that has it, the ESM++ backbone's included."""
    from esmpp.bench import BenchConfig, format_report, run_bench

    # The lists as given: BenchConfig reads the numbers and checks every value, naming the flag in its errors.
    config = BenchConfig(
        archs=_items(arch),
        task_counts=_items(tasks),
        methods=_items(methods),
        proxy_images=proxy_images,
        rank=rank,
        build_repeats=build_repeats,
        runtime_repeats=runtime_repeats,
        batch_sizes=_items(batch_sizes),
        runtime=runtime,
        onnx=onnx,
        threads=threads,
        method_options=_method_option_values(method_option),
    )
    _prepare_output(out)
    report = run_bench(config, workdir, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_report(report))
    _write_report(out, report)
    typer.echo(f"\nreport written to {out}")


def _prepare_output(out: Path, is_a_folder: str | None = None, folder: str | None = None) -> None:
    """Check the report's path ``out`` before the long work, so that a bad --out fails at once rather than when
    the report is written: ``out`` is no folder, and its folder can be created and written to (a folder made to
    find this out is removed again: :func:`_write_report` makes it). For a command whose --out is not the
    report's file but its folder (demo), ``is_a_folder`` is the error when ``out`` is a folder (default: give the
    report's file in --out) and ``folder`` how the errors name the folder (default: the folder of --out OUT)."""
    if out.is_dir():
        raise ConfigError(
            is_a_folder or f"--out {out} is a folder; give the report's file, e.g. --out {out / 'report.json'}."
        )
    folder = folder or f"the folder of --out {out}"
    # The folder is made only to find out whether it can be: a run that fails in its long work leaves no empty
    # folder for a report it never wrote (_write_report makes it again).
    with folders_made_undone(out.parent):
        with storage_errors(lambda exc: f"cannot create {folder} ({exc}). Choose another --out."):
            out.parent.mkdir(parents=True, exist_ok=True)
        check_writable_folder(out.parent, "choose another --out")


def _write_report(out: Path, report: dict) -> None:
    """Write ``report`` as JSON to ``out`` (whose tables were printed above), making its folder."""
    with storage_errors(
        lambda exc: f"could not write the report {out} ({exc}); its tables are printed above. Choose another --out."
    ):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


def run() -> None:
    """Entry point: EsmppError becomes a one-line message and exit code 1 (tracebacks with --debug)."""
    exit_on_terminate()
    try:
        app()
    except EsmppError as exc:
        if _debug["on"]:
            raise
        # One line even when a message quotes a multi-line one (YAML parser errors point with a caret line).
        typer.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
