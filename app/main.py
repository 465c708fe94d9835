"""The cpift app: ``streamlit run app/main.py`` (``make app``). Pages are thin views over ``cpift``.

Deep links: the page is the URL path (``/grouping``; a link with ``?page=grouping`` is sent there) and ``run``,
``p``, ``tau`` and ``layer`` are query parameters (see ``app/common.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pages import app/common.py as `common`

st.set_page_config(page_title="cpift", layout="wide")

PAGES = [
    st.Page("views/runs.py", title="Runs", url_path="runs", default=True),
    st.Page("views/regions.py", title="Core regions", url_path="regions"),
    st.Page("views/overlap.py", title="Overlap", url_path="overlap"),
    st.Page("views/grouping.py", title="Grouping", url_path="grouping"),
    st.Page("views/fusion.py", title="Fusion preview", url_path="fusion"),
    st.Page("views/drift.py", title="Importance drift", url_path="drift"),
    st.Page("views/training.py", title="Training", url_path="training"),
    st.Page("views/compare.py", title="Compare & report", url_path="compare"),
]

page = st.navigation(PAGES)
wanted = st.query_params.get("page")
if wanted and wanted != page.url_path:  # a link naming the page as a parameter: go there, keep the rest
    target = next((p for p in PAGES if p.url_path == wanted), None)
    if target is not None:
        st.switch_page(target, query_params={k: v for k, v in st.query_params.to_dict().items() if k != "page"})
page.run()
