"""The Streamlit entry point: `looplens app` runs ``streamlit run app/main.py`` (see app/cli.py).

Each page is a thin script under app/views/ that calls ``interp`` through the caches in app/state.py.

First paint (issue 13): this script draws the navigation and the page's title before it imports
anything beyond Streamlit, then the sidebar (which checks the runs without opening them), then runs
the page. Pandas and plotly come with the page's modules; torch, TransformerLens and ``interp`` load
the first time a page opens a run, under a spinner (app/state.py:libraries). Keep heavy imports out of
this file: tests/test_app.py checks the title is drawn while torch cannot even be imported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

# Not "pages/": Streamlit would also serve a pages/ folder as old-style pages, bypassing this script
# (and its sidebar) when a page URL is opened directly.
PAGES = Path(__file__).with_name("views")


def main() -> None:
    st.set_page_config(page_title="looplens", page_icon=":material/all_inclusive:", layout="wide")
    logging.getLogger("looplens.app").setLevel(logging.INFO)
    page = st.navigation(
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
    st.title(page.title)  # on screen before the imports below (pages draw their content after it)

    from looplens.app import ui  # pandas (app/state.py); imported once per server process

    ui.sidebar()
    page.run()


main()
