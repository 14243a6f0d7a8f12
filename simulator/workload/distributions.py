"""Probability distributions for synthetic workloads: pydantic models plus vectorised sampling.

A distribution is written in YAML as a mapping with a ``dist`` key, for example::

    output_tokens: {dist: lognormal, mean: 250, sigma: 0.8, max: 4096}
    wait_after_ready: {dist: exponential, mean: 2.0}

or, as a shorthand for ``{dist: fixed, value: X}``, as a bare number (``output_tokens: 128``).

Two families exist:

- :data:`Dist` for counts (tokens, turns). ``fixed`` needs ``value >= 1`` and ``uniform`` draws
  *integers* from ``low`` to ``high`` inclusive (``low >= 1``). Sample with
  :func:`sample_counts`, which rounds to the nearest integer and clips to ``>= 1``.
- :data:`TimeDist` for durations in seconds. ``fixed`` allows ``value >= 0`` and ``uniform`` is
  continuous on ``[low, high]`` (``low >= 0``). Sample with :func:`sample_times`, which clips to
  ``>= 0``.

The other shapes are shared by both families:

- ``normal{mean, std}``: the normal distribution (negative draws are clipped by the sampler).
- ``lognormal{mean, sigma}``: ``mean`` is the mean *of the distribution itself* (what users know,
  e.g. "~1000 tokens"), ``sigma`` the standard deviation of the underlying normal, so
  ``log X ~ Normal(log(mean) - sigma**2 / 2, sigma)``. The median is ``mean * exp(-sigma**2/2)``.
- ``exponential{mean}``.
- ``inverse_gaussian{mean, shape}``: the Wald distribution with mean ``mean`` and shape
  ``lambda = shape`` (variance ``mean**3 / shape``), as fitted to agent traces in WORKLOADS.md.
- ``gamma{mean, cv}``: mean and coefficient of variation (std / mean); shape ``1 / cv**2``.
- ``weibull{shape, scale}``: ``scale * W`` with ``W`` standard Weibull of shape ``k = shape``.
- ``pareto{alpha, scale}``: the classic Pareto, ``P(X > x) = (scale / x) ** alpha`` for
  ``x >= scale``.
- ``poisson{mean}``: Poisson counts (for counts that may be 0, such as spawns per agent).
- ``zipf{low, high, theta, scramble}``: integers ``low..high`` with
  ``P(k) ~ (k - low + 1) ** -theta`` (Veeksha's bounded Zipf; ``theta`` default 0.6).
  ``scramble: true`` maps ranks to values through a fixed permutation of the support, so the
  popular values are not the smallest ones. The support holds at most 10**7 values.
- ``empirical{values, weights}``: resample the given values (weights optional, normalised).
  ``empirical{trace, field, format}`` reads the values from a trace file instead: ``field`` is
  one of ``fresh_input``, ``first_input``, ``output``, ``wait_after_ready``,
  ``requests_per_session``; a relative ``trace`` path is resolved against the workload file's
  directory, then the current directory.
- ``mixture{weights, components}``: each draw picks a component with probability proportional
  to its weight (components are distributions of the same family).
- ``spike_pareto{spike, spike_sigma, tail_probability, tail_min, tail_alpha}`` (for waits): with
  probability ``1 - tail_probability`` a lognormal spike of median ``spike`` and log-std
  ``spike_sigma`` (0 = exactly ``spike``), otherwise a Pareto tail from ``tail_min`` with index
  ``tail_alpha`` (agent tool waits: median ~32 ms, ~6% over 10 s, WORKLOADS.md).

Every distribution accepts optional ``min`` / ``max``: draws are clipped into ``[min, max]``
(clipping, not truncation: the mass beyond a bound piles up on it).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

__all__ = [
    "Dist",
    "TimeDist",
    "Fixed",
    "Uniform",
    "FixedTime",
    "UniformTime",
    "Normal",
    "LogNormal",
    "Exponential",
    "InverseGaussian",
    "Gamma",
    "Weibull",
    "Pareto",
    "Poisson",
    "Zipf",
    "Empirical",
    "Mixture",
    "TimeMixture",
    "SpikePareto",
    "Count0Dist",
    "Fixed0",
    "Uniform0",
    "sample",
    "sample_counts",
    "sample_times",
    "MAX_COUNT",
]

#: Upper clip for sampled counts: keeps heavy tails from overflowing int64 arithmetic downstream.
MAX_COUNT = 10**12

_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _DistBase(BaseModel):
    """Common fields: optional clipping bounds applied after drawing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: _Finite | None = None
    max: _Finite | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> _DistBase:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} is a base class: use a concrete distribution")


class Fixed(_DistBase):
    """Always ``value`` (a count: ``value >= 1``). Draws no random numbers."""

    dist: Literal["fixed"] = "fixed"
    value: Annotated[float, Field(ge=1, allow_inf_nan=False)]

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.float64)


class FixedTime(_DistBase):
    """Always ``value`` seconds (``value >= 0``). Draws no random numbers."""

    dist: Literal["fixed"] = "fixed"
    value: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.float64)


class Uniform(_DistBase):
    """Integers ``low..high`` inclusive, each equally likely (``1 <= low <= high``)."""

    dist: Literal["uniform"] = "uniform"
    low: Annotated[int, Field(ge=1)]
    high: int

    @model_validator(mode="after")
    def _check_range(self) -> Uniform:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True).astype(np.float64)


class UniformTime(_DistBase):
    """Seconds uniform on ``[low, high]`` (``0 <= low <= high``)."""

    dist: Literal["uniform"] = "uniform"
    low: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    high: _Finite

    @model_validator(mode="after")
    def _check_range(self) -> UniformTime:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, size=n)


class Normal(_DistBase):
    """Normal with mean ``mean`` and standard deviation ``std > 0``."""

    dist: Literal["normal"] = "normal"
    mean: _Finite
    std: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.normal(self.mean, self.std, size=n)


class LogNormal(_DistBase):
    """Lognormal with distribution mean ``mean > 0``; ``sigma > 0`` is the underlying normal's std."""

    dist: Literal["lognormal"] = "lognormal"
    mean: _Positive
    sigma: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - 0.5 * self.sigma**2
        return rng.lognormal(mu, self.sigma, size=n)


class Exponential(_DistBase):
    """Exponential with mean ``mean > 0``."""

    dist: Literal["exponential"] = "exponential"
    mean: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(self.mean, size=n)


class InverseGaussian(_DistBase):
    """Inverse Gaussian (Wald) with mean ``mean > 0`` and shape ``lambda = shape > 0``."""

    dist: Literal["inverse_gaussian"] = "inverse_gaussian"
    mean: _Positive
    shape: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.wald(self.mean, self.shape, size=n)


class Gamma(_DistBase):
    """Gamma with mean ``mean > 0`` and coefficient of variation ``cv > 0`` (std / mean)."""

    dist: Literal["gamma"] = "gamma"
    mean: _Positive
    cv: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = 1.0 / self.cv**2
        return rng.gamma(k, self.mean / k, size=n)


class Weibull(_DistBase):
    """Weibull with shape ``k = shape > 0`` and scale ``scale > 0``."""

    dist: Literal["weibull"] = "weibull"
    shape: _Positive
    scale: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.scale * rng.weibull(self.shape, size=n)


class Pareto(_DistBase):
    """Classic Pareto: ``P(X > x) = (scale / x) ** alpha`` for ``x >= scale``."""

    dist: Literal["pareto"] = "pareto"
    alpha: _Positive
    scale: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.scale * (1.0 + rng.pareto(self.alpha, size=n))


class Poisson(_DistBase):
    """Poisson counts of mean ``mean >= 0`` (may be 0 where a family allows it)."""

    dist: Literal["poisson"] = "poisson"
    mean: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.poisson(self.mean, size=n).astype(np.float64)


_ZIPF_MAX_SUPPORT = 10**7
_ZIPF_SCRAMBLE_SEED = 0x5EED


class Zipf(_DistBase):
    """Bounded Zipf on integers ``low..high``: ``P(k) ~ (k - low + 1) ** -theta``."""

    dist: Literal["zipf"] = "zipf"
    low: Annotated[int, Field(ge=0)] = 1
    high: int
    theta: _Positive = 0.6
    scramble: bool = False

    @model_validator(mode="after")
    def _check_range(self) -> Zipf:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.high - self.low + 1 > _ZIPF_MAX_SUPPORT:
            raise ValueError(f"the support low..high holds more than {_ZIPF_MAX_SUPPORT} values")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        size = self.high - self.low + 1
        cdf = np.cumsum(np.arange(1, size + 1, dtype=np.float64) ** -self.theta)
        cdf /= cdf[-1]
        rank = np.searchsorted(cdf, rng.random(n), side="right")
        np.minimum(rank, size - 1, out=rank)
        if self.scramble:
            rank = np.random.default_rng(_ZIPF_SCRAMBLE_SEED).permutation(size)[rank]
        return (self.low + rank).astype(np.float64)


EMPIRICAL_FIELDS = (
    "fresh_input",
    "first_input",
    "output",
    "wait_after_ready",
    "requests_per_session",
)


class Empirical(_DistBase):
    """Resample ``values`` (with optional ``weights``), or values read from a trace file."""

    dist: Literal["empirical"] = "empirical"
    values: Annotated[list[_Finite], Field(min_length=1)]
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    trace: str | None = None  # where the values came from (recorded, not re-read)
    field: Literal[EMPIRICAL_FIELDS] | None = None  # type: ignore[valid-type]
    format: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _load_trace(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or data.get("trace") is None or "values" in data:
            return data
        field = data.get("field")
        if field not in EMPIRICAL_FIELDS:
            raise ValueError(f"field must be one of {', '.join(EMPIRICAL_FIELDS)} (got {field!r})")
        from simulator.workload.trace import empirical_values  # lazy: readers import this module

        base = (info.context or {}).get("base_dir")
        values = empirical_values(str(data["trace"]), field, data.get("format"), base)
        return {**data, "values": values.tolist()}

    @model_validator(mode="after")
    def _check_weights(self) -> Empirical:
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}"
                )
            if sum(self.weights) <= 0:
                raise ValueError("weights must not all be 0")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        values = np.asarray(self.values, dtype=np.float64)
        if self.weights is None:
            return values[rng.integers(0, values.shape[0], size=n)]
        w = np.asarray(self.weights, dtype=np.float64)
        cdf = np.cumsum(w / w.sum())
        idx = np.searchsorted(cdf, rng.random(n), side="right")
        return values[np.minimum(idx, values.shape[0] - 1)]


class SpikePareto(_DistBase):
    """A lognormal spike (median ``spike``) plus a Pareto tail taken with ``tail_probability``."""

    dist: Literal["spike_pareto"] = "spike_pareto"
    spike: _Positive
    spike_sigma: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    tail_probability: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    tail_min: _Positive
    tail_alpha: _Positive

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        tail = rng.random(n) < self.tail_probability
        out = self.spike * np.exp(self.spike_sigma * rng.standard_normal(n))
        k = int(tail.sum())
        out[tail] = self.tail_min * (1.0 + rng.pareto(self.tail_alpha, size=k))
        return out


class _MixtureBase(_DistBase):
    weights: Annotated[
        list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)
    ]

    @model_validator(mode="after")
    def _check_components(self) -> _MixtureBase:
        num = len(self.components)  # type: ignore[attr-defined]
        if len(self.weights) != num:
            raise ValueError(f"weights has {len(self.weights)} entries but components has {num}")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        w = np.asarray(self.weights, dtype=np.float64)
        cdf = np.cumsum(w / w.sum())
        pick = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), w.shape[0] - 1)
        out = np.empty(n, dtype=np.float64)
        for i, comp in enumerate(self.components):  # type: ignore[attr-defined]
            mask = pick == i
            out[mask] = sample(comp, rng, int(mask.sum()))
        return out


class Mixture(_MixtureBase):
    """Counts: component ``i`` with probability ``weights[i] / sum(weights)``."""

    dist: Literal["mixture"] = "mixture"
    components: Annotated[list[Dist], Field(min_length=1)]


class TimeMixture(_MixtureBase):
    """Durations: component ``i`` with probability ``weights[i] / sum(weights)``."""

    dist: Literal["mixture"] = "mixture"
    components: Annotated[list[TimeDist], Field(min_length=1)]


class Fixed0(_DistBase):
    """Always ``value`` (a count that may be 0)."""

    dist: Literal["fixed"] = "fixed"
    value: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.float64)


class Uniform0(Uniform):
    """Integers ``low..high`` inclusive with ``0 <= low``."""

    low: Annotated[int, Field(ge=0)]


def _number_as_fixed(value: Any) -> Any:
    """YAML shorthand: a bare number means ``{dist: fixed, value: number}``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"dist": "fixed", "value": value}
    return value


_Shared = (
    Normal
    | LogNormal
    | Exponential
    | InverseGaussian
    | Gamma
    | Weibull
    | Pareto
    | Poisson
    | Zipf
    | Empirical
    | SpikePareto
)

#: A distribution of counts (tokens, turns); sample it with :func:`sample_counts`.
Dist = Annotated[
    Fixed | Uniform | Mixture | _Shared,
    Field(discriminator="dist"),
    BeforeValidator(_number_as_fixed),
]

#: A distribution of durations in seconds (0 allowed); sample it with :func:`sample_times`.
TimeDist = Annotated[
    FixedTime | UniformTime | TimeMixture | _Shared,
    Field(discriminator="dist"),
    BeforeValidator(_number_as_fixed),
]

#: A distribution of counts that may be 0 (spawns per agent); sample with ``sample_counts(.., 0)``.
Count0Dist = Annotated[
    Fixed0 | Uniform0 | Mixture | _Shared,
    Field(discriminator="dist"),
    BeforeValidator(_number_as_fixed),
]

Mixture.model_rebuild()
TimeMixture.model_rebuild()


def sample(dist: _DistBase, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw ``n`` values (float64), clipped into ``[dist.min, dist.max]`` when given.

    Vectorised: one numpy call per distribution. ``fixed`` consumes no random numbers; the others
    consume exactly one batch of ``n`` draws from ``rng``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = np.asarray(dist._draw(rng, n), dtype=np.float64)
    if dist.min is not None or dist.max is not None:
        np.clip(out, dist.min, dist.max, out=out)
    return out


def sample_counts(dist: _DistBase, rng: np.random.Generator, n: int, low: int = 1) -> np.ndarray:
    """Draw ``n`` counts: rounded to the nearest integer, clipped to ``[low, MAX_COUNT]``, int64."""
    out = np.rint(sample(dist, rng, n))
    np.clip(out, low, MAX_COUNT, out=out)
    return out.astype(np.int64)


def sample_times(dist: _DistBase, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw ``n`` durations in seconds, clipped to ``>= 0`` (float64)."""
    out = sample(dist, rng, n)
    np.maximum(out, 0.0, out=out)
    return out
