"""``servesim step``: predict one engine step's duration with the roofline cost model.

Example::

    servesim step --model llama-3.1-8b --hardware h100 --prefill 2048@0 --decode 32@1024

``--prefill NEW@CONTEXT`` adds one sequence computing NEW tokens on CONTEXT cached tokens;
``--decode BATCH@CONTEXT`` adds BATCH sequences decoding one token each on CONTEXT cached
tokens. Both repeat. ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import json

import click
import numpy as np

from simulator.costmodel import build_cost_params, step_breakdown
from simulator.hardware import HardwareProfileError, load_hardware
from simulator.models import ModelConfigError, load_model

__all__ = ["step_command"]


class CountAtContext(click.ParamType):
    """``A@B`` with A >= 1 and B >= 0 integers -> (A, B)."""

    name = "N@CONTEXT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        left, sep, right = text.partition("@")
        try:
            if not sep:
                raise ValueError
            count, context = int(left.replace("_", "")), int(right.replace("_", ""))
        except ValueError:
            self.fail(f"{text!r} is not of the form N@CONTEXT, e.g. 2048@0", param, ctx)
        if count < 1 or context < 0:
            self.fail(f"{text!r}: need N >= 1 and CONTEXT >= 0", param, ctx)
        return (count, context)


COUNT_AT_CONTEXT = CountAtContext()


def _table(result: dict) -> str:
    rows = [("group", "ms", "compute ms", "memory ms", "bound")]
    for name, g in result["groups"].items():
        if g["flops"] == 0.0 and g["bytes"] == 0.0:
            continue
        rows.append(
            (
                name,
                f"{g['seconds'] * 1e3:.3f}",
                f"{g['compute_seconds'] * 1e3:.3f}",
                f"{g['memory_seconds'] * 1e3:.3f}",
                g["bound"],
            )
        )
    rows.append(("overhead", f"{result['overhead_seconds'] * 1e3:.3f}", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 5)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("step")
@click.option("--model", "model_ref", required=True, help="Shipped model name or config.json path.")
@click.option(
    "--hardware", "hw_ref", required=True, help="h100-sxm (h100), h200, b200 or a YAML path."
)
@click.option(
    "--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel degree."
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp8"]),
    default="bf16",
    show_default=True,
    help="Weight dtype.",
)
@click.option(
    "--kv-dtype",
    type=click.Choice(["bf16", "fp8"]),
    default="bf16",
    show_default=True,
    help="KV-cache dtype.",
)
@click.option(
    "--prefill",
    "prefills",
    type=COUNT_AT_CONTEXT,
    multiple=True,
    help="NEW@CONTEXT: one sequence computing NEW tokens on CONTEXT cached ones.",
)
@click.option(
    "--decode",
    "decodes",
    type=COUNT_AT_CONTEXT,
    multiple=True,
    help="BATCH@CONTEXT: BATCH sequences decoding one token on CONTEXT cached ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def step_command(model_ref, hw_ref, tp, dtype, kv_dtype, prefills, decodes, as_json):
    """Predict the duration of one engine step (one forward pass of a batch)."""
    if not prefills and not decodes:
        raise click.UsageError("give at least one --prefill NEW@CONTEXT or --decode BATCH@CONTEXT")
    try:
        model = load_model(model_ref)
    except ModelConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    try:
        hw = load_hardware(hw_ref)
    except HardwareProfileError as exc:
        raise click.BadParameter(str(exc), param_hint="--hardware") from None
    try:
        params = build_cost_params(model, hw, tp=tp, weight_dtype=dtype, kv_dtype=kv_dtype)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    new: list[int] = []
    ctx: list[int] = []
    for count, context in prefills:
        new.append(count)
        ctx.append(context)
    for batch, context in decodes:
        new.extend([1] * batch)
        ctx.extend([context] * batch)
    result = step_breakdown(params, np.array(new, dtype=np.int64), np.array(ctx, dtype=np.int64))

    if as_json:
        out = {
            "seconds": result["seconds"],
            "overhead_seconds": result["overhead_seconds"],
            "groups": result["groups"],
            "model": model.name,
            "hardware": hw.name,
            "tp": tp,
            "dtype": dtype,
            "kv_dtype": kv_dtype,
            "num_seqs": len(new),
            "new_tokens": int(sum(new)),
        }
        click.echo(json.dumps(out))
        return
    click.echo(
        f"{model.name} on {hw.name} (tp={tp}, {dtype} weights, {kv_dtype} KV): "
        f"{len(new)} sequences, {sum(new):,} new tokens"
    )
    click.echo(f"predicted step time: {result['seconds'] * 1e3:.3f} ms")
    click.echo(_table(result))
