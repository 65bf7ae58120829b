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
from typing import Any

import click

from hpa import __version__
from hpa.errors import HpaError, NonFiniteWeightsError

_EXIT_BAD_INPUT = 2


def _load_options(function):
    """Options every model-loading command shares (names match hpa.load's keywords)."""
    decorators = [
        click.option("--weights", help="Weights: a name (e.g. IMAGENET1K_V1), a file path, or 'none' "
                                       "for a seeded random init. Default: the loader's default."),
        click.option("--input-size", metavar="C,H,W", help="Dummy input size for tracing, e.g. 3,224,224."),
        click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
                     help="Fold inference BatchNorm into the conv before it (STATISTICS.md §0)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled Python objects, which can execute code from the file."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of random initialisations."),
        click.option("-o", "--option", "extra", multiple=True, metavar="KEY=VALUE",
                     help="A plugin-specific option, repeatable."),
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


@cli.command()
@click.argument("spec")
@_load_options
@click.option("--stat", "statistics", multiple=True, help="Statistic to run (repeatable). Default: all.")
@click.option("--compare-init", is_flag=True, help="Also scan a seeded fresh init of the same architecture.")
@click.option("--init", type=click.Path(dir_okay=False), help="Compare against a saved initial snapshot.")
@click.option("--skip-1x1", is_flag=True, help="Skip 1x1 convs, as the reference code did.")
@click.option("--with-linear", is_flag=True, help="Include linear layers.")
@click.option("--bins", type=int, default=40, show_default=True, help="Histogram bins over [-1, 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout instead of the table.")
@click.option("--out", type=click.Path(file_okay=False), help="Write result.json, CSVs and figures here.")
@click.option("--format", "fig_format", default="png", show_default=True,
              type=click.Choice(["png", "pdf", "svg"]), help="Figure format for --out.")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
def scan(spec: str, statistics, as_json: bool, out: str | None, fig_format: str, progress, extra, **options):
    """Scan SPEC with the statistics and print a per-layer table.

    SPEC is PREFIX:NAME (torchvision:resnet18, timm:vgg19.tv_in1k, zoo:digits_cnn)
    or a model file (.pt .pth .bin .safetensors .onnx .mat).
    """
    import hpa
    from hpa.render.table import render_scan

    show = progress if progress is not None else sys.stderr.isatty()
    result = hpa.scan(spec, statistics=list(statistics) or None, progress=_progress_printer() if show else None,
                      **options, **_parse_extra(extra))
    if show:
        click.echo("", err=True)
    if out:
        from hpa.files import atomic_directory

        with atomic_directory(out) as staging:
            result.write(staging, fig_format)
    click.echo(result.to_json() if as_json else render_scan(result))
    if out and not as_json:
        click.echo(f"\nwrote {out}/ (result.json, layers.csv, figures)")
    _raise_if_damaged(result)


@cli.command(name="list-models")
@click.argument("prefix")
@click.argument("pattern", required=False)
def list_models(prefix: str, pattern: str | None) -> None:
    """List the models a loader can build, e.g. hpa list-models timm 'vgg*'."""
    import hpa

    names = hpa.list_models(prefix, pattern)
    for name in names:
        click.echo(name)
    if not names:
        raise HpaError(f"no {prefix} model matches {pattern!r}; try a wider pattern such as '*{pattern or ''}*'")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List installed plugins with their hooks and versions."""
    from hpa.plugins import describe_plugins

    described = describe_plugins()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for plugin in described:
        status = f"ERROR: {plugin['error']}" if "error" in plugin else ", ".join(plugin["hooks"])
        version = plugin["version"] or "-"
        click.echo(f"{plugin['name']:<14} {version:<10} {status}")


def _parse_extra(pairs) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HpaError(f"-o expects KEY=VALUE, not {pair!r}")
        try:
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    return extra


def _progress_printer():
    def show(what: str, done: int, total: int) -> None:
        text = f"{what} {done}/{total}" if total > 1 else what
        click.echo(f"\r\033[K{text}", err=True, nl=False)

    return show


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
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
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
    from hpa.plugins import HpaWarning

    if issubclass(category, HpaWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _register_plugin_commands() -> None:
    from hpa.plugins import plugin_manager

    plugin_manager().hook.register_commands(cli=cli)
