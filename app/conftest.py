# The page scripts and main.py are Streamlit scripts: importing them runs the page. pytest (e.g. with
# --doctest-modules) must not import them; tests/test_app.py runs them under Streamlit's AppTest.
collect_ignore = ["main.py", "views"]
