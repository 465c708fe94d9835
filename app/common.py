"""What the app's pages share: the run picker, deep-link state, cached loaders and error display.

State that a teammate should be able to open by link lives in the URL's query parameters: ``run``
(the run directory), ``p``, ``tau`` and ``layer`` (and the page, as the URL path). Each value is
kept in ``st.session_state`` too, because Streamlit clears the query parameters when the user
switches pages; every page writes the values it uses back to the URL.

Runs are only read: nothing here or in the pages writes to a run directory. Loaded regions are
cached with ``st.cache_resource`` (shared, read-only objects; a 135M model's regions are too large
to copy per call), keyed by the run's path and the time its ``regions/`` was written, so a run
that is redone is read again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from cpift.errors import CpiftError, ParameterError
from cpift.explore import probe_models, regions_from_probes, run_fusion_report, run_regions
from cpift.regions import CoreRegions
from cpift.runs import MANIFEST, REGIONS, RunDir

REPO = Path(__file__).resolve().parent.parent
#: Folders whose sub-directories are listed as runs (relative to the repository root).
RUN_ROOTS = ("sample_runs", "runs")
#: Environment variable naming the run opened when the URL names none (``make app``, the browser test).
RUN_ENV = "CPIFT_APP_RUN"
#: Label of the source made of checkpoints given on the Core regions page.
CUSTOM = "checkpoints from the Core regions page"
#: Largest p the slider offers (cores of a few % are what the method is about).
P_SLIDER_MAX = 20.0


def show_error(exc: BaseException) -> None:
    """Show an error on the page as a message, never a traceback."""
    if isinstance(exc, CpiftError):
        st.error(str(exc))
    else:  # an unexpected failure (a file vanished mid-read, …): still a message, naming its kind
        st.error(f"{type(exc).__name__}: {exc}")


@dataclass
class Caught:
    """What an :func:`errors_shown` block caught: ``error`` stays None when the block ran through."""

    error: Exception | None = None


@contextmanager
def errors_shown(keep_as: str | None = None) -> Iterator[Caught]:
    """Run a page's body, or a part of it, turning any error (a damaged run, a bad value) into
    :func:`show_error`; the code after the block goes on. The app's one way of showing errors.

    Yields a :class:`Caught`, for code that also reacts to a failure (shows a fallback, keeps a
    button off). ``keep_as`` is for widget callbacks, which run before the page is drawn (a
    message would land at its top): the error is kept under that session key instead, for
    :func:`show_kept_error` to show where the widget is. As a decorator (``@errors_shown()``) it
    wraps every call. Streamlit's own control flow (``st.stop``, ``st.rerun``) derives from
    ``BaseException`` and passes through.
    """
    caught = Caught()
    try:
        yield caught
    except Exception as exc:  # noqa: BLE001 - every failure is a message on the page, not a crash
        caught.error = exc
        if keep_as is None:
            show_error(exc)
        else:
            st.session_state[keep_as] = exc


def show_kept_error(key: str) -> None:
    """Show, once, the error an ``errors_shown(keep_as=key)`` block kept (if any)."""
    error = st.session_state.pop(key, None)
    if error is not None:
        show_error(error)


# -- deep-link state -----------------------------------------------------------------------------


def remember(name: str, value: object) -> None:
    """Keep ``value`` for the session and write it to the URL's query parameter ``name``."""
    st.session_state[f"_{name}"] = value
    st.query_params[name] = str(value)


def recalled(name: str, default: object, cast: Callable[[str], object] = str) -> object:
    """The session's value of ``name``, else the URL's (cast), else ``default``."""
    key = f"_{name}"
    if key not in st.session_state:
        raw = st.query_params.get(name)
        try:
            st.session_state[key] = cast(raw) if raw is not None else default
        except ValueError:
            st.session_state[key] = default
    return st.session_state[key]


def _seed(key: str, value: object) -> None:
    """Set a widget's value just before it is created, on every run.

    A widget made by a page has a different identity on every page, so after a page switch it
    would start from its default; setting its key first makes it start from ``value`` instead
    (the user's latest choice, or the deep link's).
    """
    st.session_state[key] = value


def linked_slider(label: str, name: str, low: float, high: float, default: float, step: float,
                  fmt: str = "%.3f", where=st, **kwargs) -> float:
    """A float slider whose value lives in the URL (``name``) and survives page switches."""
    key = f"w_{name}"
    value = st.session_state.get(key, recalled(name, default, float))
    _seed(key, min(max(float(value), low), high))
    chosen = where.slider(label, min_value=low, max_value=high, step=step, format=fmt, key=key, **kwargs)
    remember(name, chosen)
    return chosen


def linked_select(label: str, name: str, options: list[str], where=st, widget: str = "selectbox", **kwargs) -> str:
    """A choice (``widget``: ``selectbox``, ``select_slider`` or ``radio``) whose value lives in the
    URL (``name``) and survives page switches."""
    key = f"w_{name}"
    value = st.session_state.get(key, str(recalled(name, kwargs.pop("default", options[0]))))
    _seed(key, value if value in options else options[0])
    chosen = getattr(where, widget)(label, options, key=key, **kwargs)
    remember(name, chosen)
    return chosen


def memo(src: Source, name: str, p: float, compute: Callable[[], object]) -> object:
    """A table or figure input derived from the source's regions at p, computed once per session."""
    store = st.session_state.setdefault("_memo", {})
    key = (src.label, id(src.saved), p, name)
    if key not in store:
        if len(store) >= 64:
            store.clear()
        store[key] = compute()
    return store[key]


# -- runs ----------------------------------------------------------------------------------------


def list_runs() -> list[str]:
    """Run directories under :data:`RUN_ROOTS` (those holding a manifest), as paths from the repo root."""
    found = []
    for root in RUN_ROOTS:
        folder = REPO / root
        if folder.is_dir():
            found += sorted(f"{root}/{d.name}" for d in folder.iterdir() if (d / MANIFEST).is_file())
    return found


def resolve_path(path: str) -> Path:
    """A path typed in the app: absolute as given (after ``~``), else relative to the repository root."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else REPO / candidate


def pick_run() -> RunDir | None:
    """The sidebar's run picker: listed runs, or any typed path. Shows an error and returns None
    when the chosen directory is not a readable run."""
    runs = list_runs()
    default = str(recalled("run", os.environ.get(RUN_ENV) or (runs[0] if runs else "")))
    options = [*runs, *([default] if default and default not in runs and default != CUSTOM else [])]
    if st.session_state.get("custom_source") is not None:
        options.append(CUSTOM)
    current = st.session_state.get("w_run", default)
    if current not in options:
        current = default if default in options else (options[0] if options else None)
    _seed("w_run", current)
    chosen = st.sidebar.selectbox("Run", options, key="w_run", placeholder="no run found: type a path below")
    _seed("w_run_path", st.session_state.get("w_run_path", ""))
    typed = st.sidebar.text_input("…or a run directory path", key="w_run_path", placeholder="runs/my-run")
    chosen = typed.strip() or chosen
    if not chosen:
        st.info("No run yet: make one with `cpift run configs/tiny.toml --out runs/tiny`, or type a path.")
        return None
    remember("run", chosen)
    if chosen == CUSTOM:
        return None
    with errors_shown():  # an unreadable run is a message
        return RunDir.open(resolve_path(chosen))
    return None


def _stamp(run: RunDir) -> float:
    """When the run's regions were written (0 if absent): part of the cache keys."""
    try:
        return (run.path / REGIONS / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the run's core regions…", max_entries=8)
def _saved_regions(path: str, stamp: float) -> CoreRegions:
    return run_regions(RunDir.open(path))


@st.cache_resource(show_spinner="Measuring the core regions again from the base and the probes…", max_entries=2)
def _probe_regions(path: str, stamp: float, p: float) -> CoreRegions:
    run = RunDir.open(path)
    return regions_from_probes(run, p, run_regions(run).tasks)


@st.cache_resource(show_spinner="Selecting the cores at the new p…", max_entries=16)
def _regions_at(path: str, stamp: float, p: float, from_probes: bool) -> CoreRegions:
    saved = _saved_regions(path, stamp)
    source = _probe_regions(path, stamp, saved.p) if from_probes else saved
    return source if p == source.p else source.with_p(p)


@st.cache_data(show_spinner=False, max_entries=8)
def _fusion_report(path: str, stamp: float) -> pd.DataFrame | None:
    return run_fusion_report(RunDir.open(path))


@dataclass(frozen=True)
class Source:
    """What the exploration pages look at: a run's regions, or regions of checkpoints given by path.

    ``p_max`` is the largest p :meth:`regions` answers (None: only the saved p).
    """

    label: str
    run: RunDir | None
    saved: CoreRegions
    p_max: float | None
    from_probes: bool

    def regions(self, p: float) -> CoreRegions:
        """The regions at p (cached)."""
        if p == self.saved.p:
            return self.saved
        if self.p_max is None or p > self.p_max:
            raise ParameterError(f"these regions answer p ≤ {self.p_max or self.saved.p:g} only")
        if self.run is None:  # the page's own checkpoints: keep the last answer in the session
            last = st.session_state.get("custom_at")
            if last is None or last.p != p:
                st.session_state["custom_at"] = last = self.saved.with_p(p)
            return last
        return _regions_at(str(self.run.path), _stamp(self.run), p, self.from_probes and p > (self.saved.max_p or 0))

    def fusion_report(self) -> pd.DataFrame | None:
        """The run's fusion report (angles per tensor), if it has one."""
        return _fusion_report(str(self.run.path), _stamp(self.run)) if self.run is not None else None

    def has_probes(self) -> bool:
        """Whether the run kept its probes' weights (needed to rebuild a fused model)."""
        return self.run is not None and bool(probe_models(self.run, self.saved.tasks))


def source() -> Source | None:
    """The sidebar's choice as a :class:`Source`; None (an error or a hint already shown) when unusable."""
    run = pick_run()
    if run is None:
        custom = st.session_state.get("custom_source")
        return custom if st.session_state.get("_run") == CUSTOM else None
    with errors_shown():  # unreadable regions are a message
        saved = _saved_regions(str(run.path), _stamp(run))
        probes = bool(probe_models(run, saved.tasks))
        return Source(str(run.path.name), run, saved, 100.0 if probes else saved.max_p, probes)
    return None


def page_source() -> Source:
    """The sidebar's source under the page's heading; stops the page (the reason shown) when unusable."""
    src = source()
    if src is None:
        st.stop()
    st.subheader(src.label)
    return src


def p_slider(src: Source, where=st) -> float:
    """The deep-linked p slider, limited to what the source answers; its regions' p when fixed."""
    high = min(src.p_max or 0.0, P_SLIDER_MAX)
    step = 0.01 if high <= 1 else 0.05  # cores are often saved at p ≤ 1: finer steps there
    if high < 2 * step:
        where.caption(f"p = {src.saved.p:g} % (these regions hold too few |Δ| magnitudes to move p — saved without "
                      "them, or computed from models too large to hold them — and no probes to measure again, so p "
                      "cannot change here)")
        remember("p", src.saved.p)
        return src.saved.p
    return linked_slider("p: core size, % of all parameters", "p", step, high, src.saved.p, step, "%.2f", where,
                         help=f"Up to {src.p_max:g} % for this run" + (" (the saved top |Δ| only)"
                                                                        if not src.from_probes else ""))
