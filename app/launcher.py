"""The "start a run" form of the Runs and Training pages: a preset or an edited config → a new process.

The run starts through :func:`cpift.launch.start_run` (its own process group, output to the run's
``logs/launch.log``), so it goes on when the browser tab closes; the Training page watches it by
its run directory. The config is validated before anything starts: a bad key is a message here.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import streamlit as st
from common import REPO, errors_shown, remember, resolve_path, show_kept_error

from cpift.config import Config, parse_config, read_config
from cpift.estimate import estimate_cpu_seconds
from cpift.launch import launch_device, start_run
from cpift.methods import METHODS

CONFIGS = REPO / "configs"
#: The page that watches a run, where the Runs page sends a run it starts.
TRAINING_PAGE = "views/training.py"
#: Session key of a failed start, kept by the button's callback for the form to show under the button.
LAUNCH_ERROR = "launch_error"


def presets() -> dict[str, Path]:
    """The config presets in ``configs/``, by name."""
    return {p.stem: p for p in sorted(CONFIGS.glob("*.toml"))}


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _config(text: str, methods: list[str]) -> Config:
    """The config of the text, with ``run.methods`` replaced by ``methods`` when some are chosen."""
    config = read_config(text)
    if not methods:
        return config
    data = config.to_dict()
    return parse_config({**data, "run": {**data["run"], "methods": methods}})


def _launch(text: str, out: str, methods: list[str]) -> None:
    """Button callback: start the run, then make it the picked run (widgets may be set here only)."""
    with errors_shown(keep_as=LAUNCH_ERROR):
        launch = start_run(_config(text, methods), resolve_path(out))
        remember("run", str(launch.run_dir))
        st.session_state["w_run"] = str(launch.run_dir)
        st.session_state["w_run_path"] = ""
        st.session_state["launched"] = str(launch.run_dir)


def new_run_form(key: str) -> str | None:
    """The form; returns the directory of a run started by it in this script run (else None).

    ``key`` keeps two pages' forms apart in the session.
    """
    found = presets()
    if not found:
        st.info(f"No preset in {CONFIGS}: paste a config below.")
    name = st.selectbox("Preset", list(found), key=f"{key}_preset",
                        help="configs/tiny.toml runs every method on a tiny random model in seconds; quick.toml "
                             "runs SmolLM2-135M on a CPU in about 20 minutes")
    if st.session_state.get(f"{key}_loaded") != name:  # a new preset replaces the edited text
        st.session_state[f"{key}_text"] = found[name].read_text(encoding="utf-8") if name else ""
        st.session_state[f"{key}_loaded"] = name
    text = st.text_area("Config (TOML, editable)", key=f"{key}_text", height=320)
    methods = st.multiselect("Methods (empty: the config's run.methods)", list(METHODS), key=f"{key}_methods")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = st.text_input("Run directory (relative to the repository, or absolute)",
                        value=f"runs/{name or 'run'}-{stamp}", key=f"{key}_out")
    with errors_shown() as invalid:  # an invalid config is a message, and the button stays off
        config = _config(text, methods)
        device = launch_device(config)
    if invalid.error is None:
        if device == "cpu":
            estimate = estimate_cpu_seconds(config)
            st.caption(f"Trains on the CPU (no GPU here). Estimated time: about {_duration(estimate.total_s)} "
                       f"({estimate.basis})." if estimate is not None else
                       f"Trains on the CPU (no GPU here). No time estimate for model {config.model.name!r}: "
                       "costs were measured for the embedded SmolLM2-135M only.")
        else:
            st.caption(f"Trains on {device}.")
    st.button("Start run", key=f"{key}_start", type="primary", disabled=invalid.error is not None,
              on_click=_launch, args=(text, out, methods))
    show_kept_error(LAUNCH_ERROR)
    return st.session_state.pop("launched", None)
