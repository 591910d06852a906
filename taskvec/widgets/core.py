"""Slider front-ends that degrade to static output.

A view is a plain function ``fn(**params) -> Figure | DataFrame | str``; `interact`
puts sliders in front of it when a Jupyter front-end can show them and otherwise
(CI, `nbclient`, a terminal, ``TASKVEC_STATIC=1``) renders it once at the default
values. Tests call the view functions directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from taskvec.errors import ParameterError


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def fast_mode() -> bool:
    """True when ``TASKVEC_FAST`` is set (CI and `taskvec demo --fast`): small zoo, evaluation subsets."""
    return _truthy(os.environ.get("TASKVEC_FAST"))


def is_static() -> bool:
    """True when sliders can't be shown: ``TASKVEC_STATIC`` set, ipywidgets missing, or no IPython kernel."""
    if _truthy(os.environ.get("TASKVEC_STATIC")):
        return True
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return True
    shell = get_ipython()
    return shell is None or getattr(shell, "kernel", None) is None


def figures_dir(default: str | os.PathLike = "figures") -> Path:
    """Where notebooks and the demo save figures: ``$TASKVEC_FIGURES``, else `default` in full mode and
    `default`/fast in fast mode (``TASKVEC_FAST=1``), so a fast run never overwrites the published full-mode
    figures (``figures/fast/`` is not tracked)."""
    if os.environ.get("TASKVEC_FIGURES"):
        return Path(os.environ["TASKVEC_FIGURES"])
    return Path(default) / "fast" if fast_mode() else Path(default)


def fast_mode() -> bool:
    """True when ``TASKVEC_FAST`` asks for the fast zoo and evaluation subsets (CI, quick looks)."""
    return os.environ.get("TASKVEC_FAST", "0") not in ("", "0")


@dataclass(frozen=True)
class Control:
    """One slider or dropdown: a float range (low, high, step) or a list of options, and its default."""

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    options: Sequence[Any] = ()
    label: str | None = None

    def __post_init__(self):
        if self.options:
            if self.default not in self.options:
                raise ParameterError(f"control {self.name!r}: default {self.default!r} not in {list(self.options)}")
        elif self.low is None or self.high is None or not (self.low <= self.default <= self.high):
            raise ParameterError(f"control {self.name!r}: default {self.default!r} outside [{self.low}, {self.high}]")

    def widget(self):
        import ipywidgets as w

        desc = self.label or self.name
        style = {"description_width": "initial"}
        if self.options:
            return w.Dropdown(options=list(self.options), value=self.default, description=desc, style=style)
        step = self.step or (self.high - self.low) / 100
        if all(float(v).is_integer() for v in (self.low, self.high, step, self.default)) and isinstance(self.default, int):
            return w.IntSlider(value=self.default, min=int(self.low), max=int(self.high), step=int(step),
                               description=desc, continuous_update=False, style=style)
        return w.FloatSlider(value=float(self.default), min=float(self.low), max=float(self.high), step=float(step),
                             description=desc, continuous_update=False, readout_format=".2f", style=style)


@dataclass
class View:
    """A view function with its controls; `update(**params)` re-renders (what a slider move does)."""

    fn: Callable[..., Any]
    controls: list[Control]
    static: bool
    widgets: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    last: Any = None

    @property
    def params(self) -> dict[str, Any]:
        if self.widgets:
            return {n: wid.value for n, wid in self.widgets.items()}
        return {c.name: c.default for c in self.controls}

    def update(self, **params) -> Any:
        unknown = sorted(set(params) - {c.name for c in self.controls})
        if unknown:
            raise ParameterError(f"unknown control(s) {unknown}; this view has {[c.name for c in self.controls]}")
        for name, value in params.items():
            if name in self.widgets:
                self.widgets[name].value = value  # the observer re-renders
        if not self.widgets:
            self.last = self.fn(**{**self.params, **params})
        return self.last

    def _render(self, *_):
        from IPython.display import display

        try:
            result = self.fn(**self.params)
        except Exception:
            if self.output is not None:
                # in a front-end a raising callback otherwise shows nothing at all: ipywidgets sends the error as
                # a kernel message no output area displays, and the figure just stops updating
                import traceback

                self.output.clear_output(wait=True)
                with self.output:
                    traceback.print_exc()
            raise
        self.last = result
        if self.output is not None:
            self.output.clear_output(wait=True)
            with self.output:
                display(result)
        return result

    def _ipython_display_(self):
        from IPython.display import display

        if self.static:
            display(self.last if self.last is not None else self.fn(**self.params))
            return
        import ipywidgets as w

        box = w.VBox([w.HBox(list(self.widgets.values())), self.output])
        # Live widgets for a front-end, plus a static rendering of the current result for everything that
        # can't run them (nbconvert, GitHub, a notebook executed headless in CI): each picks what it shows.
        bundle = dict(box._repr_mimebundle_() or {})
        bundle.update(static_bundle(self.last))
        display(bundle, raw=True)


def static_bundle(result: Any) -> dict[str, str]:
    """Mime data for a view's result without a kernel: PNG for a figure, HTML for a table, else its text."""
    import base64
    import io

    from matplotlib.figure import Figure

    if isinstance(result, Figure):
        buf = io.BytesIO()
        result.savefig(buf, format="png")
        return {"image/png": base64.b64encode(buf.getvalue()).decode("ascii")}
    if hasattr(result, "to_html"):
        return {"text/html": result.to_html()}
    return {"text/plain": repr(result)}


def interact(fn: Callable[..., Any], *controls: Control, static: bool | None = None) -> View:
    """Sliders/dropdowns for `fn`'s keyword parameters; static (rendered once at the defaults) without a
    front-end. Display the returned View (leave it as a cell's last expression)."""
    static = is_static() if static is None else static
    view = View(fn, list(controls), static)
    if static:
        view.last = fn(**view.params)
        return view
    import ipywidgets as w

    view.output = w.Output()
    for c in controls:
        wid = c.widget()
        wid.observe(view._render, names="value")
        view.widgets[c.name] = wid
    view._render()
    return view
