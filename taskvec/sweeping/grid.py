"""Grid expansion: a dict of lists -> the distinct merge points it describes, and the points it skips.

The product of every list is taken, then each point is shaped by its method: a
parameter the method doesn't take (density for task_arithmetic) is dropped, so
the points that differed only in it collapse into one, and the rest are
reported as skipped. What the method takes comes from the method registry, so
a new method sweeps without changes here.
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from taskvec.errors import ParameterError

#: Grid keys that are not method parameters.
SPECIAL_KEYS = ("method", "models")
#: Keys of a point that `taskvec.merge` takes itself rather than the method.
MERGE_KEYS = ("dtype",)


@dataclass(frozen=True)
class Point:
    """One merge to evaluate: method, which models (indices into the sweep's list) and parameters.

    `params` keys are as the grid wrote them (e.g. ``lambda``); `canonical` is the registry's name of each,
    which is what makes two points the same merge.
    """

    method: str
    models: tuple[int, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    canonical: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def identity(self) -> tuple:
        return (self.method, self.models, tuple(sorted((self.canonical.get(k, k), _hashable(v))
                                                       for k, v in self.params.items())))


def _values(v: Any) -> list:
    """A grid entry's values: any iterable (list, tuple, range, numpy array); a single value is one value."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        return [v]
    return list(v)


def _plain(v: Any) -> Any:
    """numpy scalars as Python numbers (the registry's range checks, JSON cache keys), lists element-wise."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", None) == 0 else v


def _hashable(v: Any) -> Any:
    return tuple(map(_hashable, v)) if isinstance(v, (list, tuple)) else v


def method_params(method: str) -> dict[str, str]:
    """Every name `method` accepts (aliases included) -> its canonical name."""
    from taskvec.methods import get_method

    return {n: p.name for p in get_method(method).params for n in (p.name, *p.aliases)}


def model_subsets(spec: Sequence | None, labels: Sequence[str]) -> list[tuple[int, ...]]:
    """The grid's `models` axis (subsets given by index or label) as index tuples; None: all models."""
    if spec is None:
        return [tuple(range(len(labels)))]
    out = []
    for i, subset in enumerate(spec):
        if isinstance(subset, (str, int)):
            subset = [subset]
        idx = []
        for m in subset:
            if isinstance(m, int) and not isinstance(m, bool) and 0 <= m < len(labels):
                idx.append(m)
            elif isinstance(m, str) and m in labels:
                idx.append(labels.index(m))
            else:
                raise ParameterError(f"grid: models[{i}]: {m!r} is neither an index below {len(labels)} nor one "
                                     f"of the models {list(labels)}")
        if not idx:
            raise ParameterError(f"grid: models[{i}] is empty")
        if len(set(idx)) != len(idx):
            raise ParameterError(f"grid: models[{i}] names a model twice: {list(subset)}")
        out.append(tuple(idx))
    return out


def expand_grid(grid: Mapping[str, Sequence], *, labels: Sequence[str], method: str | None = None,
                fixed: Mapping[str, Any] | None = None, has_base: bool = True) -> tuple[list[Point], list[dict[str, Any]]]:
    """(points, skipped): the distinct points of the product of `grid`'s lists, in grid order.

    `method` is the method of points whose grid has no `method` axis; `fixed` holds parameters every
    point shares (a list as long as `labels` is per-model and follows the `models` axis). A key that no
    swept method takes is an error naming it; a value a method refuses is an error naming the point.
    """
    from taskvec.methods import get_method

    if not isinstance(grid, Mapping):
        raise ParameterError(f"grid: expected a dict of lists, got {type(grid).__name__}")
    grid = {str(k): [_plain(x) for x in _values(v)] for k, v in grid.items()}
    for k, v in grid.items():
        if not v:
            raise ParameterError(f"grid: {k!r} has no values")
    methods = grid.get("method") or ([method] if method is not None else None)
    if not methods:
        raise ParameterError("method: give method= or a `method` axis in the grid")
    for m in methods:
        get_method(m)  # unknown name: an error listing the known ones
    accepted = {m: method_params(m) for m in methods}
    fixed = dict(fixed or {})
    for key in [*grid, *fixed]:
        if key in SPECIAL_KEYS or key in MERGE_KEYS:
            continue
        if not any(key in names for names in accepted.values()):
            known = sorted({n for names in accepted.values() for n in names} | set(SPECIAL_KEYS))
            hint = difflib.get_close_matches(key, known, n=1)
            where = "grid" if key in grid else "parameters"
            raise ParameterError(f"{where}: no swept method ({', '.join(methods)}) takes {key!r}"
                                 f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; keys: {', '.join(known)}")
    subsets = model_subsets(grid.get("models"), labels)
    axes = [k for k in grid if k not in SPECIAL_KEYS]
    points: dict[tuple, Point] = {}
    skipped: list[dict[str, Any]] = []
    for m, subset, values in itertools.product(methods, subsets, itertools.product(*(grid[k] for k in axes))):
        names = accepted[m]
        raw = dict(zip(axes, values))
        dropped = [k for k in raw if k not in names and k not in MERGE_KEYS]
        params = {k: _per_model(v, subset, len(labels)) for k, v in {**fixed, **raw}.items()
                  if k in names or k in MERGE_KEYS}
        point = Point(m, subset, params, {k: names.get(k, k) for k in params})
        if point.identity in points:  # the first grid row of a merge is evaluated; the rows equal to it skipped
            reason = f"{m} takes no {', '.join(dropped)}" if dropped else "duplicate point"
            skipped.append({"method": m, "models": _label(subset, labels), **raw, "reason": reason})
            continue
        _check_point(point, has_base)
        points[point.identity] = point
    return list(points.values()), skipped


def _per_model(value: Any, subset: tuple[int, ...], n: int) -> Any:
    """A per-model list (one entry per model of the sweep) restricted to the point's models."""
    if isinstance(value, (list, tuple)) and len(value) == n and len(subset) != n:
        return [value[i] for i in subset]
    return value


def _label(subset: tuple[int, ...], labels: Sequence[str]) -> str:
    return "+".join(labels[i] for i in subset)


def _check_point(point: Point, has_base: bool) -> None:
    """Every value in range for its method, before anything runs (errors name the point)."""
    from taskvec.methods import get_method

    params = {k: v for k, v in point.params.items() if k not in MERGE_KEYS}
    try:
        get_method(point.method).check_params(len(point.models), has_base=has_base, **params)
    except ParameterError as e:
        shown = ", ".join(f"{k}={v}" for k, v in point.params.items())
        raise ParameterError(f"grid point ({point.method}; {shown}): {e}") from None
