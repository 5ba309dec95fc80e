"""The Streamlit entry point: `looplens app` runs ``streamlit run app/main.py`` (see app/cli.py).

Each page is a thin script under app/views/ that calls ``interp`` through the caches in app/state.py.

First paint (issue 13): this script draws the navigation and the page's title before it imports
anything beyond Streamlit, then the sidebar (which checks the runs without opening them), then loads
pandas, plotly, torch, TransformerLens and ``interp`` under a spinner (app/state.py:libraries, once
per server process), then runs the page. Keep heavy imports out of this file and out of app/ui.py,
app/state.py and app/runs.py: tests/test_app.py checks that the title and the sidebar are drawn while
torch cannot even be imported.
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

    from looplens.app import state, ui  # light: Streamlit and the standard library

    sidebar_runs = ui.sidebar()
    with ui.guard("Loading torch, TransformerLens and looplens", "Check the installation: "
                  "`pip install -e .` in the looplens checkout, then restart `looplens app`.") as loaded:
        state.libraries()
    if loaded.ok:
        ui.label_sidebar(sidebar_runs)  # "— modified" on runs that are not the paper's model
    page.run()


main()
