"""Measure NCCL all-reduce and all-gather times across the GPUs of one host.

Feeds ``simulator.calibrate.fit_allreduce`` (the cost model's tensor-parallel communication term).
Launch one process per GPU::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node=2 hardware_profiles/measure/allreduce.py --out DIR

and copy ``DIR`` to ``hardware_profiles/measurements/<gpu>x<n>/``. ``--dry-run`` needs neither
torch nor a GPU: it runs the bookkeeping (sizes, CSV, metadata, table) with made-up times.

Method:

- Ops: ``all_reduce`` (bf16, sum, in place) and ``all_gather`` (``all_gather_into_tensor``, bf16),
  message sizes 4 KiB .. 256 MiB in powers of 2, plus rows tagged ``tokens`` with the tensors a
  TP decoder layer of Llama-3.1-70B all-reduces (tokens x hidden 8192 x 2 bytes).
- ``bytes`` is the full tensor: the all-reduce buffer, the all-gather *output* (nccl-tests'
  convention). ``algbw = bytes / seconds``; ``busbw`` = algbw x 2(n-1)/n (all-reduce) or
  x (n-1)/n (all-gather), the per-link traffic of a ring.
- Each sample: all ranks barrier and synchronize, then ``k`` back-to-back calls between CUDA
  events (``k`` so that a sample lasts >= ``--min-ms``, 1 for large messages, the same on every
  rank), captured as one CUDA graph (``--no-graph``: an eager loop, which for small messages
  times the host's launch rate, ~60 us a call, not the GPU); sample time / k.
  Warm-up first; ``--iters`` samples (>= 20); each sample's time is the maximum over ranks
  (a collective finishes when its slowest rank does). ``seconds`` is the median, with
  ``seconds_min``/``seconds_max``.
- NVLink multicast (NVLS) is kept off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1.

Output (rank 0): ``allreduce.csv`` (op, bytes, seconds, seconds_min, seconds_max, world_size,
algbw_gb_s, busbw_gb_s, tokens) and ``metadata.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Must be set before NCCL initialises; never let multicast on (it can take a shared host's GPUs down).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

KiB = 1 << 10
MiB = 1 << 20
HIDDEN_70B = 8192
BF16_BYTES = 2
LAYER_TOKENS = (1, 8, 64, 256, 1024, 4096, 8192)
COLUMNS = (
    "op",
    "bytes",
    "seconds",
    "seconds_min",
    "seconds_max",
    "world_size",
    "algbw_gb_s",
    "busbw_gb_s",
    "tokens",
)


def sweep_sizes(lo: int = 4 * KiB, hi: int = 256 * MiB) -> list[int]:
    """Powers of 2 from ``lo`` to ``hi`` bytes inclusive."""
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def cases(world: int) -> list[tuple[str, int, int | None]]:
    """(op, bytes, tokens) to measure. all_gather bytes are the output size (a multiple of world)."""
    out: list[tuple[str, int, int | None]] = []
    for b in sweep_sizes():
        out.append(("all_reduce", b, None))
    for t in LAYER_TOKENS:
        out.append(("all_reduce", t * HIDDEN_70B * BF16_BYTES, t))
    for b in sweep_sizes():
        if b % (world * BF16_BYTES) == 0:
            out.append(("all_gather", b, None))
    return out


def bus_factor(op: str, world: int) -> float:
    if op == "all_reduce":
        return 2.0 * (world - 1) / world
    if op == "all_gather":
        return (world - 1) / world
    raise ValueError(op)


def make_row(op: str, nbytes: int, samples: list[float], world: int, tokens) -> dict:
    med = statistics.median(samples)
    algbw = nbytes / med / 1e9
    return {
        "op": op,
        "bytes": nbytes,
        "seconds": med,
        "seconds_min": min(samples),
        "seconds_max": max(samples),
        "world_size": world,
        "algbw_gb_s": algbw,
        "busbw_gb_s": algbw * bus_factor(op, world),
        "tokens": "" if tokens is None else tokens,
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (f"{v:.6e}" if isinstance(v, float) and k.startswith("second") else
                        (f"{v:.2f}" if isinstance(v, float) else v))
                    for k, v in r.items()
                }
            )


def fmt_bytes(b: int) -> str:
    if b >= MiB:
        return f"{b / MiB:g} MiB"
    return f"{b / KiB:g} KiB"


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<11} {'bytes':>10} {'tokens':>6} {'median us':>10} {'min us':>9} "
          f"{'max us':>9} {'algbw':>7} {'busbw':>7}")
    for r in rows:
        print(
            f"{r['op']:<11} {fmt_bytes(r['bytes']):>10} {str(r['tokens']):>6} "
            f"{r['seconds'] * 1e6:>10.2f} {r['seconds_min'] * 1e6:>9.2f} "
            f"{r['seconds_max'] * 1e6:>9.2f} {r['algbw_gb_s']:>7.1f} {r['busbw_gb_s']:>7.1f}"
        )
    sys.stdout.flush()


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - metadata only
        return f"unavailable: {exc}"


def base_metadata(args) -> dict:
    return {
        "script": "hardware_profiles/measure/allreduce.py",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("NCCL_", "TORCH_", "NVSHMEM_", "CUDA_", "WORLD_SIZE", "LOCAL_"))
        },
        "method": {
            "iters": args.iters,
            "warmup": args.warmup,
            "min_ms_per_sample": args.min_ms,
            "dtype": "bfloat16",
            "reduce_op": "sum",
            "timing": "CUDA events around k back-to-back calls after barrier+sync; per-sample max"
            " over ranks; median over samples",
            "bytes": "all_reduce: buffer; all_gather: output tensor",
        },
    }


def run_dry(args) -> None:
    world = 2
    rows = []
    for op, nbytes, tokens in cases(world):
        base = 8e-6 + bus_factor(op, world) * nbytes / (0.8 * 450e9)
        samples = [base * (1 + 0.01 * ((i * 7) % 5 - 2)) for i in range(args.iters)]
        rows.append(make_row(op, nbytes, samples, world, tokens))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "allreduce.csv", rows)
    meta = base_metadata(args) | {"dry_run": True, "world_size": world}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print_table(rows)


def run_cuda(args) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(args.hang_s, exit=True)  # a hang prints where it is
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"init ok: world {world}", flush=True)

    max_elems = max(b for _, b, _ in cases(world)) // BF16_BYTES
    buf = torch.randn(max_elems, dtype=torch.bfloat16, device=dev)
    gather_out = torch.empty(max_elems, dtype=torch.bfloat16, device=dev)

    # correctness check: all-reduce of rank+1 gives world(world+1)/2
    chk = torch.full((1024,), float(rank + 1), dtype=torch.bfloat16, device=dev)
    dist.all_reduce(chk)
    expect = world * (world + 1) / 2
    correct = bool(torch.all(chk == expect).item())
    if rank == 0:
        print(f"first all_reduce done, correct={correct}", flush=True)

    def op_fn(op: str, nbytes: int):
        n = nbytes // BF16_BYTES
        if op == "all_reduce":
            x = buf[:n]
            return lambda: dist.all_reduce(x, op=dist.ReduceOp.SUM)
        inp = buf[: n // world]
        out = gather_out[:n]
        return lambda: dist.all_gather_into_tensor(out, inp)

    def timed(run, k: int) -> float:
        """One sample: ``run()`` issues k calls (eager loop or one CUDA-graph replay)."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / k

    def agreed(value: float) -> float:
        """Max over ranks: every rank must issue the same number of collectives, or NCCL hangs."""
        t = torch.tensor([value], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def runner(fn, k: int):
        """k calls as one CUDA graph (no host launch gaps, as serving engines run them); eager
        loop where capture fails (the same on every rank)."""
        if not args.no_graph:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(k):
                        fn()
                torch.cuda.synchronize()
                return g.replay, "graph"
            except Exception as exc:  # noqa: BLE001 - fall back, recorded in metadata
                print(f"rank {rank}: graph capture failed ({exc}); eager", flush=True)
                torch.cuda.synchronize()

        def loop():
            for _ in range(k):
                fn()

        return loop, "eager"

    rows = []
    t0 = time.perf_counter()
    for op, nbytes, tokens in cases(world):
        fn = op_fn(op, nbytes)
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        one = agreed(min(timed(fn, 1) for _ in range(3)))
        k = max(1, min(200, int(args.min_ms * 1e-3 / max(one, 1e-7))))
        run, mode = runner(fn, k)
        if agreed(0.0 if mode == "graph" else 1.0) > 0 and mode == "graph":
            # another rank fell back: all ranks time the same way

            def run(fn=fn, k=k):
                for _ in range(k):
                    fn()

            mode = "eager"
        run()
        torch.cuda.synchronize()
        local = torch.tensor([timed(run, k) for _ in range(args.iters)], dtype=torch.float64,
                             device=dev)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        samples = local.tolist()
        rows.append(make_row(op, nbytes, samples, world, tokens) | {"_k": f"{k} {mode}"})
        if rank == 0:  # partial results survive a later hang
            write_csv(out / "allreduce.csv", [{c: r[c] for c in COLUMNS} for r in rows])
            print(f"{op} {nbytes} k={k} {rows[-1]['seconds'] * 1e6:.2f} us", flush=True)
    elapsed = time.perf_counter() - t0

    names = [None] * world
    dist.all_gather_object(names, torch.cuda.get_device_name(dev))
    if rank == 0:
        ks = {f"{r['op']}:{r['bytes']}": r.pop("_k") for r in rows}
        write_csv(out / "allreduce.csv", rows)
        nccl = torch.cuda.nccl.version()
        meta = base_metadata(args) | {
            "world_size": world,
            "gpu_names": names,
            "gpu_name": names[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "topology": _cmd(["nvidia-smi", "topo", "-m"]),
            "nvlink_status": _cmd(["nvidia-smi", "nvlink", "-s", "-i", "0"]),
            "allreduce_correct": correct,
            "calls_per_sample": ks,
            "elapsed_s": round(elapsed, 1),
        }
        (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"world {world}, {names}, torch {torch.__version__}, NCCL {meta['nccl']}, "
              f"check {'ok' if correct else 'FAILED'}, {elapsed:.0f} s")
        print_table(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-ms", type=float, default=0.5, help="minimum duration of one sample")
    ap.add_argument("--hang-s", type=float, default=200, help="dump stacks and exit after")
    ap.add_argument("--no-graph", action="store_true", help="eager calls, no CUDA graph")
    ap.add_argument("--dry-run", action="store_true", help="no torch/GPU: made-up times")
    args = ap.parse_args(argv)
    if args.iters < 20:
        ap.error("--iters must be >= 20")
    if args.dry_run:
        run_dry(args)
    else:
        run_cuda(args)


if __name__ == "__main__":
    main()
