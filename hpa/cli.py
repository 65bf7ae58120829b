"""The ``hpa`` command.  Thin: each command parses options, calls one library function, renders.

Library errors (``hpa.errors.HpaError``) become one line on stderr and exit
status 2, in :func:`main`; ``HPA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from dataclasses import fields
from typing import Any

import click

import hpa
from hpa import __version__
from hpa.errors import HpaError, HpaWarning, NonFiniteWeightsError, OptionError, suggest
from hpa.executors import EXECUTOR_FLAGS, executor_options, make_executor  # the executor flags, once for every command
from hpa.experiments.types import FLAG_CHOICES, FLAG_METAVARS, Noise, Recipe, field_help
from hpa.plugins import RESERVED_OPTIONS, describe_plugins, plugin_manager, registries

_EXIT_BAD_INPUT = 2


def _load_options(function):
    """Options every model-loading command shares (names match hpa.load's keywords)."""
    decorators = [
        click.option("--weights", default="DEFAULT", show_default=True,
                     help="Weights: DEFAULT (the loader's pretrained or shipped weights), a name "
                          "(e.g. IMAGENET1K_V1), a file path, or 'none' for a seeded random init."),
        click.option("--input-size", metavar="C,H,W", help="Dummy input size for tracing, e.g. 3,224,224."),
        click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
                     help="Fold inference BatchNorm into the conv before it (docs/statistics.md §0)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled Python objects, which can execute code from the file."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of random initialisations."),
        click.option("-o", "--option", "extra", multiple=True, metavar="KEY=VALUE",
                     help="An option the loader or a statistic declares, repeatable; 'hpa plugins' lists them."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _figure_options(function):
    """Figure options shared by ``scan --out`` and ``plot`` (names match ScanResult.plot's keywords)."""
    decorators = [
        click.option("--dpi", type=click.FloatRange(10, 2400), help="Figure resolution for PNG. "
                     "Default: savefig.dpi of your matplotlibrc, else 200."),
        click.option("--hist-range", type=click.FloatRange(0, 1, min_open=True), metavar="R",
                     help="Cosine histograms over [-R, R]. Default: shared, from the data."),
        click.option("--layers", metavar="PATTERN", help="Draw only layers matching these fnmatch patterns "
                                                         "(comma-separated), e.g. 'layer4.*,conv1'."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpa")
def cli() -> None:
    """Hyperplane-arrangement analysis of trained convolutional networks.

    \b
    Examples:
      hpa scan zoo:digits_cnn --compare-init --out results/
      hpa scan timm:vgg19 --json > vgg19.json
      hpa list-models timm 'vgg*'
      hpa plugins
    """


class _ScanCommand(click.Command):
    """``hpa scan``, whose help ends with the installed statistics and their options (read from the
    registry when the help is shown, so it never imports torch)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for plugin in describe_plugins():
            for entry in plugin.get("statistics", []):
                rows.append((entry["name"], entry["description"]))
                rows += [(f"  -o {o['name']}=", o["help"]) for o in entry["options"]]
        with formatter.section("Installed statistics (--stat NAME; 'hpa plugins' lists every option)"):
            formatter.write_dl(rows or [("(none)", "no statistic plugin is installed")])
        super().format_epilog(ctx, formatter)


@cli.command(cls=_ScanCommand)
@click.argument("spec")
@_load_options
@click.option("--stat", "statistics", multiple=True, help="Statistic to run (repeatable). Default: all that "
                                                           "apply; the installed ones are listed below.")
@click.option("--compare-init", is_flag=True, help="Also scan a seeded fresh init of the same architecture.")
@click.option("--init", type=click.Path(dir_okay=False), help="Compare against a saved initial snapshot.")
@click.option("--skip-1x1", is_flag=True, help="Skip 1x1 convs, as the reference code did.")
@click.option("--with-linear", is_flag=True, help="Include linear layers.")
@click.option("--bins", type=int, default=40, show_default=True, help="Histogram bins over [-1, 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout instead of the table.")
@click.option("--out", type=click.Path(), help="Write result.json, CSVs and figures into this new or hpa-written "
                                               "folder (replaced as a whole; foreign files are refused).")
@click.option("--format", "fig_format", default="png", show_default=True,
              type=click.Choice(["png", "pdf", "svg"]), help="Figure format for --out.")
@_figure_options
@click.option("--progress/--no-progress", default=None, help="Progress and time estimates on stderr: bars on a "
                                                            "terminal, else one line per stage (default: when "
                                                            "stderr is a terminal).")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but errors and warnings (overrides --progress).")
def scan(spec: str, statistics, as_json: bool, out: str | None, fig_format: str, progress, quiet: bool, extra,
         dpi, hist_range, layers, **options):
    """Scan SPEC with the statistics and print a per-layer table.

    SPEC is PREFIX:NAME (torchvision:resnet18, timm:vgg19.tv_in1k, zoo:digits_cnn)
    or a model file (.pt .pth .bin .safetensors .onnx .mat).
    """
    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.files import atomic_directory, check_output_dir
    from hpa.render.table import render_layers, render_rest

    if out is not None:  # --out "" is refused, not ignored
        check_output_dir(out)  # before the model is loaded: a bad --out must not cost a scan
    show = not quiet and (progress if progress is not None else sys.stderr.isatty())
    printer = _progress_printer() if show else None
    early = _EarlyTable(printer, stream=not as_json)
    result = hpa.scan(spec, statistics=list(statistics) or None, progress=printer, on_statistic=early,
                      **options, **_parse_extra(extra))
    if out is not None:
        if printer is not None:
            printer(f"writing {out}", 0, 1)
        with atomic_directory(out) as staging:
            result.write(staging, fig_format, dpi=dpi, hist_range=hist_range, layers=layers)
    if printer is not None:
        printer.close()
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo("\n".join(([] if early.printed else [render_layers(result)]) + render_rest(result)))
    if out is not None and not as_json:
        click.echo(f"\nwrote {out}/ (result.json, layers.csv, figures)")
    _raise_if_damaged(result)


@cli.command()
@click.argument("result_json", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder for the figures; a result folder keeps "
                                                              "its result.json and CSVs, its figures are redrawn.")
@click.option("--format", "fig_format", default="png", show_default=True, type=click.Choice(["png", "pdf", "svg"]))
@_figure_options
def plot(result_json: str, out: str, fig_format: str, **figure_options) -> None:
    """Redraw the figures of a saved RESULT_JSON (hpa scan --out or --json) without rescanning."""
    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.api import redraw

    files = redraw(result_json, out, fig_format, **figure_options)
    click.echo(f"wrote {len(files)} figure files to {out}/: {', '.join(f.name for f in files)}")


@cli.command(name="list-models")
@click.argument("prefix")
@click.argument("pattern", required=False)
def list_models(prefix: str, pattern: str | None) -> None:
    """List the models a loader can build, e.g. hpa list-models timm 'vgg*'.

    A loader that knows each architecture's paper init (cifar) shows it beside the name:
    what 'hpa train --arch PREFIX:NAME' initialises with unless --init says otherwise.
    """

    names = hpa.list_models(prefix, pattern)
    scheme = registries()["loaders"].get(prefix).init_scheme
    width = max(map(len, names), default=0) + 2
    for name in names:
        click.echo(name if scheme is None else f"{name:<{width}}init={scheme(name)}")
    if not names:
        import re

        literal = max(re.split(r"[*?\[\]]+", pattern or ""), key=len)  # the longest part without wildcards
        close = suggest(literal, hpa.list_models(prefix)) if len(literal) >= 3 else ""
        raise HpaError(f"no {prefix} model matches {pattern!r}{close} ('hpa list-models {prefix}' lists them all)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List installed plugins: version, hooks, the loaders, statistics, tasks and experiments
    each registers, and their -o options."""
    described = describe_plugins()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for plugin in described:
        status = f"ERROR: {plugin['error']}" if "error" in plugin else ", ".join(plugin["hooks"])
        # the installed distribution and its version, as pip names them (what the user installed)
        installed = " ".join(filter(None, (plugin["distribution"], plugin["version"]))) or "-"
        click.echo(f"{plugin['name']:<16} {installed:<22} {status}")
        for kind in ("loaders", "statistics", "experiments"):
            for entry in plugin.get(kind, []):
                click.echo("\n".join(_registered_lines(entry)))


def _registered_lines(entry: dict[str, Any]) -> list[str]:
    """One registered loader/statistic/task/experiment, then one line per option it declares."""
    name = entry["name"] + ":" if entry["kind"] == "loader" else entry["name"]
    suffixes = f" [{' '.join(entry['suffixes'])}]" if entry.get("suffixes") else ""
    lines = [f"  {entry['kind']} {name}{suffixes}  {entry['description']}".rstrip()]
    for option in entry["options"]:
        choices = f" ({'|'.join(map(str, option['choices']))})" if option["choices"] else ""
        default = "" if option["default"] is None else f" [default: {option['default']}]"
        metavar = option["type"].upper() if option["type"] in ("bool", "int", "float", "str") else "VALUE"
        lines.append(f"      -o {option['name']}={metavar}{choices}  {option['help']}{default}")
    return lines


def _parse_extra(pairs) -> dict[str, str]:
    """``-o KEY=VALUE`` pairs as {key: the value string}; the core converts each value with the
    type its owner declares (hpa.registry.Option), so nothing is guessed here."""
    extra: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OptionError(f"-o expects KEY=VALUE, such as -o cones_device=cpu, not {pair!r}")
        if key in RESERVED_OPTIONS:
            flag = "--stat" if key == "statistics" else "--" + key.replace("_", "-")
            raise OptionError(f"-o {key} is a flag of its own: use {flag} instead")
        if key in extra:
            raise OptionError(f"-o {key} is given twice ({extra[key]!r} and {value!r}); give it once")
        extra[key] = value
    return extra


def _progress_printer():
    """Bars on a terminal, one plain line per stage elsewhere (hpa.render.progress)."""
    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.render.progress import StageProgress

    return StageProgress()


class _EarlyTable:
    """``on_statistic`` of ``hpa scan``: print the layer table as soon as the statistics that fill it
    are done (the cone statistic can take minutes after), and say up front what a slow one costs."""

    def __init__(self, printer, stream: bool) -> None:
        self.printer = printer  # StageProgress, or None when quiet
        self.stream = stream  # False for --json, which is printed once at the end
        self.printed = False

    def __call__(self, name: str, partial, finished: bool) -> None:
        if not finished:
            self._announce(name, partial)
            return
        pending = [n for n in partial.statistic_plugins if n not in partial.statistics]
        with_columns = [s for s in partial.statistic_plugins.values() if s.columns is not None]
        if self.stream and pending and not self.printed and all(s.name in partial.statistics for s in with_columns):
            # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
            from hpa.render.table import render_layers

            click.echo(render_layers(partial))
            sys.stdout.flush()
            self.printed = True

    def _announce(self, name: str, partial) -> None:
        """The estimated cost of a statistic that gives one (``Statistic.estimate``: those that can take minutes)."""
        stat = partial.statistic_plugins.get(name)
        if self.printer is None or stat is None or stat.estimate is None:
            return
        # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
        from hpa.render.progress import format_seconds

        work, seconds = stat.estimate(partial.graph, partial.options)
        others = [n for n in partial.statistic_plugins if n != name]
        skip = f"; --stat {' --stat '.join(others)} skips it" if others else ""
        cost = "under a second" if seconds < 1 else f"about {format_seconds(seconds)} (rough estimate)"
        self.printer.note(f"{name}: {work}, {cost}{skip}")


def _raise_if_damaged(result) -> None:
    damaged = result.damaged
    if damaged:
        more = f" (and {len(damaged) - 1} more layers)" if len(damaged) > 1 else ""
        raise NonFiniteWeightsError(damaged[0] + more)


def main(argv: list[str] | None = None) -> None:
    warnings.showwarning = _show_warning
    _register_plugin_commands()
    try:
        cli.main(args=argv, prog_name="hpa", standalone_mode=False)
    except HpaError as exc:
        _fail(exc)
    except click.exceptions.Abort as exc:
        stopped = exc.__cause__
        if isinstance(stopped, KeyboardInterrupt) and str(stopped):  # hpa train's line on how to continue
            click.echo(str(stopped), err=True)
            sys.exit(130)
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.UsageError as exc:  # one line, like every hpa error, with where to look
        where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
        click.echo(f"Error: {' '.join(exc.format_message().split()).rstrip('.')}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


def _fail(exc: BaseException) -> None:
    if os.environ.get("HPA_DEBUG"):
        traceback.print_exc()
    message = " ".join(str(exc).split())  # always one line
    click.echo(f"Error: {message}", err=True)
    sys.exit(_EXIT_BAD_INPUT)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, HpaWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _register_plugin_commands() -> None:
    plugin_manager().hook.register_commands(cli=cli)


# -- experiments ---------------------------------------------------------------------------

def _field_options(cls: type, section: str):
    """One ``hpa train`` flag per field of the dataclass ``cls`` (Recipe, Noise): ``--field-name``, of the
    field's type, its help the field's comment in hpa/experiments/types.py; None when not given."""
    helps = field_help(cls)

    def decorate(command):
        for item in reversed(fields(cls)):
            flag = "--" + item.name.replace("_", "-")
            kind = str(item.type).split("|")[0].strip()
            extra: dict[str, Any] = {"default": None, "help": f"{section}: {helps[item.name]}"}
            if kind == "bool":  # --flip/--no-flip for a field that defaults to True, else a plain flag
                names = [f"{flag}/--no-{flag[2:]}"] if item.default else [flag]
                extra.update({} if item.default else {"is_flag": True})
            else:
                names = [flag]
                extra["type"] = click.Choice(FLAG_CHOICES[item.name]) if item.name in FLAG_CHOICES else \
                    {"int": int, "float": float, "str": str}[kind]
                if item.name in FLAG_METAVARS:
                    extra["metavar"] = FLAG_METAVARS[item.name]
            command = click.option(*names, **extra)(command)
        return command

    return decorate


@cli.command()
@click.option("--plugin", "task", metavar="TASK", help="The training task, e.g. digits, cifar10 (hpa experiments).")
@click.option("--arch", metavar="SPEC", help="Architecture, a loader spec such as cifar:vgg19. Default: the task's.")
@click.option("--out", type=click.Path(), help="New folder for the run.")
@click.option("--resume", type=click.Path(), help="Continue the run in this folder.")
@click.option("--data", type=click.Path(), help="Folder holding the dataset files.")
@click.option("--download", is_flag=True, help="Fetch the dataset into --data when it is missing.")
@click.option("--seed", type=int, help="Seed of every random stream.  [default: 0]")
@click.option("--seeds", metavar="0,1,2", help="One run per seed in OUT/seed-N, plus a mean ± std summary.")
@click.option("--device", help="cpu, cuda or cuda:N.  [default: cuda when present]")
@click.option("--snapshot-every", type=int, help="Save weights every N epochs (and the last).  [default: 1]")
@_field_options(Recipe, "Recipe")
@click.option("--recipe", "recipe_name", metavar="NAME", help="A named recipe (hpa experiments lists them); the "
              "recipe flags above override its fields.  [default: paper, the task's own]")
@_field_options(Noise, "Noise")
@click.option("--random-labels", is_flag=True, default=None, help="Noise: the same as --label-noise 1.")
@click.option("--stat", "statistics", multiple=True,
              help="Statistic run on every snapshot, repeatable; 'none' for none.  [default: projection]")
@click.option("--log", "log", multiple=True, type=click.Choice(["tensorboard", "wandb", "mlflow"]),
              help="Also send each epoch's values to this dashboard (repeatable); needs hpa[NAME].")
@click.option("--progress/--no-progress", "bars", default=None,
              help="A live bar per epoch on stderr.  [default: when stderr is a terminal; else one line per epoch]")
@click.option("--quiet", is_flag=True, help="No progress on stderr (warnings and errors still show).")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]),
              help="Arithmetic: fp32 (faithful), tf32 (CUDA) or bf16 autocast.  [default: fp32]")
@click.option("--compile/--no-compile", "compiled", default=None, help="torch.compile the network.")
@click.option("--cpu-threads", type=int, metavar="N", help="CPU training: torch threads per process; a run is "
              "bitwise reproducible at the count it records.  [default: the usable cores / local processes]")
@click.option("--workers", type=click.IntRange(min=0), metavar="N", help="The streaming path: DataLoader "
              "workers per process decoding images (0: in the training process); never changes the numbers.  "
              "[default: the usable cores, at most 8, / local processes]")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Train on N local processes (one per GPU), started as torchrun starts them.")
def train(quiet: bool, bars, statistics, seeds, nproc, **options) -> None:
    """Train a task's network and write a run folder (snapshots, metrics, run.json).

    Recipe flags left out take the task's defaults (hpa experiments shows them);
    with --resume they keep the run's recorded values, and a different value is refused.

    \b
    Examples:
      hpa train --plugin digits --epochs 5 --out runs/digits
      hpa train --plugin cifar10 --arch cifar:vgg19 --data ~/data --out runs/vgg19
      hpa train --resume runs/vgg19
    """
    import shlex

    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.experiments.distributed import is_lead, launch, launched, without_nproc

    if nproc is not None and nproc > 1 and not launched():
        if seeds is not None:
            # here, not at the top: experiments.seeds imports numpy
            from hpa.experiments.seeds import ONE_PROCESS

            raise HpaError(ONE_PROCESS)
        # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
        from hpa.experiments.run import RunDir

        # The usual mistakes, refused here in one line rather than by every rank under torchrun.
        if options["resume"] is not None:
            RunDir.open(options["resume"])
        elif options["out"] is not None:
            RunDir.check_new(options["out"])
        sys.exit(launch(nproc, without_nproc(sys.argv[1:])))
    # here, not at the top: experiments.seeds imports numpy, experiments.train torch
    from hpa.experiments.seeds import is_multi_seed, parse_seeds, resume_seeds, train_seeds
    from hpa.experiments.train import train as run_training

    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.render.training_progress import TrainingProgress

    options.update(progress=None if quiet else TrainingProgress(bars=bars),
                   command=shlex.join(["hpa", *sys.argv[1:]]), statistics=statistics or None)
    if seeds is not None:
        if options["seed"] is not None:
            raise HpaError("give either --seed N or --seeds 0,1,2, not both")
        folder = train_seeds(parse_seeds(seeds), options.pop("out"), **options)
    elif options["resume"] and is_multi_seed(options["resume"]):
        folder = resume_seeds(options.pop("resume"), **options)
    else:
        folder = run_training(**options)
    if is_lead():
        click.echo(f"wrote {folder}/ (run.json, metrics.jsonl, snapshots/)")


@cli.command("analyse-run")
@click.argument("run_dir", type=click.Path())
@click.option("--stat", "statistics", multiple=True, required=True,
              help="Statistic to run on every saved snapshot (repeatable), e.g. one installed since.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def analyse_run(run_dir: str, statistics, quiet: bool) -> None:
    """Run statistics over every saved snapshot of an earlier 'hpa train' run, skipping epochs done.

    Updates stats/, series.csv (and a --seeds summary) atomically, then redraws figures/.

    \b
    Example:
      hpa analyse-run runs/vgg19 --stat cones
    """
    # here, not at the top: experiments.analyse_run imports numpy
    from hpa.experiments.analyse_run import analyse_run as run_analysis

    report = run_analysis(run_dir, list(statistics), progress=None if quiet else lambda line: click.echo(line, err=True))
    done = f"; {len(report['already_done'])} already done" if report["already_done"] else ""
    click.echo(f"analysed {len(report['analysed'])} snapshots{done}; updated {run_dir}/ (stats/, series.csv, figures/)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiments(as_json: bool) -> None:
    """List the training tasks with their dataset, default architecture and recipe, and the named recipes."""
    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.experiments.config import describe_tasks
    from hpa.experiments.types import INIT_SCHEMES, NAMED_RECIPES, PIXELS

    described = describe_tasks()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for task in described:
        click.echo(f"{task['name']:<14} --arch {task['architecture']:<18} {task['description']}")
        click.echo("    recipe: " + " ".join(f"{k}={v}" for k, v in task["recipe"].items()))
    click.echo("named recipes (hpa train --recipe NAME; recipe flags override their fields; docs/reproducing.md):")
    for named in NAMED_RECIPES.values():
        click.echo(f"  {named.name:<22} {named.description}")
    click.echo("init schemes (--init; default: the architecture's own, hpa list-models cifar):")
    for name, meaning in INIT_SCHEMES.items():
        click.echo(f"  {name:<22} {meaning}")
    click.echo("pixel representations (--pixels):")
    for name, meaning in PIXELS.items():
        click.echo(f"  {name:<22} {meaning}")


@cli.command()
@click.argument("run_or_spec")
@click.option("--epochs", metavar="0,5,10", help="Checkpoints to reset to.  [default: every saved epoch]")
@click.option("--layer", "layers", multiple=True, help="Layer to reset (repeatable).  [default: every conv]")
@click.option("--with-linear", is_flag=True, help="Also reset linear layers.")
@click.option("--rerandomize", is_flag=True, help="Draw each layer fresh from the architecture's initialiser.")
@click.option("--draws", type=int, default=1, show_default=True, help="Draws averaged with --rerandomize.")
@click.option("--reset-bn", is_flag=True, help="Reset the BatchNorm folded into each layer too.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--weights", metavar="FILE", help="A spec's trained weights (the reference is a fresh init).")
@click.option("--plugin", metavar="TASK", help="With a spec: the task whose test split is evaluated.")
@click.option("--data", type=click.Path(), help="Folder holding the task's dataset files.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of fresh inits and random draws.")
@click.option("--workers", type=click.IntRange(min=0), metavar="N", help="A streamed run: DataLoader workers "
              "decoding its test images (0: in this process).  [default: the usable cores, at most 8]")
@click.option("--out", type=click.Path(), help="Result folder.  [default: RUN_DIR/reinit]")
@click.option("--format", "fig_format", default="png", show_default=True, type=click.Choice(["png", "pdf", "svg"]))
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def reinit(run_or_spec: str, epochs, layers, out, fig_format: str, quiet: bool, **options) -> None:
    """Critical layers: reset each layer to each checkpoint and measure the test accuracy (Gamba et al. 2020 Fig. 2).

    \b
    Examples:
      hpa reinit runs/vgg19 --epochs 0,1,2,5,10
      hpa reinit cifar:small_max --weights model.safetensors --plugin digits --out reinit-small
    """
    # here, not at the top: experiments.reinit imports torch
    from hpa.experiments.reinit import parse_epochs, reinit as run_reinit, result_folder

    folder = result_folder(run_or_spec, out)
    result = run_reinit(run_or_spec, epochs=parse_epochs(epochs), layers=list(layers) or None,
                        progress=None if quiet else lambda line: click.echo(line, err=True), **options)
    result.save(folder, fig_format)
    click.echo(f"wrote {folder}/ (reinit.json, reinit.csv, heatmaps, criticality)")


@cli.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--out", required=True, type=click.Path(), help="The gallery folder: new, or one hpa gallery wrote "
                                                              "(it resumes; foreign files are refused).")
@click.option("--stat", "statistics", multiple=True, help="Statistic to run (repeatable).  [default: projection]")
@_load_options
@click.option("--skip-1x1", is_flag=True, help="Skip 1x1 convs, as the reference code did.")
@click.option("--with-linear", is_flag=True, help="Include linear layers.")
@click.option("--download", is_flag=True, help="Download weights that are not cached (default: list them as "
                                               "not cached, with the command that fills the cache).")
@click.option("--retry-failed", is_flag=True, help="Scan again the models that failed before (those not cached "
                                                   "are always looked at again).")
@click.option("--format", "fig_format", default="png", show_default=True, type=click.Choice(["png", "pdf", "svg"]))
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@executor_options
def gallery(specs, out: str, statistics, extra, fig_format: str, quiet: bool, **options) -> None:
    """Scan many models into one table: loader wildcards, model files, folders of them.

    \b
    Examples:
      hpa gallery 'timm:*' --weights none --out gallery-timm-init
      hpa gallery 'torchvision:resnet*' 'timm:resnet*' --out resnets
      hpa gallery 'timm:*' --weights none --jobs 2 --out gallery-timm-init
      hpa gallery checkpoints/ --out mine

    Each job of the executor scans a chunk of the models in a worker process of its own (with --jobs 1,
    the default, one after the other), so that a model that exhausts memory or crashes ends only its chunk.
    """
    # here, not at the top: the gallery scans (torch) and draws (matplotlib)
    from hpa.gallery.run import gallery_executor, run_gallery
    from hpa.render.gallery_progress import GalleryProgress

    executor = gallery_executor({key: options.pop(key) for key in EXECUTOR_FLAGS}, out)
    progress = None if quiet else GalleryProgress()
    try:
        report = run_gallery(specs, out, statistics=list(statistics) or None, fig_format=fig_format,
                             executor=executor, progress=progress,
                             on_plan=None if progress is None else progress.on_plan, **options, **_parse_extra(extra))
    finally:
        if progress is not None:
            progress.close()
    click.echo(report.coverage)
    if report.kept_logs is not None:
        click.echo(f"a job's process died; its log is in {report.kept_logs}/", err=True)
    click.echo(f"wrote {out}/ ({report.scanned_now} scanned now, {report.kept} kept): gallery.csv, coverage.txt, "
               f"not_cached.txt, figures/, models/")
# -- studies (hpa study, hpa reproduce) -------------------------------------------------------

def _command_options(command: click.Command) -> dict:
    """A command's flags as study fields (hpa.experiments.study_file.CommandOption), keyed by long name:
    a study file sets any option of hpa train (and hpa reinit) with nothing to declare twice."""
    # here: 'hpa --help' and 'hpa plugins' import only click and the plugin manager
    from hpa.experiments.study_file import CommandOption

    found = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_flag:
            kind, choices = "bool", ()
        elif isinstance(param.type, click.Choice):
            kind, choices = "choice", tuple(param.type.choices)
        else:
            kind, choices = {"integer": "int", "integer range": "int", "float": "float",
                             "float range": "float"}.get(param.type.name, "str"), ()
        negative = next((o for o in param.secondary_opts if o.startswith("--")), None)
        found[flag[2:].replace("-", "_")] = CommandOption(flag, kind, choices, bool(param.multiple), negative)
    return found


def _executor_for(flags: dict, out: str):
    from pathlib import Path

    from hpa.experiments.study import BOOKS  # here, not at the top: experiments.study imports numpy

    return make_executor(flags, Path(out).expanduser() / BOOKS / "submitit")


@cli.group()
def study() -> None:
    """Many runs at once: the cells of a grid, each with its seeds, here or on SLURM.

    \b
    A study file (TOML):
      [train]              any 'hpa train' option, by its long name
      plugin = "cifar10"
      arch = "cifar:vgg19"
      epochs = 100
      [grid]               the cells are the product of these lists
      schedule = ["step", "exponential"]
      seeds = [0, 1, 2]
      [reinit]             optional: 'hpa reinit' over every cell (its options)
    """


@study.command("run")
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="The study folder: new, or one this study started "
                                                            "(complete runs are skipped, the others resumed).")
@executor_options
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def study_run(study_file: str, out: str, quiet: bool, **flags) -> None:
    """Train every cell of STUDY_FILE into OUT/<cell>/seed-N, then summary.csv, summary.json and figures/.

    \b
    Examples:
      hpa study run vgg.toml --out studies/vgg --jobs 2
      hpa study run vgg.toml --out studies/vgg --executor slurm --partition gpu --gpus-per-task 1 --time 240
    """
    # here, not at the top: experiments.study imports numpy on its way to the summary
    from hpa.experiments.study import run_study

    executor = _executor_for({k: flags[k] for k in EXECUTOR_FLAGS}, out)
    report = run_study(study_file, out, executor, _command_options(train), _command_options(reinit),
                       progress=None if quiet else lambda line: click.echo(line, err=True))
    _say_study(report)


def _say_study(report) -> None:
    total = len(report.complete) + len(report.failed) + len(report.skipped)
    click.echo(f"wrote {report.out}/ (summary.csv, summary.json, figures/): {len(report.complete)} jobs done now, "
               f"{len(report.skipped)} were complete, {len(report.failed)} failed of {total}")
    if report.failed:
        first, reason = next(iter(report.failed.items()))
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        click.echo(f"Error: {first} failed: {reason}{more}; 'hpa study status {report.out}' lists them, and "
                   "running the study again retries them", err=True)
        sys.exit(1)


@study.command("status")
@click.argument("study_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_status(study_dir: str, as_json: bool) -> None:
    """Each job's state (pending, running, stopped, complete, failed and why; its SLURM job id), read only."""
    from dataclasses import asdict

    # here, not at the top: experiments.study imports numpy
    from hpa.experiments.study import study_status as read_status

    jobs = read_status(study_dir)
    if as_json:
        click.echo(json.dumps([asdict(job) for job in jobs], indent=1))
        return
    width = max((len(job.key) for job in jobs), default=4) + 2
    for job in jobs:
        extra = " ".join(filter(None, (f"epochs {job.epochs}" if job.epochs else "",
                                       f"job {job.job_id}" if job.job_id else "", job.reason or "")))
        click.echo(f"{job.key:<{width}}{job.state:<10}{extra}".rstrip())
    counts = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    click.echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


@cli.command()
@click.argument("figure")
@click.option("--data", type=click.Path(), help="Folder holding the datasets (cifar-10-batches-py/, MNIST/raw/, ...).")
@click.option("--out", type=click.Path(), help="The study folder (new, or this figure's, to resume it).")
@click.option("--epochs", type=click.IntRange(min=1), help="Smoke run: this many epochs instead of the paper's.")
@click.option("--seeds", type=click.IntRange(min=1), help="Smoke run: only the first N of the figure's seeds.")
@click.option("--subset", multiple=True, metavar="FIELD=VALUE",
              help="Smoke run: only the cells with this grid value, e.g. --subset plugin=mnist (repeatable).")
@executor_options
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def reproduce(figure: str, data, out, epochs, seeds, subset, quiet: bool, **flags) -> None:
    """Train a figure of Gamba et al. 2020 or 2019 as a built-in study and draw it in the paper's layout.

    FIGURE is a name that 'hpa reproduce list' shows, or 'list'.

    \b
    Examples:
      hpa reproduce list
      hpa reproduce fig7 --data ~/data --out studies/fig7 --jobs 2
      hpa reproduce fig7 --data ~/data --out smoke --epochs 1 --seeds 1
    """
    # here, not at the top: experiments.reproduce imports the study's numpy
    from hpa.experiments.reproduce import describe, figure_named, reproduce as run_figure

    if figure == "list":
        _list_figures(describe())
        return
    figure_named(figure)  # an unknown figure is refused before anything else
    if data is None or out is None:
        raise OptionError(f"hpa reproduce {figure} needs --data DIR (the datasets) and --out DIR (the study folder)")
    chosen = {}
    for pair in subset:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--subset expects FIELD=VALUE, such as --subset plugin=mnist, not {pair!r}")
        chosen[key.strip().replace("-", "_")] = value.strip()
    executor = _executor_for({k: flags[k] for k in EXECUTOR_FLAGS}, out)
    report = run_figure(figure, data, out, executor, _command_options(train), _command_options(reinit),
                        epochs=epochs, seeds=seeds, subset=chosen,
                        progress=None if quiet else lambda line: click.echo(line, err=True))
    figures = [str(p) for p in report.written if p.suffix == ".png" and "compare-" not in p.name]
    click.echo("figures: " + (", ".join(figures) or "none (no run finished)"))
    _say_study(report)


def _list_figures(rows) -> None:
    for row in rows:
        grid = " ".join(f"{k}={','.join(map(str, v))}" for k, v in row["grid"].items())
        also = f" (also {', '.join(row['aliases'])})" if row["aliases"] else ""
        click.echo(f"{row['name']:<14} {row['what']}{also}")
        click.echo(f"{'':<14} {row['runs']} run{'s' if row['runs'] > 1 else ''} x {row['epochs']} epochs{' + reinit' if row['reinit'] else ''}"
                   f" · grid {grid} · recipe {row['recipe']} · data {', '.join(row['data'])}")
