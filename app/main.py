"""The Streamlit entry point: `looplens app` runs ``streamlit run app/main.py`` (see app/cli.py).

Each page is a thin script under app/views/ that calls ``interp`` through the caches in app/state.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st
from looplens.app import ui

# Not "pages/": Streamlit would also serve a pages/ folder as old-style pages, bypassing this script
# (and its sidebar) when a page URL is opened directly.
PAGES = Path(__file__).with_name("views")

st.set_page_config(page_title="looplens", page_icon=":material/all_inclusive:", layout="wide")
logging.getLogger("looplens.app").setLevel(logging.INFO)

navigation = st.navigation(
    {
        "Training": [
            st.Page(PAGES / "training.py", title="Training", icon=":material/show_chart:", default=True),
            st.Page(PAGES / "depth.py", title="Depth", icon=":material/stacked_line_chart:"),
        ],
        "Mechanism": [
            st.Page(PAGES / "query.py", title="Query explorer", icon=":material/search:"),
            st.Page(PAGES / "patching.py", title="Patching", icon=":material/healing:"),
            st.Page(PAGES / "iterations.py", title="Iterations", icon=":material/all_inclusive:"),
        ],
    }
)
ui.sidebar()
navigation.run()
