"""``servesim workload``: inspect and fit workloads (trace files or workload YAML specs).

* ``servesim workload stats FILE [--json]``: the statistics of :mod:`simulator.workload.stats`.
* ``servesim workload fit FILE -o SPEC.yaml``: a ``kind: agentic`` spec fitted to a trace.

``FILE`` is a trace (Veeksha ``.jsonl``, OpenClaw ``.json``, Mooncake ``.jsonl``, Azure ``.csv``;
``--format`` overrides the detection) or a workload YAML (``.yaml``/``.yml``; compiled with
``--seed``, traffic included). Every user error prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from simulator.workload.compiled import WorkloadError

FORMAT_CHOICES = ("veeksha", "openclaw", "mooncake", "azure")


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a shared fit is written out at every use
        return True


def dump_spec(spec: dict) -> str:
    """YAML text of a spec mapping: nested mappings in block style, lists inline, no aliases."""
    return yaml.dump(
        spec, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=100
    )


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _load_graph(path: Path, fmt: str | None, seed: int, history: str | None):
    """The session graph of a trace file or a workload spec."""
    from simulator.workload.compile import load_workload_spec, workload_graph
    from simulator.workload.graph import compile_graph
    from simulator.workload.spec import AgenticWorkload, TraceWorkload
    from simulator.workload.trace import load_trace

    if path.suffix.lower() in (".yaml", ".yml"):
        spec = load_workload_spec(path)
        if not isinstance(spec, AgenticWorkload | TraceWorkload):
            raise WorkloadError(
                f"{path}: kind {spec.kind!r}: stats and fit need a session-graph workload "
                "(kind: agentic or kind: trace)"
            )
        g, start = workload_graph(spec, seed)
        return g, compile_graph(g, start)
    options = (("history", history),) if history else ()
    if history and (fmt or "") != "openclaw" and path.suffix.lower() != ".json":
        raise WorkloadError("--history applies to OpenClaw traces only")
    g = load_trace(path, fmt, options)
    return g, compile_graph(g)


@click.group(name="workload", context_settings={"help_option_names": ["-h", "--help"]})
def workload_group() -> None:
    """Inspect and fit workloads: trace files and workload specs."""


_file_arg = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
_format_opt = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMAT_CHOICES),
    default=None,
    help="trace format (default: from the file)",
)
_seed_opt = click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="seed for compiling a workload spec",
)
_history_opt = click.option(
    "--history",
    type=click.Choice(("full", "measured")),
    default=None,
    help="OpenClaw: prompts from full histories or as measured",
)


@workload_group.command()
@_file_arg
@_format_opt
@_seed_opt
@_history_opt
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def stats(file: Path, fmt: str | None, seed: int, history: str | None, as_json: bool) -> None:
    """Statistics of FILE: shape, token and wait distributions, cacheable tokens."""
    from simulator.workload.stats import format_stats, graph_stats

    try:
        g, wl = _load_graph(file, fmt, seed, history)
        s = graph_stats(g, wl)
    except WorkloadError as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(s) if as_json else format_stats(s))


@workload_group.command()
@_file_arg
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="where to write the fitted spec (YAML)",
)
@_format_opt
@_seed_opt
@_history_opt
def fit(file: Path, out: Path, fmt: str | None, seed: int, history: str | None) -> None:
    """Fit a synthetic agentic spec to FILE and write it to SPEC.yaml."""
    from simulator.workload.fit import fit_workload

    try:
        g, _ = _load_graph(file, fmt, seed, history)
        spec, report = fit_workload(g)
    except WorkloadError as exc:
        _fail(str(exc))
        return
    header = [
        f"# Fitted by `servesim workload fit` to {file}",
        f"# {report['requests']:,} requests in {report['sessions']:,} sessions.",
        f"# Distributions chosen by {report['criterion']} among lognormal, gamma, Weibull,",
        "# inverse Gaussian, exponential, Pareto and spike + Pareto tail (location 0).",
    ]
    for name, table in report["fits"].items():
        if table:
            ranks = ", ".join(f"{c['name']} {c['aic']:.0f}" for c in table[:4])
            header.append(f"#   {name}: AIC {ranks}")
    try:
        out.write_text("\n".join(header) + "\n" + dump_spec(spec))
    except OSError as exc:
        _fail(f"{out}: cannot write: {exc.strerror or exc}")
        return
    click.echo(f"wrote {out} ({len(spec['agents'])} agent type(s))")
