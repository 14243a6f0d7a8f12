"""Measure GPU operator and whole-step times for ``servesim calibrate`` / ``validate-steps``.

Needs PyTorch with CUDA (the optional ``measure`` extra); the simulator itself never imports
torch. Run on the GPU to be calibrated::

    python hardware_profiles/measure/measure.py --out DIR [--budget-s 300]

and copy ``DIR`` to ``hardware_profiles/measurements/<gpu>/``. ``--dry-run`` runs every section
on the CPU with tiny shapes (checks the code paths and the CSV layout; the times mean nothing).

Method (see the docstrings below for each kind):

- Each operator case is captured as a CUDA graph of ``k`` back-to-back calls (``k`` chosen so a
  replay takes >= ``--min-ms``), replayed ``--reps`` times between CUDA events after a warm-up;
  ``seconds`` is the median replay time / ``k``; ``seconds_min``/``seconds_max`` the spread.
  Graph replay removes host launch gaps, as serving engines' CUDA graphs do.
- Inputs rotate among ``n_buffers`` independent sets whose total is >= 3x the L2 cache, so
  weights are streamed from HBM as in a real forward pass, never re-read from L2.
- Inputs are random (never zeros).
- Whole steps of Llama-3.1-8B: all 32 decoder layers with distinct weights (so weights stream
  from HBM), final norm and LM head, built from the same torch ops as the operator rows; timed as
  one CUDA graph (``seconds_graph``) and eagerly (``seconds_eager``). They are kept apart in
  ``steps.csv`` and never used for fitting.
- Whole steps of Qwen3-30B-A3B (section ``moe_steps``, rows of ``steps.csv``): 48 layers with
  real top-8 routing and ``torch._grouped_mm`` experts, the experts each layer touched recorded.
  Beside them (not in the default sections): ``moe_routing`` (the routing kernels alone),
  ``moe_routed`` (expert GEMMs under real routing), ``attention_decode_qwen3``, ``gdn`` (Gated
  DeltaNet kernels of flash-linear-attention where it imports, plus plain-torch proxies) and
  ``steps_recheck`` (a few Llama steps again, to compare runs of different days).

Output: one CSV per kind (``gemm.csv``, ``attention_prefill.csv``, ``attention_decode.csv``,
``moe.csv``, ``elementwise.csv``, ``memcpy.csv``, ``launch.csv``, ``steps.csv``, and those of the
sections above) with units in the column names, and ``metadata.json`` (GPU, software versions,
date, methods, checks, errors).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

GiB = 1 << 30

# ---- model shapes (from hardware_profiles/models/*.json) ----
LLAMA = dict(
    name="llama-3.1-8b",
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    inter=14336,
    layers=32,
    vocab=128256,
)
QWEN_MOE = dict(
    name="qwen3-30b-a3b",
    hidden=2048,
    heads=32,
    kv_heads=4,
    head_dim=128,
    moe_inter=768,
    experts=128,
    top_k=8,
    layers=48,
    vocab=151936,
)
# Gated DeltaNet (linear-attention) layers of Qwen3.5-35B-A3B
QWEN35_GDN = dict(
    name="qwen3.5-35b-a3b",
    hidden=2048,
    key_heads=16,
    value_heads=32,
    key_dim=128,
    value_dim=128,
    conv_kernel=4,
)

# (model, op, N, K): y[M, N] = x[M, K] @ W[N, K]^T
GEMM_SHAPES = [
    ("llama-3.1-8b", "qkv", 6144, 4096),
    ("llama-3.1-8b", "o", 4096, 4096),
    ("llama-3.1-8b", "gate_up", 28672, 4096),
    ("llama-3.1-8b", "down", 4096, 14336),
    ("llama-3.1-8b", "lm_head", 128256, 4096),
    ("qwen3-30b-a3b", "qkv", 5120, 2048),
    ("qwen3-30b-a3b", "o", 2048, 4096),
    ("square", "square", 8192, 8192),
]
GEMM_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def log(msg: str) -> None:
    print(msg, flush=True)


class Writer:
    """One CSV per kind, flushed per row. Its header is the union of the rows' fields: sections
    that share a file (``steps`` and ``moe_steps`` both write steps.csv) may add columns, and
    the file is rewritten with the wider header (rows lacking a field get it empty)."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: dict[str, list[dict]] = {}
        self.fields: dict[str, list[str]] = {}

    def row(self, kind: str, row: dict) -> None:
        rows = self.rows.setdefault(kind, [])
        fields = self.fields.setdefault(kind, [])
        rows.append(row)
        new = [k for k in row if k not in fields]
        fields.extend(new)
        path = self.out / f"{kind}.csv"
        if new:  # (re)write the whole file under the wider header
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(rows)
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)

    def close(self) -> None:
        """Every row is on disk already (files are closed after each write)."""


class Timer:
    """Times ``fn(i)`` (i = buffer index) by CUDA-graph replay or eagerly; CPU in dry runs."""

    def __init__(self, device: str, reps: int, min_ms: float, sustain_ms: float = 0.0):
        self.device = device
        self.cuda = device == "cuda"
        self.reps = reps
        self.min_s = min_ms / 1e3
        self.sustain_s = sustain_ms / 1e3
        self.nvml = None
        if self.cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 - clocks are informative only
                self.nvml = None

    def sm_clock_mhz(self) -> float:
        """Current SM clock (MHz) through NVML, or -1 where NVML is not available."""
        if self.nvml is None:
            return -1.0
        nv, handle = self.nvml
        try:
            return float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM))
        except Exception:  # noqa: BLE001
            return -1.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _eager_once(self, fn, k: int, start: int, nbuf: int) -> float:
        if self.cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            for j in range(k):
                fn((start + j) % nbuf)
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        for j in range(k):
            fn((start + j) % nbuf)
        return time.perf_counter() - t0

    def calls_per_replay(self, fn, nbuf: int, max_calls: int = 256) -> int:
        for i in range(min(3, nbuf) + 1):  # warm-up: module load, cuBLAS handles, autotuning
            fn(i % nbuf)
        self.sync()
        t = self._eager_once(fn, 3, 0, nbuf) / 3
        return max(1, min(max_calls, math.ceil(self.min_s / max(t, 1e-7))))

    def eager(self, fn, nbuf: int = 1, k: int | None = None) -> dict:
        """Median seconds per call, calls launched one after another from Python."""
        if k is None:
            k = self.calls_per_replay(fn, nbuf)
        else:
            fn(0)
            self.sync()
        times = sorted(self._eager_once(fn, k, r * k, nbuf) / k for r in range(self.reps))
        out = _summary(times, k, "eager")
        out["sm_clock_mhz"] = self.sm_clock_mhz()
        return out

    def graph(self, fn, nbuf: int = 1, k: int | None = None) -> dict:
        """Median seconds per call from replays of a CUDA graph of ``k`` calls."""
        if not self.cuda:
            return self.eager(fn, nbuf, k)
        if k is None:
            k = self.calls_per_replay(fn, nbuf)
        else:
            for i in range(2):
                fn(i % nbuf)
        self.sync()
        try:
            return self._graph(fn, nbuf, k)
        except Exception:  # noqa: BLE001 - not capturable: time eagerly, say so in `timing`
            torch.cuda.synchronize()
            return self.eager(fn, nbuf, k)

    def _graph(self, fn, nbuf: int, k: int) -> dict:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(0)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        self.sync()
        with torch.cuda.graph(g):
            for j in range(k):
                fn(j % nbuf)
        g.replay()
        self.sync()
        # sustained load first: clocks settle under the power limit as in a serving engine
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.sustain_s:
            g.replay()
            self.sync()
        times = []
        for _ in range(self.reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / k)
        clock = self.sm_clock_mhz()
        del g
        times.sort()
        out = _summary(times, k, "cuda_graph")
        out["sm_clock_mhz"] = clock
        return out


def _summary(times: list[float], k: int, method: str) -> dict:
    n = len(times)
    med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return {
        "seconds": med,
        "seconds_min": times[0],
        "seconds_max": times[-1],
        "calls_per_timing": k,
        "timing": method,
    }


def n_buffers(set_bytes: float, l2_bytes: int, cap_bytes: float = 6 * GiB, most: int = 64) -> int:
    """Input sets to rotate so their total is >= 3x L2 (at least 1, at most ``most``)."""
    n = math.ceil(3 * l2_bytes / max(set_bytes, 1.0))
    n = min(n, most, max(1, int(cap_bytes // max(set_bytes, 1.0))))
    return max(1, n)


def rnd(shape, device, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


# --------------------------------------------------------------------------------- attention


class Attention:
    """Causal GQA attention in (batch, seq, heads, head_dim) layout, keys aligned bottom-right.

    Preferred: ``aten._flash_attention_forward`` (FlashAttention-2 in PyTorch; native GQA, causal
    aligned to the bottom-right when the query is shorter than the keys, i.e. chunked prefill on
    a cached context). Fallback: ``F.scaled_dot_product_attention`` with an explicit mask. The
    method actually used is checked against an fp32 reference at start-up and recorded.
    """

    def __init__(self, device: str):
        self.device = device
        self.method = "sdpa"
        if device == "cuda":
            try:
                err = self._check(self._flash)
                if err < 2e-2:
                    self.method = "flash_aten"
                self.flash_error = err
            except Exception as exc:  # noqa: BLE001 - record and fall back
                self.flash_error = f"{type(exc).__name__}: {exc}"
        self.sdpa_error = self._check(self._sdpa)

    def __call__(self, q, k, v, causal: bool):
        if self.method == "flash_aten":
            return self._flash(q, k, v, causal)
        return self._sdpa(q, k, v, causal)

    @staticmethod
    def _flash(q, k, v, causal):
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False
        )
        return out[0]

    @staticmethod
    def _sdpa(q, k, v, causal):
        sq, sk = q.shape[1], k.shape[1]
        rep = q.shape[2] // k.shape[2]
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        if causal and sq == sk:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        elif causal and sq > 1:
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            mask = j <= i + (sk - sq)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(qt, kt, vt)
        return o.transpose(1, 2)

    def _check(self, fn) -> float:
        """Largest relative error of ``fn`` against an fp32 reference over a few shapes."""
        worst = 0.0
        for b, sq, sk in ((2, 1, 77), (1, 64, 64), (1, 48, 200)):
            q = rnd((b, sq, 8, 128), self.device)
            k = rnd((b, sk, 2, 128), self.device)
            v = rnd((b, sk, 2, 128), self.device)
            out = fn(q, k, v, True).float()
            qf = q.float().transpose(1, 2)
            kf = k.float().transpose(1, 2).repeat_interleave(4, dim=1)
            vf = v.float().transpose(1, 2).repeat_interleave(4, dim=1)
            s = qf @ kf.transpose(-1, -2) / math.sqrt(128)
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(~(j <= i + (sk - sq)), float("-inf"))
            ref = (s.softmax(-1) @ vf).transpose(1, 2)
            err = ((out - ref).norm() / ref.norm()).item()
            if not math.isfinite(err):
                return float("inf")
            worst = max(worst, err)
        return worst


def causal_pairs(q: int, c: int) -> int:
    """(query, key) pairs of a causal chunk of q new tokens on c cached ones."""
    return q * c + q * (q + 1) // 2


# ------------------------------------------------------------------------------- sections


class Ctx:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.dry = args.dry_run
        self.timer = Timer(device, args.reps, args.min_ms, args.sustain_ms)
        self.t_end = time.monotonic() + args.budget_s
        self.errors: list[str] = []
        self.sections: dict[str, dict] = {}
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
        else:
            self.l2 = 1 << 20
        self.attn = Attention(device)

    def left(self) -> float:
        return self.t_end - time.monotonic()

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        self.errors.append(msg)
        log("  ERROR " + msg)
        if self.device == "cuda":
            torch.cuda.empty_cache()


def sec_gemm(cx: Ctx, w: Writer) -> None:
    """bf16 ``F.linear`` and fp8 ``torch._scaled_mm`` (per-tensor scales, bf16 out)."""
    dev = cx.device
    shapes = GEMM_SHAPES if not cx.dry else [("tiny", "tiny", 64, 32)]
    ms = GEMM_M if not cx.dry else [1, 16, 64]
    fp8_ok = cx.device == "cuda" and hasattr(torch, "_scaled_mm")
    for model, op, n, k in shapes:
        for dtype in ("bf16", "fp8"):
            if dtype == "fp8" and not fp8_ok:
                continue
            eb = 2 if dtype == "bf16" else 1
            nb = n_buffers(n * k * eb, cx.l2)
            if dtype == "bf16":
                ws = [rnd((n, k), dev, scale=0.02) for _ in range(nb)]
            else:
                ws = [rnd((n, k), dev, scale=0.02).to(torch.float8_e4m3fn) for _ in range(nb)]
                one = torch.ones((), device=dev, dtype=torch.float32)
            for m in ms:
                if cx.left() < 0:
                    return
                if op in ("lm_head", "square") and m > 8192:
                    continue
                xs = [rnd((m, k), dev) for _ in range(nb)]
                if dtype == "fp8":
                    xs = [x.to(torch.float8_e4m3fn) for x in xs]

                    def fn(i, xs=xs, ws=ws, one=one):
                        return torch._scaled_mm(
                            xs[i], ws[i].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
                        )
                else:

                    def fn(i, xs=xs, ws=ws):
                        return F.linear(xs[i], ws[i])

                try:
                    r = cx.timer.graph(fn, nb)
                except Exception as exc:  # noqa: BLE001
                    cx.error(f"gemm {model} {op} {dtype} M={m}", exc)
                    continue
                flops = 2.0 * m * n * k
                nbytes = eb * (m * k + n * k) + 2 * m * n
                w.row(
                    "gemm",
                    dict(
                        model=model,
                        op=op,
                        dtype=dtype,
                        m=m,
                        n=n,
                        k=k,
                        flops=flops,
                        bytes=nbytes,
                        n_buffers=nb,
                        **r,
                        tflops_per_s=flops / r["seconds"] / 1e12,
                    ),
                )
            log(f"  gemm {model} {op} {dtype} done ({cx.left():.0f} s left)")
            del ws
            if dev == "cuda":
                torch.cuda.empty_cache()


def sec_attention_prefill(cx: Ctx, w: Writer) -> None:
    """Causal GQA prefill, batch 1, Llama-3.1-8B heads; ``context`` tokens already cached."""
    dev = cx.device
    hq, hk, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"]
    if cx.dry:
        hq, hk = 8, 2
    qs = [128, 256, 512, 1024, 2048, 4096, 8192, 16384] if not cx.dry else [16, 64]
    cs = [0, 2048, 8192, 32768] if not cx.dry else [0, 32]
    for c in cs:
        for q in qs:
            if cx.left() < 0:
                return
            if q + c > 40960 or (c > 0 and q > 8192):
                continue
            set_bytes = 2 * (2 * q * hq * d + 2 * (q + c) * hk * d)
            nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB, most=16)
            bufs = [
                (rnd((1, q, hq, d), dev), rnd((1, q + c, hk, d), dev), rnd((1, q + c, hk, d), dev))
                for _ in range(nb)
            ]

            def fn(i, bufs=bufs):
                return cx.attn(*bufs[i], True)

            try:
                r = cx.timer.graph(fn, nb)
            except Exception as exc:  # noqa: BLE001
                cx.error(f"attention_prefill q={q} c={c}", exc)
                continue
            pairs = causal_pairs(q, c)
            flops = 4.0 * hq * d * pairs
            nbytes = 2.0 * (2 * q * hq * d + 2 * (q + c) * hk * d)
            w.row(
                "attention_prefill",
                dict(
                    model=LLAMA["name"] if not cx.dry else "tiny",
                    heads=hq,
                    kv_heads=hk,
                    head_dim=d,
                    batch=1,
                    query_tokens=q,
                    context_tokens=c,
                    causal_pairs=pairs,
                    flops=flops,
                    bytes=nbytes,
                    n_buffers=nb,
                    method=cx.attn.method,
                    **r,
                    tflops_per_s=flops / r["seconds"] / 1e12,
                ),
            )
            del bufs
    log(f"  attention_prefill done ({cx.left():.0f} s left)")


def sec_attention_decode(cx: Ctx, w: Writer, cfg: dict = LLAMA, kind="attention_decode") -> None:
    """One query token per sequence over ``context`` cached tokens (+ itself), batch x context."""
    dev = cx.device
    hq, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    if cx.dry:
        hq, hk = hq // 4, hk // 4 or 1
    bs = [1, 4, 16, 64, 128, 256] if not cx.dry else [1, 4]
    cs = [256, 1024, 4096, 16384, 65536] if not cx.dry else [16, 64]
    for b in bs:
        for c in cs:
            if cx.left() < 0:
                return
            if b * c > (1 << 21):
                continue
            kv = c + 1
            set_bytes = 2 * (2 * b * hq * d + 2 * b * kv * hk * d)
            nb = n_buffers(set_bytes, cx.l2, cap_bytes=12 * GiB, most=16)
            bufs = [
                (rnd((b, 1, hq, d), dev), rnd((b, kv, hk, d), dev), rnd((b, kv, hk, d), dev))
                for _ in range(nb)
            ]

            def fn(i, bufs=bufs):
                return cx.attn(*bufs[i], True)

            try:
                r = cx.timer.graph(fn, nb)
            except Exception as exc:  # noqa: BLE001
                cx.error(f"attention_decode b={b} c={c}", exc)
                continue
            flops = 4.0 * hq * d * b * kv
            nbytes = 2.0 * (2 * b * hq * d + 2 * b * kv * hk * d)
            w.row(
                kind,
                dict(
                    model=cfg["name"] if not cx.dry else "tiny",
                    heads=hq,
                    kv_heads=hk,
                    head_dim=d,
                    batch=b,
                    context_tokens=c,
                    flops=flops,
                    bytes=nbytes,
                    n_buffers=nb,
                    method=cx.attn.method,
                    **r,
                    bandwidth_bytes_per_s=nbytes / r["seconds"],
                ),
            )
            del bufs
    log(f"  {kind} done ({cx.left():.0f} s left)")


def sec_attention_decode_qwen3(cx: Ctx, w: Writer) -> None:
    """Decode attention with Qwen3-30B-A3B's heads (32 query, 4 KV: 8 query heads per KV head,
    twice Llama-3.1-8B's group) in ``attention_decode_qwen3.csv``."""
    sec_attention_decode(cx, w, QWEN_MOE, "attention_decode_qwen3")


def sec_moe(cx: Ctx, w: Writer) -> None:
    """Qwen3-30B-A3B routed-expert GEMMs (gate_up then down) for T tokens over E touched experts.

    ``torch._grouped_mm`` (one grouped kernel per projection, rows sorted by expert) where it runs,
    else a Python loop of ``F.linear`` per expert; the ``method`` column says which.
    """
    dev = cx.device
    h, f, e_all, top = (QWEN_MOE[x] for x in ("hidden", "moe_inter", "experts", "top_k"))
    if cx.dry:
        h, f, e_all = 64, 32, 16
    ts = [1, 4, 16, 64, 256, 1024, 4096, 16384] if not cx.dry else [1, 8]
    expert_bytes = 3 * h * f * 2
    n_sets = n_buffers(e_all * expert_bytes, cx.l2, most=4)
    w13 = [rnd((e_all, 2 * f, h), dev, scale=0.02) for _ in range(n_sets)]
    w2 = [rnd((e_all, h, f), dev, scale=0.02) for _ in range(n_sets)]
    grouped = dev == "cuda" and hasattr(torch, "_grouped_mm")

    def run(x, offs, counts, e0, ne, s, method):
        a13 = w13[s][e0 : e0 + ne]
        a2 = w2[s][e0 : e0 + ne]
        if method == "grouped_mm":
            gu = torch._grouped_mm(x, a13.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
            act = F.silu(gu[:, :f]) * gu[:, f:]
            return torch._grouped_mm(act, a2.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
        outs = []
        start = 0
        for j, cnt in enumerate(counts):
            gu = F.linear(x[start : start + cnt], a13[j])
            act = F.silu(gu[:, :f]) * gu[:, f:]
            outs.append(F.linear(act, a2[j]))
            start += cnt
        return outs

    if grouped:  # check the grouped kernel against the loop once
        try:
            counts = [3, 0, 5, 8]
            x = rnd((16, h), dev)
            offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0).to(torch.int32)
            y1 = run(x, offs, counts, 0, 4, 0, "grouped_mm").float()
            y2 = torch.cat([o for o in run(x, offs, counts, 0, 4, 0, "loop")]).float()
            err = ((y1 - y2).norm() / y2.norm()).item()
            cx.sections.setdefault("checks", {})["moe_grouped_mm_rel_error"] = err
            grouped = err < 2e-2
        except Exception as exc:  # noqa: BLE001
            cx.error("moe grouped_mm check", exc)
            grouped = False
    method = "grouped_mm" if grouped else "loop"
    for t in ts:
        expected = e_all * (1.0 - (1.0 - top / e_all) ** t)
        touched = sorted({max(1, round(expected)), min(e_all, t * top), min(e_all, 8)})
        for ne in touched:
            if cx.left() < 0:
                return
            if ne > min(e_all, t * top):
                continue
            assign = t * top
            counts = [assign // ne + (1 if j < assign % ne else 0) for j in range(ne)]
            offs = torch.tensor(counts, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
            nb = max(1, min(16, n_buffers(ne * expert_bytes, cx.l2, most=16)))
            xs = [rnd((assign, h), dev) for _ in range(min(nb, 4))]
            starts = [(j * ne) % (e_all - ne + 1) for j in range(nb)]

            def fn(i, xs=xs, offs=offs, counts=counts, ne=ne, starts=starts):
                return run(xs[i % len(xs)], offs, counts, starts[i], ne, i % n_sets, method)

            try:
                r = cx.timer.graph(fn, nb)
            except Exception as exc:  # noqa: BLE001
                cx.error(f"moe T={t} E={ne}", exc)
                continue
            flops = 2.0 * assign * 3 * h * f
            w_bytes = ne * expert_bytes
            act_bytes = 2.0 * assign * (h + 2 * f + 2 * f + f + f + h)
            w.row(
                "moe",
                dict(
                    model=QWEN_MOE["name"] if not cx.dry else "tiny",
                    hidden=h,
                    moe_inter=f,
                    top_k=top,
                    tokens=t,
                    experts_touched=ne,
                    expected_touched=round(expected, 2),
                    flops=flops,
                    weight_bytes=w_bytes,
                    bytes=w_bytes + act_bytes,
                    n_buffers=nb,
                    method=method,
                    **r,
                ),
            )
    log(f"  moe done ({cx.left():.0f} s left)")


def sec_elementwise(cx: Ctx, w: Writer) -> None:
    """RMSNorm, SiLU-and-mul, residual add over Llama-3.1-8B widths; ``bytes`` = one read of
    each input and one write of each output (what a fused kernel moves)."""
    dev = cx.device
    h, f = LLAMA["hidden"], LLAMA["inter"]
    if cx.dry:
        h, f = 64, 128
    hq, hk, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"]
    if cx.dry:
        h, f, hq, hk, d = 64, 128, 4, 2, 16
    ts = [1, 16, 128, 1024, 4096, 16384] if not cx.dry else [1, 16]
    has_rms = hasattr(F, "rms_norm")
    ops = [s for s in cx.args.elementwise_ops.split(",") if s]
    for op in ops:
        for t in ts:
            if cx.left() < 0:
                return
            width = h
            if op == "rope":
                # RoPE on the q and k parts of a fused qkv output, as in the step rows
                set_bytes = t * (hq + 2 * hk) * d * 2
                nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB)
                xs = [rnd((t, hq + 2 * hk, d), dev) for _ in range(nb)]
                ang = torch.rand((t, 1, d // 2), device=dev) * 6.0
                cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

                def fn(i, xs=xs, cos=cos, sin=sin):
                    return rope_qk(xs[i], hq, hk, cos, sin)

                nbytes = 2 * t * (hq + hk) * d * 2
                width = (hq + hk) * d
            elif op == "kv_write":
                # new K and V rows written into a cache slice (two copies), as in the steps
                set_bytes = 2 * t * hk * d * 2
                nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB)
                srcs = [rnd((t, 2, hk, d), dev) for _ in range(nb)]
                caches = [rnd((2, t + 64, hk, d), dev) for _ in range(nb)]

                def fn(i, srcs=srcs, caches=caches, t=t):
                    caches[i][0, 64 : 64 + t].copy_(srcs[i][:, 0])
                    caches[i][1, 64 : 64 + t].copy_(srcs[i][:, 1])

                nbytes = 2 * 2 * t * hk * d * 2
                width = 2 * hk * d
            elif op == "rms_norm":
                set_bytes = 2 * t * h * 2
                nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB)
                xs = [rnd((t, h), dev) for _ in range(nb)]
                wt = rnd((h,), dev)

                def fn(i, xs=xs, wt=wt):
                    return rms_norm(xs[i], wt, has_rms)

                nbytes = 2 * t * h * 2 + h * 2
            elif op == "silu_mul":
                set_bytes = t * 2 * f * 2
                nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB)
                xs = [rnd((t, 2 * f), dev) for _ in range(nb)]

                def fn(i, xs=xs):
                    return F.silu(xs[i][:, :f]) * xs[i][:, f:]

                nbytes = t * 3 * f * 2
            else:
                set_bytes = 2 * t * h * 2
                nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB)
                xs = [rnd((t, h), dev) for _ in range(nb)]
                ys = [rnd((t, h), dev) for _ in range(nb)]

                def fn(i, xs=xs, ys=ys):
                    return xs[i] + ys[i]

                nbytes = 3 * t * h * 2
            try:
                r = cx.timer.graph(fn, nb)
            except Exception as exc:  # noqa: BLE001
                cx.error(f"elementwise {op} T={t}", exc)
                continue
            w.row(
                "elementwise",
                dict(
                    op=op,
                    tokens=t,
                    width=width if op != "silu_mul" else f,
                    bytes=nbytes,
                    n_buffers=nb,
                    **r,
                    bandwidth_bytes_per_s=nbytes / r["seconds"],
                ),
            )
    log(f"  elementwise done ({cx.left():.0f} s left)")


def rope_half(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_qk(qkv, hq, hk, cos, sin):
    """Rotary embedding of the q and k heads of a fused (tokens, heads, dim) qkv output."""
    return rope_half(qkv[:, :hq], cos, sin), rope_half(qkv[:, hq : hq + hk], cos, sin)


def rms_norm(x, wt, has_rms=True):
    if has_rms:
        return F.rms_norm(x, (x.shape[-1],), wt, 1e-5)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * wt


def sec_memcpy(cx: Ctx, w: Writer) -> None:
    """Device-to-device copy (bytes = read + written), pinned host<->device and pageable H2D."""
    dev = cx.device
    sizes = [1 << 20, 16 << 20, 256 << 20, 1 << 30] if not cx.dry else [1 << 16]
    for size in sizes:
        if cx.left() < 0:
            return
        n = size // 2
        nb = n_buffers(2 * size, cx.l2, cap_bytes=4 * GiB)
        src = [rnd((n,), dev) for _ in range(nb)]
        dst = [torch.empty_like(s) for s in src]

        def fn(i, src=src, dst=dst):
            dst[i].copy_(src[i])

        try:
            r = cx.timer.graph(fn, nb)
            w.row(
                "memcpy",
                dict(
                    direction="d2d",
                    size_bytes=size,
                    bytes=2 * size,
                    pinned=True,
                    **r,
                    bandwidth_bytes_per_s=2 * size / r["seconds"],
                ),
            )
        except Exception as exc:  # noqa: BLE001
            cx.error(f"memcpy d2d {size}", exc)
        del src, dst
        if dev != "cuda":
            continue
        host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True).normal_()
        pageable = torch.empty(n, dtype=torch.bfloat16).normal_()
        d = torch.empty(n, dtype=torch.bfloat16, device=dev)
        cases = [
            ("h2d", True, lambda i, d=d, s=host: d.copy_(s, non_blocking=True)),
            ("d2h", True, lambda i, d=d, s=host: s.copy_(d, non_blocking=True)),
            ("h2d", False, lambda i, d=d, s=pageable: d.copy_(s)),
        ]
        for direction, pinned, fn in cases:
            try:
                r = cx.timer.eager(fn, 1)
                w.row(
                    "memcpy",
                    dict(
                        direction=direction,
                        size_bytes=size,
                        bytes=size,
                        pinned=pinned,
                        **r,
                        bandwidth_bytes_per_s=size / r["seconds"],
                    ),
                )
            except Exception as exc:  # noqa: BLE001
                cx.error(f"memcpy {direction} pinned={pinned} {size}", exc)
        del host, pageable, d
    log(f"  memcpy done ({cx.left():.0f} s left)")


def sec_launch(cx: Ctx, w: Writer) -> None:
    """Per-kernel cost of a tiny kernel: eager launches from Python vs one CUDA graph replay."""
    x = torch.zeros(1, device=cx.device, dtype=torch.float32).normal_()
    k = 400

    def fn(i):
        x.add_(1.0)

    for method in ("eager", "cuda_graph"):
        try:
            r = cx.timer.eager(fn, 1, k) if method == "eager" else cx.timer.graph(fn, 1, k)
            w.row("launch", dict(kernel="add_scalar_1_element", kernels=k, **r))
        except Exception as exc:  # noqa: BLE001
            cx.error(f"launch {method}", exc)
    log(f"  launch done ({cx.left():.0f} s left)")


# ------------------------------------------------------------------------------ whole steps


def step_buffers(cx, c: dict, n_layers: int, rope_theta: float, pre_new: int, pre_ctx: int,
                 dec_batch: int, dec_ctx: int):
    """Inputs of one whole-step case: one prefill chunk of ``pre_new`` tokens after ``pre_ctx``
    cached ones, plus ``dec_batch`` decodes at ``dec_ctx``. KV buffers rotate over as many
    per-layer sets as ``--kv-budget-gib`` allows (at least 2, at most one per layer), so KV
    streams from HBM. Returns (tokens, KV sets, KV buffers, hidden states, rope cos, rope sin,
    index of the rows that feed the LM head)."""
    dev = cx.device
    h, d, hk = c["hidden"], c["head_dim"], c["kv_heads"]
    t = pre_new + dec_batch
    per_layer_kv = 2 * 2 * hk * d * ((pre_ctx + pre_new) + dec_batch * (dec_ctx + 1))
    n_kv = max(2, min(n_layers, int(cx.args.kv_budget_gib * GiB // per_layer_kv)))
    kv = []
    for _ in range(n_kv):
        kvp = None
        if pre_new:
            kvp = (rnd((1, pre_ctx + pre_new, hk, d), dev), rnd((1, pre_ctx + pre_new, hk, d), dev))
        kvd = None
        if dec_batch:
            kvd = (rnd((dec_batch, dec_ctx + 1, hk, d), dev),
                   rnd((dec_batch, dec_ctx + 1, hk, d), dev))
        kv.append((kvp, kvd))
    x0 = rnd((t, h), dev)
    pos = torch.cat(
        [
            torch.arange(pre_ctx, pre_ctx + pre_new, device=dev),
            torch.full((dec_batch,), dec_ctx, device=dev),
        ]
    ).float()
    inv = 1.0 / (rope_theta ** (torch.arange(0, d, 2, device=dev).float() / d))
    ang = pos[:, None] * inv[None, :]
    cos = ang.cos().to(torch.bfloat16)[:, None, :]
    sin = ang.sin().to(torch.bfloat16)[:, None, :]
    last = [pre_new - 1] if pre_new else []
    last += list(range(pre_new, t))
    last_idx = torch.tensor(last, device=dev, dtype=torch.long)
    return t, n_kv, kv, x0, cos, sin, last_idx


def step_attention(attn, q, k, v, kvp, kvd, pre_new, pre_ctx, dec_batch, dec_ctx):
    """Write the step's K/V into its buffers and attend: the prefill chunk (causal, after its
    cached context) and the decodes (one query each), as one [tokens, heads, dim] tensor."""
    outs = []
    if pre_new:
        kvp[0][0, pre_ctx:].copy_(k[:pre_new])
        kvp[1][0, pre_ctx:].copy_(v[:pre_new])
        outs.append(attn(q[None, :pre_new], kvp[0], kvp[1], True)[0])
    if dec_batch:
        kvd[0][:, dec_ctx].copy_(k[pre_new:])
        kvd[1][:, dec_ctx].copy_(v[pre_new:])
        outs.append(attn(q[pre_new:, None], kvd[0], kvd[1], True)[:, 0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class Llama:
    """Llama-3.1-8B forward over a batch: ``layers`` decoder layers with distinct bf16 weights,
    final RMSNorm and the LM head on one row per sequence (fp32 logits). RoPE applied with torch
    elementwise ops; new K/V written into the cache before attention."""

    def __init__(self, cx: Ctx, layers: int):
        self.cx = cx
        dev = cx.device
        c = dict(LLAMA)
        if cx.dry:
            c.update(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=256)
        self.c = c
        h, d, hq, hk, f = c["hidden"], c["head_dim"], c["heads"], c["kv_heads"], c["inter"]
        self.layers = []
        for _ in range(layers):
            self.layers.append(
                dict(
                    n1=1.0 + rnd((h,), dev, scale=0.01),
                    qkv=rnd(((hq + 2 * hk) * d, h), dev, scale=0.02),
                    o=rnd((h, hq * d), dev, scale=0.02),
                    n2=1.0 + rnd((h,), dev, scale=0.01),
                    gu=rnd((2 * f, h), dev, scale=0.02),
                    down=rnd((h, f), dev, scale=0.02),
                )
            )
        self.norm = 1.0 + rnd((h,), dev, scale=0.01)
        self.head = rnd((c["vocab"], h), dev, scale=0.02)
        self.has_rms = hasattr(F, "rms_norm")

    def make_step(self, pre_new, pre_ctx, dec_batch, dec_ctx):
        """Build buffers for one batch; returns a zero-argument callable running the forward."""
        cx, c = self.cx, self.c
        d, hq, hk = c["head_dim"], c["heads"], c["kv_heads"]
        t, n_kv, kv, x0, cos, sin, last_idx = step_buffers(
            cx, c, len(self.layers), 500000.0, pre_new, pre_ctx, dec_batch, dec_ctx)
        attn = cx.attn
        layers = self.layers
        has_rms = self.has_rms

        def step():
            x = x0
            for li, L in enumerate(layers):
                kvp, kvd = kv[li % n_kv]
                hn = rms_norm(x, L["n1"], has_rms)
                qkv = F.linear(hn, L["qkv"]).view(t, hq + 2 * hk, d)
                q, k = rope_qk(qkv, hq, hk, cos, sin)
                v = qkv[:, hq + hk :]
                a = step_attention(attn, q, k, v, kvp, kvd, pre_new, pre_ctx, dec_batch, dec_ctx)
                x = x + F.linear(a.reshape(t, hq * d), L["o"])
                hn = rms_norm(x, L["n2"], has_rms)
                gu = F.linear(hn, L["gu"])
                f = gu.shape[1] // 2
                x = x + F.linear(F.silu(gu[:, :f]) * gu[:, f:], L["down"])
            hn = rms_norm(x.index_select(0, last_idx), self.norm, has_rms)
            return F.linear(hn, self.head).float()

        return step


def sec_steps(cx: Ctx, w: Writer) -> None:
    """Whole forward steps of Llama-3.1-8B (validation only, never fitted)."""
    layers = LLAMA["layers"] if not cx.dry else 2
    model = Llama(cx, layers)
    if cx.dry:
        cases = [(16, 0, 0, 0), (0, 0, 4, 32), (8, 16, 2, 16)]
    else:
        cases = [(q, 0, 0, 0) for q in (128, 512, 1024, 2048, 4096, 8192)]
        cases += [(2048, 2048, 0, 0), (2048, 8192, 0, 0), (512, 4096, 0, 0), (8192, 8192, 0, 0)]
        cases += [
            (0, 0, b, c)
            for b in (1, 8, 32, 64, 128, 256)
            for c in (512, 2048, 8192)
            if b * c <= (1 << 21)
        ]
        cases += [
            (512, 0, 32, 2048),
            (2048, 0, 32, 2048),
            (2048, 4096, 64, 1024),
            (512, 2048, 128, 4096),
            (1024, 0, 16, 8192),
            (256, 8192, 64, 2048),
            (4096, 0, 8, 4096),
        ]
    checked = False
    for pre_new, pre_ctx, dec_b, dec_c in cases:
        if cx.left() < 0:
            return
        kind = "mixed" if pre_new and dec_b else ("prefill" if pre_new else "decode")
        try:
            step = model.make_step(pre_new, pre_ctx, dec_b, dec_c)
            if not checked:
                out = step()
                cx.sections.setdefault("checks", {})["step_logits_finite"] = bool(
                    torch.isfinite(out).all().item()
                )
                checked = True
            rg = cx.timer.graph(lambda i, step=step: step(), 1, 1)
            re_ = cx.timer.eager(lambda i, step=step: step(), 1, 1)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"step {kind} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}", exc)
            continue
        finally:
            step = None
            if cx.device == "cuda":
                torch.cuda.empty_cache()
        w.row(
            "steps",
            dict(
                model=LLAMA["name"] if not cx.dry else "tiny",
                kind=kind,
                layers=layers,
                prefill_new_tokens=pre_new,
                prefill_context_tokens=pre_ctx,
                decode_batch=dec_b,
                decode_context_tokens=dec_c,
                seconds_graph=rg["seconds"],
                seconds_graph_min=rg["seconds_min"],
                seconds_graph_max=rg["seconds_max"],
                seconds_eager=re_["seconds"],
                sm_clock_mhz=rg.get("sm_clock_mhz", -1.0),
                attention_method=cx.attn.method,
            ),
        )
        log(
            f"  step {kind:7s} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}: "
            f"graph {rg['seconds'] * 1e3:.3f} ms, eager {re_['seconds'] * 1e3:.3f} ms"
        )
    log(f"  steps done ({cx.left():.0f} s left)")


# ------------------------------------------------------------------- MoE whole steps (Qwen3)


def moe_route(hn, router_w, e: int, k: int, ones):
    """Router GEMM, softmax, top-k (weights renormalised, Qwen3's norm_topk_prob) and the
    dispatch order: assignments sorted by expert. Returns (order, src_token, weights in sorted
    order, per-expert counts (int32), offsets (int32 cumsum))."""
    logits = F.linear(hn, router_w)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    topw, ids = torch.topk(probs, k, dim=-1)
    topw = topw / topw.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    src = torch.div(order, k, rounding_mode="floor")
    counts = torch.zeros(e, device=hn.device, dtype=torch.int32).scatter_add_(
        0, flat, ones[: flat.numel()]
    )
    offs = counts.cumsum(0, dtype=torch.int32)
    wts = topw.reshape(-1).index_select(0, order).to(hn.dtype)
    return src, wts, counts, offs


def moe_experts(xs, w13, w2, offs, counts, f: int, grouped: bool):
    """gate_up, SiLU and mul, down over rows sorted by expert: ``torch._grouped_mm`` per
    projection, or (no grouped kernel, e.g. on a CPU) a loop of ``F.linear`` per expert."""
    if grouped:
        gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
        act = F.silu(gu[:, :f]) * gu[:, f:]
        return torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)
    outs = []
    start = 0
    for j, cnt in enumerate(counts.tolist()):
        if cnt:
            gu = F.linear(xs[start : start + cnt], w13[j])
            outs.append(F.linear(F.silu(gu[:, :f]) * gu[:, f:], w2[j]))
        start += cnt
    return torch.cat(outs)


def moe_block(hn, L, c: dict, ones, grouped: bool, record: list | None = None):
    """One Qwen3 MoE block (no shared expert): route, dispatch (gather rows by expert), grouped
    expert GEMMs, combine (scale by the routing weight, scatter-add back to the tokens)."""
    src, wts, counts, offs = moe_route(hn, L["router"], c["experts"], c["top_k"], ones)
    if record is not None:
        record.append(int((counts > 0).sum().item()))
    xs = hn.index_select(0, src)
    y = moe_experts(xs, L["w13"], L["w2"], offs, counts, c["moe_inter"], grouped)
    y = y * wts[:, None]
    return torch.zeros_like(hn).index_add_(0, src, y)


def moe_reference(hn, L, c: dict):
    """fp32 per-token reference of :func:`moe_block` (for the correctness check)."""
    f = c["moe_inter"]
    x = hn.float()
    probs = torch.softmax(x @ L["router"].float().t(), dim=-1)
    topw, ids = torch.topk(probs, c["top_k"], dim=-1)
    topw = topw / topw.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(c["top_k"]):
            e = int(ids[t, j])
            gu = x[t] @ L["w13"][e].float().t()
            out[t] += topw[t, j] * ((F.silu(gu[:f]) * gu[f:]) @ L["w2"][e].float().t())
    return out


class QwenMoe:
    """Qwen3-30B-A3B forward over a batch: 48 decoder layers, final RMSNorm and the LM head on
    one row per sequence (fp32 logits). Attention as in :class:`Llama` plus Qwen3's per-head
    RMSNorm on q and k; the MLP is :func:`moe_block` (router, top-8 of 128 experts by real
    routing of the batch's hidden states, grouped expert GEMMs). The 48 layers cycle over
    ``sets`` distinct weight sets (each set's experts are 1.2 GB, 24x the L2 cache, so every
    layer streams its weights from HBM)."""

    def __init__(self, cx: Ctx, weight_gib: float, residual_scale: bool = False):
        self.cx = cx
        dev = cx.device
        c = dict(QWEN_MOE)
        if cx.dry:
            c.update(
                hidden=64,
                heads=4,
                kv_heads=2,
                head_dim=16,
                moe_inter=32,
                experts=16,
                top_k=4,
                layers=2,
                vocab=256,
            )
        self.c = c
        h, d, hq, hk = c["hidden"], c["head_dim"], c["heads"], c["kv_heads"]
        e, f = c["experts"], c["moe_inter"]
        set_bytes = 2 * ((hq + 2 * hk) * d * h + h * hq * d + e * h + 3 * e * h * f)
        n_sets = max(2, min(c["layers"], int(weight_gib * GiB // set_bytes)))
        # all weights at 0.02 (what the committed rows ran). With it the causal prefill's
        # averaged attention outputs pile up in the residual stream, the tokens' hidden states
        # converge and the router sends them to few experts (measured: 45 of 128 touched by 128
        # prefill tokens; decode batches of independent sequences route uniformly).
        # --moe-residual-scale puts the output projections (o, expert down) at 0.02 /
        # sqrt(2 x layers) (GPT-2's residual scaling) to keep the tokens apart.
        out_scale = 0.02 / math.sqrt(2 * c["layers"]) if residual_scale else 0.02
        self.sets = []
        for _ in range(n_sets):
            self.sets.append(
                dict(
                    n1=1.0 + rnd((h,), dev, scale=0.01),
                    qkv=rnd(((hq + 2 * hk) * d, h), dev, scale=0.02),
                    qn=1.0 + rnd((d,), dev, scale=0.01),
                    kn=1.0 + rnd((d,), dev, scale=0.01),
                    o=rnd((h, hq * d), dev, scale=out_scale),
                    n2=1.0 + rnd((h,), dev, scale=0.01),
                    router=rnd((e, h), dev, scale=0.02),
                    w13=rnd((e, 2 * f, h), dev, scale=0.02),
                    w2=rnd((e, h, f), dev, scale=out_scale),
                )
            )
        self.norm = 1.0 + rnd((h,), dev, scale=0.01)
        self.head = rnd((c["vocab"], h), dev, scale=0.02)
        self.has_rms = hasattr(F, "rms_norm")
        self.grouped = dev == "cuda" and hasattr(torch, "_grouped_mm")
        self.max_tokens = 1 << 15
        self.ones = torch.ones(self.max_tokens * c["top_k"], device=dev, dtype=torch.int32)

    def check(self) -> float:
        """Relative error of the MoE block against the fp32 per-token reference (5 tokens)."""
        hn = rnd((5, self.c["hidden"]), self.cx.device)
        L = self.sets[0]
        got = moe_block(hn, L, self.c, self.ones, self.grouped).float()
        ref = moe_reference(hn, L, self.c)
        return ((got - ref).norm() / ref.norm()).item()

    def make_step(self, pre_new, pre_ctx, dec_batch, dec_ctx):
        """Build buffers for one batch; returns ``step(record=None)`` running the forward
        (``record``: a list that gets the number of experts touched in every layer)."""
        cx, c = self.cx, self.c
        d, hq, hk = c["head_dim"], c["heads"], c["kv_heads"]
        t, n_kv, kv, x0, cos, sin, last_idx = step_buffers(
            cx, c, c["layers"], 1000000.0, pre_new, pre_ctx, dec_batch, dec_ctx)
        attn = cx.attn
        sets = self.sets
        has_rms = self.has_rms
        grouped = self.grouped
        ones = self.ones
        layers = c["layers"]

        def step(record=None):
            x = x0
            for li in range(layers):
                L = sets[li % len(sets)]
                kvp, kvd = kv[li % n_kv]
                hn = rms_norm(x, L["n1"], has_rms)
                qkv = F.linear(hn, L["qkv"]).view(t, hq + 2 * hk, d)
                q = rope_half(rms_norm(qkv[:, :hq], L["qn"], has_rms), cos, sin)
                k = rope_half(rms_norm(qkv[:, hq : hq + hk], L["kn"], has_rms), cos, sin)
                v = qkv[:, hq + hk :]
                a = step_attention(attn, q, k, v, kvp, kvd, pre_new, pre_ctx, dec_batch, dec_ctx)
                x = x + F.linear(a.reshape(t, hq * d), L["o"])
                hn = rms_norm(x, L["n2"], has_rms)
                x = x + moe_block(hn, L, c, ones, grouped, record)
            hn = rms_norm(x.index_select(0, last_idx), self.norm, has_rms)
            return F.linear(hn, self.head).float()

        return step


def step_cases(dry: bool) -> list[tuple[int, int, int, int]]:
    """(prefill new, prefill context, decode batch, decode context) of the whole-step rows."""
    if dry:
        return [(16, 0, 0, 0), (0, 0, 4, 32), (8, 16, 2, 16)]
    cases = [(q, 0, 0, 0) for q in (128, 512, 1024, 2048, 4096, 8192)]
    cases += [(2048, 2048, 0, 0), (2048, 8192, 0, 0), (512, 4096, 0, 0), (8192, 8192, 0, 0)]
    cases += [
        (0, 0, b, c)
        for b in (1, 8, 32, 64, 128, 256)
        for c in (512, 2048, 8192)
        if b * c <= (1 << 21)
    ]
    cases += [
        (512, 0, 32, 2048),
        (2048, 0, 32, 2048),
        (2048, 4096, 64, 1024),
        (512, 2048, 128, 4096),
        (1024, 0, 16, 8192),
        (256, 8192, 64, 2048),
        (4096, 0, 8, 4096),
    ]
    return cases


def sec_moe_steps(cx: Ctx, w: Writer) -> None:
    """Whole forward steps of Qwen3-30B-A3B (validation only, never fitted): rows of
    ``steps.csv`` with ``model`` = qwen3-30b-a3b, plus the experts the routing touched."""
    model = QwenMoe(cx, cx.args.moe_weight_gib, cx.args.moe_residual_scale)
    c = model.c
    checks = cx.sections.setdefault("checks", {})
    try:
        checks["moe_block_rel_error"] = model.check()
    except Exception as exc:  # noqa: BLE001
        cx.error("moe block check", exc)
    checks["moe_steps_weight_sets"] = len(model.sets)
    checks["moe_steps_method"] = "grouped_mm" if model.grouped else "loop"
    checked = False
    for pre_new, pre_ctx, dec_b, dec_c in step_cases(cx.dry):
        if cx.left() < 0:
            return
        kind = "mixed" if pre_new and dec_b else ("prefill" if pre_new else "decode")
        touched: list[int] = []
        try:
            step = model.make_step(pre_new, pre_ctx, dec_b, dec_c)
            out = step(touched)
            if not checked:
                checks["moe_step_logits_finite"] = bool(torch.isfinite(out).all().item())
                checked = True
            rg = cx.timer.graph(lambda i, step=step: step(), 1, 1)
            re_ = cx.timer.eager(lambda i, step=step: step(), 1, 1)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"moe step {kind} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}", exc)
            continue
        finally:
            step = None
            if cx.device == "cuda":
                torch.cuda.empty_cache()
        tokens = pre_new + dec_b
        e, k = c["experts"], c["top_k"]
        w.row(
            "steps",
            dict(
                model=QWEN_MOE["name"] if not cx.dry else "tiny-moe",
                kind=kind,
                layers=c["layers"],
                prefill_new_tokens=pre_new,
                prefill_context_tokens=pre_ctx,
                decode_batch=dec_b,
                decode_context_tokens=dec_c,
                seconds_graph=rg["seconds"],
                seconds_graph_min=rg["seconds_min"],
                seconds_graph_max=rg["seconds_max"],
                seconds_eager=re_["seconds"],
                sm_clock_mhz=rg.get("sm_clock_mhz", -1.0),
                attention_method=cx.attn.method,
                timing=rg["timing"],
                moe_method="grouped_mm" if model.grouped else "loop",
                weight_sets=len(model.sets),
                residual_scale=bool(cx.args.moe_residual_scale),
                experts_touched_mean=sum(touched) / max(1, len(touched)),
                experts_touched_expected=round(e * (1.0 - (1.0 - k / e) ** tokens), 2),
            ),
        )
        log(
            f"  moe step {kind:7s} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}: "
            f"graph {rg['seconds'] * 1e3:.3f} ms, eager {re_['seconds'] * 1e3:.3f} ms, "
            f"experts touched {sum(touched) / max(1, len(touched)):.1f}"
        )
    log(f"  moe steps done ({cx.left():.0f} s left)")


def sec_moe_routing(cx: Ctx, w: Writer) -> None:
    """The MoE block minus its GEMMs (router and experts), T tokens of Qwen3-30B-A3B: softmax,
    top-8, renormalise, sort by expert, counts and offsets, gather of the rows (dispatch), and
    scaling by the routing weight plus scatter-add back to the tokens (combine). Operator rows
    (``moe_routing.csv``) for the per-MoE-layer routing cost."""
    dev = cx.device
    c = dict(QWEN_MOE)
    if cx.dry:
        c.update(hidden=64, experts=16, top_k=4)
    h, e, k = c["hidden"], c["experts"], c["top_k"]
    ts = [1, 4, 16, 64, 256, 1024, 4096, 16384] if not cx.dry else [1, 8]
    ones = torch.ones(max(ts) * k, device=dev, dtype=torch.int32)
    for t in ts:
        if cx.left() < 0:
            return
        set_bytes = 2 * (t * e + t * h + 2 * t * k * h)
        nb = n_buffers(set_bytes, cx.l2, cap_bytes=2 * GiB, most=16)
        bufs = [(rnd((t, h), dev), rnd((t * k, h), dev)) for _ in range(nb)]
        router = rnd((e, h), dev, scale=0.02)
        logits = [F.linear(b[0], router) for b in bufs]

        def fn(i, bufs=bufs, logits=logits):
            hn, y = bufs[i]
            probs = torch.softmax(logits[i], dim=-1, dtype=torch.float32)
            topw, ids = torch.topk(probs, k, dim=-1)
            topw = topw / topw.sum(-1, keepdim=True)
            flat = ids.reshape(-1)
            _, order = torch.sort(flat, stable=True)
            src = torch.div(order, k, rounding_mode="floor")
            counts = torch.zeros(e, device=dev, dtype=torch.int32).scatter_add_(
                0, flat, ones[: flat.numel()]
            )
            counts.cumsum(0, dtype=torch.int32)
            wts = topw.reshape(-1).index_select(0, order).to(hn.dtype)
            xs = hn.index_select(0, src)
            out = torch.zeros_like(hn).index_add_(0, src, y * wts[:, None])
            return xs, out

        try:
            r = cx.timer.graph(fn, nb)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"moe_routing T={t}", exc)
            continue
        # logits (bf16) read, probabilities (fp32) written and read, gathered rows read and
        # written, expert outputs read, scaled copy written and read, output zeroed and written
        nbytes = 2 * t * e + 8 * t * e + 2 * (2 * t * k * h) + 2 * (3 * t * k * h) + 2 * 2 * t * h
        w.row(
            "moe_routing",
            dict(
                model=QWEN_MOE["name"] if not cx.dry else "tiny",
                hidden=h,
                experts=e,
                top_k=k,
                tokens=t,
                bytes=nbytes,
                n_buffers=nb,
                **r,
            ),
        )
        del bufs, logits
    log(f"  moe_routing done ({cx.left():.0f} s left)")


def sec_moe_routed(cx: Ctx, w: Writer) -> None:
    """Expert GEMMs as the whole MoE step runs them (``moe_routed.csv``, the columns of
    ``moe.csv``): T random tokens routed by a random router (real top-8 of 128), one
    ``torch._grouped_mm`` per projection over all 128 experts with the routing's offsets (empty
    groups included), SiLU and mul between. Each rotating input set routes differently, so the
    experts it touches differ from set to set and their weights come from HBM."""
    dev = cx.device
    c = dict(QWEN_MOE)
    if cx.dry:
        c.update(hidden=64, moe_inter=32, experts=16, top_k=4)
    h, f, e, k = c["hidden"], c["moe_inter"], c["experts"], c["top_k"]
    ts = [1, 4, 16, 64, 256, 1024, 4096, 16384] if not cx.dry else [1, 8]
    w13 = rnd((e, 2 * f, h), dev, scale=0.02)
    w2 = rnd((e, h, f), dev, scale=0.02)
    router = rnd((e, h), dev, scale=0.02)
    ones = torch.ones(max(ts) * k, device=dev, dtype=torch.int32)
    grouped = dev == "cuda" and hasattr(torch, "_grouped_mm")
    expert_bytes = 3 * h * f * 2
    for t in ts:
        if cx.left() < 0:
            return
        expected = e * (1.0 - (1.0 - k / e) ** t)
        nb = max(1, min(16, n_buffers(expected * expert_bytes, cx.l2, most=16)))
        bufs = []
        touched = []
        for _ in range(nb):
            hn = rnd((t, h), dev)
            src, _, counts, offs = moe_route(hn, router, e, k, ones)
            bufs.append((hn.index_select(0, src), offs, counts))
            touched.append(int((counts > 0).sum().item()))

        def fn(i, bufs=bufs):
            xs, offs, counts = bufs[i]
            return moe_experts(xs, w13, w2, offs, counts, f, grouped)

        try:
            r = cx.timer.graph(fn, nb)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"moe_routed T={t}", exc)
            continue
        ne = sum(touched) / len(touched)
        assign = t * k
        w_bytes = ne * expert_bytes
        act_bytes = 2.0 * assign * (h + 2 * f + 2 * f + f + f + h)
        w.row(
            "moe_routed",
            dict(
                model=QWEN_MOE["name"] if not cx.dry else "tiny",
                hidden=h,
                moe_inter=f,
                top_k=k,
                tokens=t,
                experts_touched=round(ne, 2),
                expected_touched=round(expected, 2),
                flops=2.0 * assign * 3 * h * f,
                weight_bytes=w_bytes,
                bytes=w_bytes + act_bytes,
                n_buffers=nb,
                method="grouped_mm_all_experts" if grouped else "loop",
                **r,
            ),
        )
        del bufs
    log(f"  moe_routed done ({cx.left():.0f} s left)")


def sec_steps_recheck(cx: Ctx, w: Writer) -> None:
    """A few Llama-3.1-8B whole steps again (``steps_recheck.csv``): the same cases as rows of
    ``steps.csv`` measured on an earlier day, to tell a different machine or day from a model
    error when new step rows are compared with the cost model."""
    layers = LLAMA["layers"] if not cx.dry else 2
    model = Llama(cx, layers)
    cases = [(512, 0, 0, 0), (2048, 0, 0, 0), (0, 0, 1, 2048), (0, 0, 64, 2048), (0, 0, 256, 2048)]
    cases += [(512, 0, 32, 2048)]
    if cx.dry:
        cases = [(16, 0, 0, 0), (0, 0, 4, 32)]
    for pre_new, pre_ctx, dec_b, dec_c in cases:
        if cx.left() < 0:
            return
        kind = "mixed" if pre_new and dec_b else ("prefill" if pre_new else "decode")
        try:
            step = model.make_step(pre_new, pre_ctx, dec_b, dec_c)
            rg = cx.timer.graph(lambda i, step=step: step(), 1, 1)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"recheck step {kind} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}", exc)
            continue
        finally:
            step = None
            if cx.device == "cuda":
                torch.cuda.empty_cache()
        w.row(
            "steps_recheck",
            dict(
                model=LLAMA["name"] if not cx.dry else "tiny",
                kind=kind,
                layers=layers,
                prefill_new_tokens=pre_new,
                prefill_context_tokens=pre_ctx,
                decode_batch=dec_b,
                decode_context_tokens=dec_c,
                seconds_graph=rg["seconds"],
                seconds_graph_min=rg["seconds_min"],
                seconds_graph_max=rg["seconds_max"],
                sm_clock_mhz=rg.get("sm_clock_mhz", -1.0),
            ),
        )
        log(
            f"  recheck {kind:7s} {pre_new}@{pre_ctx} + {dec_b}x1@{dec_c}: {rg['seconds'] * 1e3:.3f} ms"
        )
    del model
    if cx.device == "cuda":
        torch.cuda.empty_cache()
    log(f"  steps_recheck done ({cx.left():.0f} s left)")


# ------------------------------------------------------------- Gated DeltaNet (Qwen3.5 GDN)


def gdn_recurrent_torch(q, k, v, g, beta, state):
    """One decode step of the gated delta rule in plain torch ops (unfused; what the
    ``torch_recurrent`` rows time). q, k: [B, H, K] (l2-normalised, q scaled); v: [B, H, V];
    g: [B, H] log-decay; beta: [B, H]; state: [B, H, K, V] fp32. Returns (out [B, H, V], new
    state)."""
    s = state * g.exp()[..., None, None]
    kv_mem = (s * k[..., None]).sum(-2)
    delta = (v - kv_mem) * beta[..., None]
    s = s + k[..., None] * delta[..., None, :]
    return (s * q[..., None]).sum(-2), s


def _l2n(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def load_fla():
    """flash-linear-attention's gated-delta-rule kernels, or the reason they are unavailable."""
    try:
        import fla  # noqa: F401
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    import fla as fla_mod

    return (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule), getattr(
        fla_mod, "__version__", "unknown"
    )


def sec_gdn(cx: Ctx, w: Writer) -> None:
    """Gated DeltaNet layer core of Qwen3.5-35B-A3B (16 key heads, 32 value heads, d_k = d_v =
    128). With flash-linear-attention installed: its Triton kernels, ``chunk_gated_delta_rule``
    for a prefill chunk (batch 1 x T tokens) and ``fused_recurrent_gated_delta_rule`` for a
    decode step (B sequences x 1 token, fp32 state read and written), 16 q/k heads shared by
    32 value heads inside the kernel (its grouped-value mode). Always, as proxies: the
    decode step in plain torch ops (``torch_recurrent``) and a bare read + write of the fp32
    state (``torch_state_rw``, the roofline's minimum traffic). Rows in ``gdn.csv``."""
    dev = cx.device
    c = dict(QWEN35_GDN)
    if cx.dry:
        c.update(key_heads=2, value_heads=4, key_dim=16, value_dim=16)
    hk, hv, dk, dv = c["key_heads"], c["value_heads"], c["key_dim"], c["value_dim"]
    rep = hv // hk
    kern, info = load_fla() if dev == "cuda" else (None, "not tried on the CPU")
    checks = cx.sections.setdefault("checks", {})
    checks["gdn_fla"] = info if kern is None else f"flash-linear-attention {info}"
    log(f"  gdn kernel: {checks['gdn_fla']}")
    flops_tok = 6.0 * hv * dk * dv  # the cost model's per-token core FLOPs
    state_b = 4 * hv * dk * dv  # fp32 delta-rule state per sequence

    def inputs(b, t):
        q = _l2n(torch.randn((b, t, hk, dk), device=dev))
        k = _l2n(torch.randn((b, t, hk, dk), device=dev))
        v = torch.randn((b, t, hv, dv), device=dev)
        g = -torch.rand((b, t, hv), device=dev) * 0.1 - 0.01
        beta = torch.rand((b, t, hv), device=dev).sigmoid()
        return q, k, v, g, beta

    if kern is not None:
        chunk, recur = kern
        cases_only_check = cx.args.gdn_budget_s <= 0
        try:  # fused recurrent step against the torch recurrence
            q, k, v, g, beta = inputs(3, 1)
            s0 = torch.randn((3, hv, dk, dv), device=dev) * 0.1
            o, s1 = recur(
                q.bfloat16(),
                k.bfloat16(),
                v.bfloat16(),
                g,
                beta.bfloat16(),
                scale=dk**-0.5,
                initial_state=s0,
                output_final_state=True,
            )
            ro, rs = gdn_recurrent_torch(
                q[:, 0].repeat_interleave(rep, dim=1) * dk**-0.5,
                k[:, 0].repeat_interleave(rep, dim=1),
                v[:, 0],
                g[:, 0],
                beta[:, 0],
                s0,
            )
            checks["gdn_fla_recurrent_rel_error"] = (
                (o[:, 0].float() - ro).norm() / ro.norm()
            ).item()
            checks["gdn_fla_state_rel_error"] = ((s1.float() - rs).norm() / rs.norm()).item()
            checks["gdn_check_finite"] = {
                "fla_out": bool(torch.isfinite(o).all().item()),
                "fla_state": bool(torch.isfinite(s1).all().item()),
                "torch_out": bool(torch.isfinite(ro).all().item()),
                "torch_state": bool(torch.isfinite(rs).all().item()),
                "fla_out_shape": list(o.shape),
                "fla_state_shape": list(s1.shape),
            }
        except Exception as exc:  # noqa: BLE001
            cx.error("gdn fla check", exc)
            kern = None
    if kern is not None and cases_only_check:
        log(f"  gdn check only: {checks}")
        return
    cases = []
    bs = [1, 4, 16, 64, 128, 256] if not cx.dry else [1, 4]
    for b in bs:
        cases += [("decode", "torch_state_rw", b, 1), ("decode", "torch_recurrent", b, 1)]
        if kern is not None:
            cases.append(("decode", "fla_fused_recurrent", b, 1))
    if kern is not None:
        for t in (64, 256, 1024, 4096, 16384):
            cases.append(("prefill", "fla_chunk", 1, t))
    t_stop = time.monotonic() + cx.args.gdn_budget_s
    for phase, method, b, t in cases:
        if cx.left() < 0 or time.monotonic() > t_stop:
            cx.errors.append(f"gdn stopped before {phase} {method} B={b} T={t}: budget")
            return
        set_bytes = b * state_b + b * t * 2 * (2 * hk * dk + 2 * hv * dv)
        nb = n_buffers(set_bytes, cx.l2, cap_bytes=4 * GiB, most=16)
        try:
            bufs = []
            for _ in range(nb):
                q, k, v, g, beta = inputs(b, t)
                s0 = torch.randn((b, hv, dk, dv), device=dev) * 0.1
                bufs.append((q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), s0))
            if method == "torch_state_rw":
                outs = [torch.empty_like(x[5]) for x in bufs]
                decay = [x[3][:, 0].exp()[..., None, None] for x in bufs]

                def fn(i, bufs=bufs, outs=outs, decay=decay):
                    torch.mul(bufs[i][5], decay[i], out=outs[i])

            elif method == "torch_recurrent":

                def fn(i, bufs=bufs):
                    q, k, v, g, beta, s0 = bufs[i]
                    return gdn_recurrent_torch(
                        q[:, 0].float().repeat_interleave(rep, dim=1) * dk**-0.5,
                        k[:, 0].float().repeat_interleave(rep, dim=1),
                        v[:, 0].float(),
                        g[:, 0],
                        beta[:, 0].float(),
                        s0,
                    )

            elif method == "fla_fused_recurrent":

                def fn(i, bufs=bufs):
                    q, k, v, g, beta, s0 = bufs[i]
                    return recur(
                        q, k, v, g, beta, scale=dk**-0.5, initial_state=s0, output_final_state=True
                    )

            else:

                def fn(i, bufs=bufs):
                    q, k, v, g, beta, s0 = bufs[i]
                    return chunk(
                        q,
                        k,
                        v,
                        g,
                        beta,
                        scale=dk**-0.5,
                        initial_state=None,
                        output_final_state=True,
                    )

            r = cx.timer.graph(fn, nb)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"gdn {phase} {method} B={b} T={t}", exc)
            continue
        finally:
            bufs = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        # q, k (16 heads), v in and the output (32 heads) in bf16; g fp32 and beta bf16
        io_bytes = b * t * (2 * (2 * hk * dk + 2 * hv * dv) + 4 * hv + 2 * hv)
        state_io = state_b * b * (2 if phase == "decode" else 1)  # prefill writes the final state
        w.row(
            "gdn",
            dict(
                model=QWEN35_GDN["name"] if not cx.dry else "tiny",
                phase=phase,
                method=method,
                kernel_is_fused=method.startswith("fla"),
                key_heads=hk,
                value_heads=hv,
                key_dim=dk,
                value_dim=dv,
                batch=b,
                tokens=t,
                state_dtype="fp32",
                state_bytes=state_b * b,
                flops=flops_tok * b * t,
                bytes=state_io + (io_bytes if method != "torch_state_rw" else 0),
                n_buffers=nb,
                **r,
            ),
        )
        log(f"  gdn {phase:7s} {method:20s} B={b:3d} T={t:5d}: {r['seconds'] * 1e6:9.1f} us")
    log(f"  gdn done ({cx.left():.0f} s left)")


def sec_profile(cx: Ctx, w: Writer) -> None:
    """Diagnostics only: torch.profiler kernel table of two whole steps (log, no CSV)."""
    if cx.dry:
        return
    from torch.profiler import ProfilerActivity, profile

    model = Llama(cx, LLAMA["layers"])
    for case in ((2048, 0, 0, 0), (0, 0, 256, 2048)):
        step = model.make_step(*case)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        log(f"  profile of step {case}:")
        log(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=22, max_name_column_width=60
            )
        )
        step = None
        torch.cuda.empty_cache()


def sec_clocks(cx: Ctx, w: Writer) -> None:
    """Diagnostics only: one GEMM replayed for 2 s; its time and the SM clock every 100 ms."""
    if cx.dry:
        return
    x = rnd((4096, 4096), cx.device)
    wt = rnd((28672, 4096), cx.device, scale=0.02)
    g = torch.cuda.CUDAGraph()
    F.linear(x, wt)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        F.linear(x, wt)
    t0 = time.perf_counter()
    last = t0
    while time.perf_counter() - t0 < 2.0:
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        now = time.perf_counter()
        if now - last > 0.1:
            last = now
            log(
                f"  t={now - t0:5.2f} s gate_up M=4096 {a.elapsed_time(b) * 1e3:8.1f} us "
                f"SM {cx.timer.sm_clock_mhz():.0f} MHz"
            )


def square_gemm_tflops(cx: Ctx) -> float | None:
    """bf16 8192^3 GEMM rate, taken before and after the run to see clock drift."""
    if cx.dry:
        return None
    a = rnd((8192, 8192), cx.device)
    b = rnd((8192, 8192), cx.device)
    r = cx.timer.graph(lambda i: a @ b, 1)
    return 2 * 8192**3 / r["seconds"] / 1e12


SECTIONS = {
    "launch": sec_launch,
    "memcpy": sec_memcpy,
    "gemm": sec_gemm,
    "attention_prefill": sec_attention_prefill,
    "attention_decode": sec_attention_decode,
    "attention_decode_qwen3": sec_attention_decode_qwen3,
    "elementwise": sec_elementwise,
    "steps": sec_steps,
    "moe": sec_moe,
    "moe_steps": sec_moe_steps,
    "moe_routing": sec_moe_routing,
    "moe_routed": sec_moe_routed,
    "gdn": sec_gdn,
    "steps_recheck": sec_steps_recheck,
    "profile": sec_profile,
    "clocks": sec_clocks,
}
DEFAULT_SECTIONS = [
    "launch",
    "memcpy",
    "gemm",
    "attention_prefill",
    "attention_decode",
    "elementwise",
    "steps",
    "moe",
]


def _version(module: str) -> str | None:
    """``module.__version__``, or None where it does not import."""
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - optional packages
        return None


def metadata(cx: Ctx) -> dict:
    md = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "datetime_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cx.device == "cuda" else None,
        "triton": _version("triton"),
        "fla": _version("fla"),
        "device": cx.device,
        "dry_run": cx.dry,
        "reps": cx.args.reps,
        "min_ms_per_timing": cx.args.min_ms,
        "sustain_ms_per_case": cx.args.sustain_ms,
        "argv": sys.argv[1:],
        "attention_method": cx.attn.method,
        "attention_check_rel_error": {
            "flash_aten": getattr(cx.attn, "flash_error", None),
            "sdpa": cx.attn.sdpa_error,
        },
        "steps_layers": "all 32 decoder layers of Llama-3.1-8B with distinct weights + final "
        "norm + LM head on one row per sequence; no embedding lookup, no sampling",
        "moe_method": "torch._grouped_mm per projection if it runs, else loop over experts",
        "moe_steps_layers": "all 48 decoder layers of Qwen3-30B-A3B (q/k RMSNorm, RoPE, KV "
        "write, FlashAttention; router, softmax, top-8 of 128 by real routing of random hidden "
        "states, sort by expert, torch._grouped_mm gate_up and down, weighted index_add back), "
        "weights cycled over --moe-weight-gib of distinct layer sets, + final norm + LM head on "
        "one row per sequence; no embedding lookup, no sampling",
        "gdn_method": "flash-linear-attention chunk_gated_delta_rule (prefill) and "
        "fused_recurrent_gated_delta_rule (decode) where fla imports; always the plain-torch "
        "proxies torch_recurrent (unfused decode recurrence) and torch_state_rw (one read + "
        "one write of the fp32 state)",
    }
    if cx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        md.update(
            gpu_name=p.name,
            sm_count=p.multi_processor_count,
            total_memory_bytes=p.total_memory,
            l2_cache_bytes=cx.l2,
            compute_capability=f"{p.major}.{p.minor}",
        )
        try:
            md["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            md["nvidia_smi"] = f"unavailable: {exc}"
    else:
        md["gpu_name"] = "cpu-dry-run"
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new cases after")
    ap.add_argument("--reps", type=int, default=7, help="timed replays per case (median)")
    ap.add_argument("--min-ms", type=float, default=1.0, help="target duration of one replay")
    ap.add_argument(
        "--sustain-ms",
        type=float,
        default=150.0,
        help="replay each case this long before timing it (clocks settle under load)",
    )
    ap.add_argument("--kv-budget-gib", type=float, default=16.0, help="KV buffers in step rows")
    ap.add_argument(
        "--moe-weight-gib",
        type=float,
        default=24.0,
        help="distinct layer weights of the Qwen3-30B-A3B step rows (layers cycle over them)",
    )
    ap.add_argument(
        "--moe-residual-scale",
        action="store_true",
        help="MoE steps: o and expert-down weights at 0.02/sqrt(2 x layers) (prefill routing "
        "stays spread over the experts; not what the committed rows ran)",
    )
    ap.add_argument(
        "--gdn-budget-s",
        type=float,
        default=120.0,
        help="time cap of section gdn (0: only the kernel check)",
    )
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help="comma-separated")
    ap.add_argument(
        "--elementwise-ops",
        default="rms_norm,silu_mul,residual_add,rope,kv_write",
        help="ops of the elementwise section",
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, meaningless times")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    cx = Ctx(args, device)
    w = Writer(args.out)
    t0 = time.monotonic()
    log(f"attention: {cx.attn.method} (check errors flash={getattr(cx.attn, 'flash_error', None)})")
    md = metadata(cx)
    try:
        md["square_gemm_tflops_before"] = square_gemm_tflops(cx)
    except Exception as exc:  # noqa: BLE001
        cx.error("square gemm", exc)
    order = [s for s in args.sections.split(",") if s]
    for name in order:
        if name not in SECTIONS:
            print(f"unknown section {name!r}", file=sys.stderr)
            return 2
        ts = time.monotonic()
        log(f"[{name}] ({cx.left():.0f} s left)")
        try:
            SECTIONS[name](cx, w)
        except Exception as exc:  # noqa: BLE001
            cx.error(f"section {name}", exc)
            traceback.print_exc()
        cx.sections[name] = {"seconds": round(time.monotonic() - ts, 2)}
        if cx.left() < 0:
            cx.errors.append(f"budget exhausted during or after section {name}")
    try:
        md["square_gemm_tflops_after"] = square_gemm_tflops(cx)
    except Exception as exc:  # noqa: BLE001
        cx.error("square gemm", exc)
    md["sections"] = cx.sections
    md["errors"] = cx.errors
    md["wall_seconds"] = round(time.monotonic() - t0, 1)
    w.close()
    (args.out / "metadata.json").write_text(json.dumps(md, indent=2) + "\n")
    log(json.dumps({k: md[k] for k in md if k not in ("sections",)}, indent=None)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
