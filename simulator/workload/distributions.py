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

Every distribution accepts optional ``min`` / ``max``: draws are clipped into ``[min, max]``
(clipping, not truncation: the mass beyond a bound piles up on it).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

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
        raise NotImplementedError


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


def _number_as_fixed(value: Any) -> Any:
    """YAML shorthand: a bare number means ``{dist: fixed, value: number}``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"dist": "fixed", "value": value}
    return value


_Shared = Normal | LogNormal | Exponential | InverseGaussian | Gamma

#: A distribution of counts (tokens, turns); sample it with :func:`sample_counts`.
Dist = Annotated[
    Fixed | Uniform | _Shared,
    Field(discriminator="dist"),
    BeforeValidator(_number_as_fixed),
]

#: A distribution of durations in seconds (0 allowed); sample it with :func:`sample_times`.
TimeDist = Annotated[
    FixedTime | UniformTime | _Shared,
    Field(discriminator="dist"),
    BeforeValidator(_number_as_fixed),
]


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


def sample_counts(dist: _DistBase, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw ``n`` counts: rounded to the nearest integer, clipped to ``[1, MAX_COUNT]``, int64."""
    out = np.rint(sample(dist, rng, n))
    np.clip(out, 1, MAX_COUNT, out=out)
    return out.astype(np.int64)


def sample_times(dist: _DistBase, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw ``n`` durations in seconds, clipped to ``>= 0`` (float64)."""
    out = sample(dist, rng, n)
    np.maximum(out, 0.0, out=out)
    return out
