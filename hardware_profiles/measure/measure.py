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

Output: one CSV per kind (``gemm.csv``, ``attention_prefill.csv``, ``attention_decode.csv``,
``moe.csv``, ``elementwise.csv``, ``memcpy.csv``, ``launch.csv``, ``steps.csv``) with units in the
column names, and ``metadata.json`` (GPU, software versions, date, methods, checks, errors).
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
    """Appends rows to one CSV per kind, header from the first row, flushed per row."""

    def __init__(self, out: Path):
        self.out = out
        self.files: dict[str, tuple] = {}

    def row(self, kind: str, row: dict) -> None:
        if kind not in self.files:
            f = open(self.out / f"{kind}.csv", "w", newline="")
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            self.files[kind] = (f, w)
        f, w = self.files[kind]
        w.writerow(row)
        f.flush()

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()


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


def sec_attention_decode(cx: Ctx, w: Writer) -> None:
    """One query token per sequence over ``context`` cached tokens (+ itself), batch x context."""
    dev = cx.device
    hq, hk, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"]
    if cx.dry:
        hq, hk = 8, 2
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
                "attention_decode",
                dict(
                    model=LLAMA["name"] if not cx.dry else "tiny",
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
    log(f"  attention_decode done ({cx.left():.0f} s left)")


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
        cx, dev, c = self.cx, self.cx.device, self.c
        h, d, hq, hk = c["hidden"], c["head_dim"], c["heads"], c["kv_heads"]
        t = pre_new + dec_batch
        per_layer_kv = 2 * 2 * hk * d * ((pre_ctx + pre_new) + dec_batch * (dec_ctx + 1))
        n_kv = max(2, min(len(self.layers), int(cx.args.kv_budget_gib * GiB // per_layer_kv)))
        kv = []
        for _ in range(n_kv):
            kvp = (
                (rnd((1, pre_ctx + pre_new, hk, d), dev), rnd((1, pre_ctx + pre_new, hk, d), dev))
                if pre_new
                else None
            )
            kvd = (
                (
                    rnd((dec_batch, dec_ctx + 1, hk, d), dev),
                    rnd((dec_batch, dec_ctx + 1, hk, d), dev),
                )
                if dec_batch
                else None
            )
            kv.append((kvp, kvd))
        x0 = rnd((t, h), dev)
        pos = torch.cat(
            [
                torch.arange(pre_ctx, pre_ctx + pre_new, device=dev),
                torch.full((dec_batch,), dec_ctx, device=dev),
            ]
        ).float()
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
        ang = pos[:, None] * inv[None, :]
        cos = ang.cos().to(torch.bfloat16)[:, None, :]
        sin = ang.sin().to(torch.bfloat16)[:, None, :]
        last = []
        if pre_new:
            last.append(pre_new - 1)
        last += list(range(pre_new, t))
        last_idx = torch.tensor(last, device=dev, dtype=torch.long)
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
                outs = []
                if pre_new:
                    kvp[0][0, pre_ctx:].copy_(k[:pre_new])
                    kvp[1][0, pre_ctx:].copy_(v[:pre_new])
                    outs.append(attn(q[None, :pre_new], kvp[0], kvp[1], True)[0])
                if dec_batch:
                    kvd[0][:, dec_ctx].copy_(k[pre_new:])
                    kvd[1][:, dec_ctx].copy_(v[pre_new:])
                    outs.append(attn(q[pre_new:, None], kvd[0], kvd[1], True)[:, 0])
                a = outs[0] if len(outs) == 1 else torch.cat(outs)
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
    "elementwise": sec_elementwise,
    "steps": sec_steps,
    "moe": sec_moe,
    "profile": sec_profile,
    "clocks": sec_clocks,
}
DEFAULT_SECTIONS = [s for s in SECTIONS if s not in ("profile", "clocks")]


def metadata(cx: Ctx) -> dict:
    md = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "datetime_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cx.device == "cuda" else None,
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
