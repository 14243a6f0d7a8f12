"""The ``servesim`` command line: a thin shell over :mod:`simulator.simulate`.

Every user error (bad YAML, unknown field, impossible model/GPU combination, missing file)
prints one line naming the problem and exits with code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import simulator.cli_experiments as cx
from simulator.cli_calibrate import calibrate_command, validate_steps_command
from simulator.cli_step import step_command
from simulator.cli_workload import workload_group
from simulator.config import ExperimentError, experiment_json_schema, load_experiment
from simulator.metrics import fmt_seconds


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def print_summary(s: dict) -> None:
    """Human-readable summary of a run."""
    click.echo(
        f"requests: {s['num_finished']:,} finished, {s['num_rejected']:,} rejected, "
        f"{s['num_unfinished']:,} unfinished, in {s['simulated_seconds']:.1f} simulated s"
    )
    for reason, count in s["reject_reasons"].items():
        click.echo(f"  rejected ({reason}): {count:,}")
    click.echo(f"{'metric':<12}{'p50':>11}{'p90':>11}{'p95':>11}{'p99':>11}{'mean':>11}")
    for key, label in (("ttft", "TTFT"), ("tbt", "TBT"), ("tpot", "TPOT"), ("e2e", "E2E"),
                       ("queue_time", "queue")):
        row = "".join(f"{fmt_seconds(s[f'{key}_p{p}']):>11}" for p in (50, 90, 95, 99))
        click.echo(f"{label:<12}{row}{fmt_seconds(s[f'{key}_mean']):>11}")
    click.echo(
        f"throughput: {s['output_tokens_per_s']:,.0f} output tok/s "
        f"({s['output_tokens_per_s_per_gpu']:,.0f} per GPU, {s['num_gpus']} GPUs), "
        f"{s['requests_per_s']:.2f} req/s"
    )
    click.echo(
        f"prefix cache hit rate: {s['prefix_cache_hit_rate'] * 100:.1f}%   "
        f"preemptions: {s['num_preemptions']:,}   peak KV usage: {s['peak_kv_usage'] * 100:.1f}%   "
        f"evicted blocks: {s['num_evicted_blocks']:,}"
    )
    if s.get("host_tier"):
        click.echo(
            f"  of which GPU {s['gpu_cache_hit_rate'] * 100:.1f}%, host tier "
            f"{s['host_cache_hit_rate'] * 100:.1f}% ({s['num_host_loads']:,} loads, p95 wait "
            f"{fmt_seconds(s.get('host_load_time_p95', float('nan')))})   "
            f"prefetches: {s['num_prefetches']:,}"
        )
    if s.get("num_pins"):
        click.echo(f"session TTL: {s['num_pins']:,} protections, {s['num_pins_broken']:,} broken "
                   "early for memory")
    click.echo(f"wall time: {s['wall_seconds']:.2f} s ({s['num_events']:,} events)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servesim")
def main() -> None:
    """servesim: simulate GPU LLM serving of agentic workloads."""


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="directory for requests.parquet and summary.json (default: outputs.dir)")
@click.option("--seed", type=int, default=None, help="override the experiment's seed")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
@click.option("--check", is_flag=True,
              help="verify KV-block conservation every 10,000 events and token/time invariants "
                   "after the run")
@click.option("--progress/--no-progress", default=None, help="force the progress bar on/off")
@click.option("--band", "band_runs", type=int, default=0, metavar="N",
              help="also simulate N >= 2 cost models resampled from the profile's calibration "
                   "residuals; report p10/p50/p90 of TTFT, TBT, E2E and throughput (band.json)")
def run(experiment: Path, out_dir: Path | None, seed: int | None, as_json: bool, check: bool,
        progress: bool | None, band_runs: int) -> None:
    """Simulate EXPERIMENT (a YAML file) and print its summary."""
    from simulator.bands import (
        BandError,
        check_plans,
        experiment_residuals,
        format_band,
        run_band,
    )
    from simulator.simulate import check_decode_capacity, plan_replicas, simulate
    from simulator.workload.compile import compile_workload
    from simulator.workload.compiled import WorkloadError

    try:
        exp = load_experiment(experiment)
        if seed is not None:
            if seed < 0:
                raise ExperimentError(f"--seed: must be >= 0 (got {seed})")
            exp = exp.model_copy(update={"seed": seed})
        if band_runs < 0 or band_runs == 1:
            raise ExperimentError(f"--band: must be 0 (off) or at least 2 runs (got {band_runs})")
        plans = plan_replicas(exp)
        residuals = {}
        if band_runs:
            residuals = experiment_residuals(exp)
            check_plans(plans, residuals, exp._source)
        workload = compile_workload(exp.workload, exp.seed)
        check_decode_capacity(exp, plans, workload)
    except (ExperimentError, BandError, WorkloadError) as exc:
        _fail(str(exc))
        return
    if not as_json:
        click.echo(f"experiment {exp.name}: {len(plans)} replica(s), seed {exp.seed}")
        seen = set()
        for p in plans:
            key = (p.model, p.hardware, p.tp, p.num_blocks)
            if key in seen:
                continue
            seen.add(key)
            click.echo(f"  {p.model} on {p.hardware} x{p.tp}: {p.capacity_text}")
            if not p.calibrated:
                click.echo(f"  note: the {p.hardware} profile is not calibrated against measured "
                           "step times; step times are roofline estimates")
    try:
        result = simulate(exp, progress=progress, workload=workload,
                          check_every=10_000 if check else 0)
    except ExperimentError as exc:
        _fail(str(exc))
        return
    if check:
        from simulator.invariants import check_result

        problems = check_result(result)
        if problems:
            for p in problems:
                click.echo(f"invariant violated: {p}", err=True)
            sys.exit(1)
    target = out_dir or (Path(exp.outputs.dir) if exp.outputs.dir else None)
    if target is not None:
        result.save(target)
    summary = result.summary()
    band = None
    if band_runs:
        try:
            band = run_band(exp, plans, residuals, band_runs, summary, progress=progress)
        except BandError as exc:
            _fail(str(exc))
            return
        if target is not None:
            (target / "band.json").write_text(json.dumps(band, indent=2, default=float))
    if as_json:
        if band is not None:
            summary["band"] = band
        click.echo(json.dumps(summary, default=float))
    else:
        print_summary(summary)
        if check:
            click.echo("invariants: all hold")
        if band is not None:
            click.echo(format_band(band))
        if target is not None:
            click.echo(f"results written to {target}/" + (" (band: band.json)" if band else ""))


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="directory for summaries.parquet, metrics.png and speed_distribution.png")
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON records")
def compare(study_file: Path, out_dir: Path | None, as_json: bool) -> None:
    """Run the variants of STUDY_FILE and compare their metrics side by side."""
    from simulator.compare import load_study, run_study

    try:
        study, experiments = load_study(study_file)
        table, _ = run_study(study, experiments, out_dir)
    except ExperimentError as exc:
        _fail(str(exc))
        return
    shown = table[study.metrics]
    if as_json:
        click.echo(shown.reset_index().to_json(orient="records"))
        return
    click.echo(shown.T.to_string(float_format=lambda v: f"{v:,.4g}"))
    if out_dir is not None:
        click.echo(f"written: {out_dir}/summaries.parquet, {out_dir}/metrics.png, "
                   f"{out_dir}/speed_distribution.png")


@main.command()
def schema() -> None:
    """Print the JSON Schema of experiment YAML files."""
    click.echo(json.dumps(experiment_json_schema(), indent=2))


@main.command()
@click.option("--requests", "num_requests", type=click.IntRange(min=1000), default=None,
              help="requests in the benchmark workload [default: 100,000; --cluster 1,000,000; "
                   "--soak 10,000,000]")
@click.option("--cluster", is_flag=True,
              help="agentic sessions on 16 replicas with KV-aware routing, plus scaling checks")
@click.option("--soak", is_flag=True,
              help="10M requests through 1 and 16 replicas: rate and memory over the run")
@click.option("--no-scaling", is_flag=True, help="--cluster: skip the two scaling runs")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench(num_requests: int | None, cluster: bool, soak: bool, no_scaling: bool,
          as_json: bool) -> None:
    """Measure simulator speed (default: a chat workload on 1 H100 with Llama-3.1-8B)."""
    from simulator import bench as b

    if cluster and soak:
        _fail("bench: --cluster and --soak are separate benchmarks; pick one")
        return
    if cluster:
        report = b.run_cluster_bench(num_requests or 1_000_000, scaling=not no_scaling)
    elif soak:
        report = b.run_soak(num_requests or b.SOAK_REQUESTS)
    else:
        report = b.run_bench(num_requests or 100_000)
    if as_json:
        click.echo(json.dumps(report, default=float))
        return
    click.echo(f"JIT compile/load: {report['compile_seconds']:.2f} s "
               f"({'cache hit' if report['compile_seconds'] < 5 else 'cold'})")
    if cluster:
        _print_cluster_bench(report)
        return
    if soak:
        _print_soak(report)
        return
    click.echo(f"workload: {report['workload']}")
    click.echo(f"simulation: {report['num_requests']:,} requests in {report['wall_seconds']:.2f} "
               f"s wall = {report['requests_per_wall_second']:,.0f} simulated requests/s")
    click.echo(f"simulated: {report['simulated_seconds']:.0f} s, "
               f"{report['output_tokens_per_s']:,.0f} output tok/s, "
               f"TTFT p50 {fmt_seconds(report['ttft_p50'])}, peak KV {report['peak_kv_usage']:.0%}")
    click.echo(f"peak memory (RSS): {report['peak_rss_mib']:.0f} MiB")


def _print_cluster_bench(report: dict) -> None:
    click.echo(f"workload: {report['workload']}")
    for r in report["runs"]:
        click.echo(
            f"{r['label']}: {r['num_requests']:,} requests (prompts mean "
            f"{r['mean_prompt_tokens']:,.0f}, max {r['max_prompt_tokens']:,} tokens), "
            f"{r['num_events']:,} events ({r['events_per_request']:.1f}/request)\n"
            f"  wall {r['wall_seconds']:.1f} s (event core {r['loop_seconds']:.1f} s) = "
            f"{r['requests_per_wall_second']:,.0f} simulated requests/s; core: "
            f"{r['loop_us_per_request']:.1f} us/request, {r['loop_us_per_event']:.2f} us/event\n"
            f"  simulated {r['simulated_seconds']:,.0f} s: TTFT p50 {fmt_seconds(r['ttft_p50'])}"
            f", p95 {fmt_seconds(r['ttft_p95'])}, prefix hit rate "
            f"{r['prefix_cache_hit_rate']:.1%}, {r['num_preemptions']:,} preemptions; "
            f"peak RSS so far {r['peak_rss_mib']:,.0f} MiB")
    runs = {r["label"]: r for r in report["runs"]}
    if len(runs) == 5:
        main, quarter = runs["main"], runs["quarter requests"]
        short = runs["quarter requests, contexts / 4"]
        click.echo(
            f"linear in requests: {quarter['num_requests']:,} -> {main['num_requests']:,} "
            f"requests: core us/request {quarter['loop_us_per_request']:.1f} -> "
            f"{main['loop_us_per_request']:.1f} (x{main['loop_us_per_request'] / quarter['loop_us_per_request']:.2f})")
        click.echo(
            f"longer contexts: mean prompt {short['mean_prompt_tokens']:,.0f} -> "
            f"{quarter['mean_prompt_tokens']:,.0f} tokens: core us/event "
            f"{short['loop_us_per_event']:.2f} -> {quarter['loop_us_per_event']:.2f}, events per "
            f"request {short['events_per_request']:.1f} -> {quarter['events_per_request']:.1f}: "
            "fewer sessions fit a replica, so batches differ (the context check holds them fixed)")
        one, hundred = (runs[f"one at a time, {n:,}-token prompts"] for n in (1_000, 100_000))
        click.echo(
            f"context check (one request at a time, {one['events_per_request']:.0f} events "
            f"each): core us/event {one['loop_us_per_event']:.2f} with 1,000-token prompts, "
            f"{hundred['loop_us_per_event']:.2f} with 100,000-token prompts "
            f"(x{hundred['loop_us_per_event'] / one['loop_us_per_event']:.2f})")


def _print_soak(report: dict) -> None:
    for r in report["runs"]:
        click.echo(
            f"{r['label']}: {r['num_requests']:,} requests, {r['num_finished']:,} finished, "
            f"{r['num_rejected']:,} rejected, {r['num_unfinished']:,} unfinished "
            f"({'nothing lost' if r['all_accounted_for'] else 'REQUESTS LOST'}), "
            f"{r['num_events']:,} events\n"
            f"  wall {r['wall_seconds']:.0f} s (event core {r['loop_seconds']:.0f} s); first "
            f"vs last 10 % of requests: {r['rate_first_10pct']:,.0f} vs "
            f"{r['rate_last_10pct']:,.0f} requests per CPU s "
            f"(x{r['rate_ratio_last_to_first']:.2f}), "
            f"{r['event_rate_first_10pct']:,.0f} vs {r['event_rate_last_10pct']:,.0f} events/CPU s "
            f"(x{r['event_rate_ratio_last_to_first']:.2f})\n"
            f"  memory: RSS {r['rss_before_mib']:,.0f} MiB before, {r['rss_at_10pct_mib']:,.0f} "
            f"MiB at 10 %, {r['rss_at_end_of_core_mib']:,.0f} MiB when the core ends; "
            f"peak {r['peak_rss_mib']:,.0f} MiB")


main.add_command(step_command, name="step")
main.add_command(cx.capacity_command)
main.add_command(cx.sweep_command)
main.add_command(cx.plot_command)
main.add_command(cx.trace_command)
main.add_command(workload_group, name="workload")
main.add_command(calibrate_command)
main.add_command(validate_steps_command)
