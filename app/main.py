"""The cpift app: ``streamlit run app/main.py`` (``make app``). Pages are thin views over ``cpift``.

Deep links: the page is the URL path (``/grouping``; ``/`` is sent to ``/runs``, a link with ``?page=grouping``
to ``/grouping``) and ``run``, ``p``, ``tau`` and ``layer`` are query parameters (see ``app/common.py``).

Imports: Streamlit puts the entry point's folder (``app/``) on ``sys.path`` for every script run, page
and callback (``streamlit run`` from any directory, and ``AppTest``), so the pages import the modules
beside this one by their own names: ``from common import …``, ``from launcher import …``.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="cpift", layout="wide")

RUNS = st.Page("views/runs.py", title="Runs", url_path="runs")
PAGES = [
    RUNS,
    st.Page("views/regions.py", title="Core regions", url_path="regions"),
    st.Page("views/overlap.py", title="Overlap", url_path="overlap"),
    st.Page("views/grouping.py", title="Grouping", url_path="grouping"),
    st.Page("views/fusion.py", title="Fusion preview", url_path="fusion"),
    st.Page("views/drift.py", title="Importance drift", url_path="drift"),
    st.Page("views/training.py", title="Training", url_path="training"),
    st.Page("views/compare.py", title="Compare & report", url_path="compare"),
]
# Streamlit serves the default page at "/" only, never at its own url_path (/runs would be "Page not
# found"). So the default is this hidden page for "/", sent on to /runs below: every page keeps its URL.
ROOT = st.Page("views/runs.py", title="Runs", url_path="", default=True, visibility="hidden")

page = st.navigation([ROOT, *PAGES])
params = st.query_params.to_dict()
wanted = params.pop("page", None)  # a link naming the page as a parameter: go there, keep the rest
target = next((p for p in PAGES if p.url_path == wanted), RUNS if page is ROOT else page)
if target is not page:
    st.switch_page(target, query_params=params)
page.run()
