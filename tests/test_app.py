"""app/: the `looplens app` verb, run discovery, and every page under Streamlit's AppTest.

The pages run on tests/fixtures/app_runs (three tiny runs, rebuilt by tests/fixtures/make_app_runs.py),
copied to a temporary folder so nothing is written into the repository. Each page must load without an
exception, its widgets must change what it shows, and bad input must give an error message in the page.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from looplens.app import cli as app_cli
from looplens.app.runs import RUNS_ENV, SHIPPED_RUN_ENV, check_run_dir, default_run_dirs, expand_run_dirs
from streamlit.testing.v1 import AppTest

FIXTURE = Path(__file__).parent / "fixtures" / "app_runs"
MAIN = str(Path(app_cli.__file__).with_name("main.py"))
RUNS = ["comp-looped", "comp-vanilla", "depth-dynamic"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A copy of the fixture runs (with their datasets under .datasets/)."""
    root = tmp_path_factory.mktemp("app") / "runs"
    shutil.copytree(FIXTURE, root)
    return root


def start(monkeypatch, *paths, page: str | None = None) -> AppTest:
    monkeypatch.setenv(RUNS_ENV, os.pathsep.join(map(str, paths)))
    at = AppTest.from_file(MAIN, default_timeout=120).run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def assert_clean(at: AppTest) -> None:
    """No exception box and no error message anywhere on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not errors(at), errors(at)


def heatmap_z(at: AppTest, index: int = 0) -> list:
    return [trace.get("z") for trace in charts(at)[index]["data"]]


def shape(z) -> tuple[int, ...]:
    """Shape of a heatmap's z, whether plotly wrote it as nested lists or as a typed array."""
    if isinstance(z, dict):
        return tuple(int(d) for d in z["shape"].split(","))
    return (len(z), len(z[0]))


# ---------------------------------------------------------------------------------------------------
# CLI and run discovery
# ---------------------------------------------------------------------------------------------------
def test_cli_registered_with_help(capsys):
    from looplens.analyses.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["app", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "RUN_DIR" in out


def test_cli_execs_headless_streamlit(monkeypatch, capsys, runs):
    """`looplens app DIR --port N` replaces itself by a headless streamlit on 127.0.0.1 (same PID)."""
    from looplens.analyses.cli import main

    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    assert main(["app", str(runs), "--port", "8765"]) == 0
    exe, argv, env = calls[0]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4] == MAIN
    flags = dict(zip(argv[5::2], argv[6::2]))
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert env[RUNS_ENV] == str(runs.resolve())
    assert "serving 3 runs" in capsys.readouterr().out


def test_cli_bad_port_and_missing_dir(monkeypatch, capsys, tmp_path):
    from looplens.analyses.cli import main

    monkeypatch.setattr(os, "execve", lambda *a: None)
    assert main(["app", "--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["app", str(tmp_path / "nope")]) == 0  # served anyway: the page explains, other runs work
    assert "does not exist" in capsys.readouterr().err


def test_default_run_is_the_shipped_one(monkeypatch, capsys, runs, tmp_path):
    monkeypatch.setenv(SHIPPED_RUN_ENV, str(tmp_path / "absent"))
    assert default_run_dirs() == []
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append(env))
    assert app_cli.run(app_cli.build_args([])) == 0
    assert "no RUN_DIR given and no shipped run" in capsys.readouterr().err
    monkeypatch.setenv(SHIPPED_RUN_ENV, str(runs / "comp-looped"))
    assert default_run_dirs() == [runs / "comp-looped"]
    app_cli.run(app_cli.build_args([]))
    assert calls[-1][RUNS_ENV] == str(runs / "comp-looped")


def test_expand_and_check_run_dirs(runs, tmp_path):
    assert [p.name for p in expand_run_dirs([runs])] == RUNS
    assert expand_run_dirs([runs / "comp-looped", runs]) == [runs / n for n in RUNS]
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for path, message in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "is empty"),
                          (tmp_path / "other", "no config.json"), (tmp_path / "other" / "notes.txt", "is a file")]:
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            check_run_dir(path)


# ---------------------------------------------------------------------------------------------------
# First paint (issue 13): the page's skeleton comes before torch
# ---------------------------------------------------------------------------------------------------
HEAVY = ("torch", "transformer_lens", "looplens.interp", "looplens.models")


def run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported yet); it prints one JSON line last."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_app_modules_import_without_torch():
    """What main.py imports before drawing the sidebar: no pandas, plotly.express, torch, TransformerLens or interp;
    app.figures (which the pages import) no torch, TransformerLens or interp."""
    loaded = run_python(
        "import json, sys\n"
        "import looplens.app.ui, looplens.app.state, looplens.app.runs\n"
        f"light = [m for m in {(*HEAVY, 'pandas', 'plotly.express')!r} if m in sys.modules]\n"
        "import looplens.app.figures\n"
        f"print(json.dumps([light, [m for m in {HEAVY!r} if m in sys.modules]]))")
    assert loaded == [[], []]


BLOCK_HEAVY = """
import json, sys
from importlib.abc import MetaPathFinder
from streamlit.testing.v1 import AppTest

tried = []
class Block(MetaPathFinder):  # torch and TransformerLens cannot be imported in this interpreter
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformer_lens"):
            tried.append(name)
            raise ImportError(f"{name} blocked by the test")
sys.meta_path.insert(0, Block())
at = AppTest.from_file(%r, default_timeout=120).run()
print(json.dumps({"titles": [t.value for t in at.title], "captions": [c.value for c in at.caption],
                  "errors": [e.value for e in at.error], "warnings": [w.value for w in at.warning],
                  "exceptions": [e.value for e in at.exception], "tried": tried,
                  "loaded": [m for m in ("torch", "transformer_lens") if m in sys.modules]}))
"""


def test_title_and_sidebar_are_drawn_before_torch(runs):
    """With torch unimportable, the app still draws the page's title, the sidebar's run list and the
    page's caption; the heavy imports come after the title and the sidebar, and their failure is an
    error box, not a traceback. So a user sees the page (and a spinner) at once."""
    out = run_python(BLOCK_HEAVY % MAIN, **{RUNS_ENV: str(runs / "comp-looped")})
    assert out["titles"] == ["Training"]
    assert any("comp-looped" in c for c in out["captions"]), out["captions"]  # the sidebar's run list
    assert any("Accuracy of each split" in c for c in out["captions"]), out["captions"]  # the page's caption
    assert out["tried"], "the app never asked for torch: the test would prove nothing"
    assert out["loaded"] == [] and out["exceptions"] == []
    assert any(e.startswith("**Loading torch") and "blocked by the test" in e for e in out["errors"]), out
    assert any("comp-looped** does not open" in e and "blocked by the test" in e for e in out["errors"]), out
    assert any("No usable run" in w for w in out["warnings"])


# ---------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------
def test_training_page(monkeypatch, runs):
    at = start(monkeypatch, runs)
    assert_clean(at)
    assert at.title[0].value == "Training"
    curves = charts(at)
    assert len(curves) == 2  # training curves + curriculum (the depth run)
    names = {t["name"] for t in curves[0]["data"]}
    assert any("comp-looped" in n for n in names) and any("comp-vanilla" in n for n in names)
    stages = [s for s in curves[0]["layout"].get("shapes", []) if s.get("type") == "line"]
    assert stages, "grokking-stage markers expected (the fixture memorises train_inferred)"

    at.radio(key="training_metric").set_value("loss").run()
    assert_clean(at)
    assert charts(at)[0]["layout"]["yaxis"]["title"]["text"].startswith("cross-entropy loss")

    at.multiselect(key="training_runs").set_value(["comp-looped"]).run()
    assert_clean(at)
    assert len(charts(at)) == 1  # no depth run left: no curriculum chart
    assert all("comp-vanilla" not in t.get("name", "") for t in charts(at)[0]["data"])


def test_depth_page_sources(monkeypatch, runs):
    at = start(monkeypatch, runs, page="depth")
    assert_clean(at)
    assert at.selectbox(key="_w:run").value == "depth-dynamic"  # the depth run is preferred here
    assert shape(heatmap_z(at)[0]) == (5, 8)  # hops 2..6 x 8 iteration counts from eval/step_600.csv

    at.radio(key="depth_source").set_value("training metrics (metrics.csv)").run()
    assert_clean(at)
    assert shape(heatmap_z(at)[0])[1] == 4  # the counts evaluated during training: 1, 2, 4, 8

    at.radio(key="depth_source").set_value("evaluate a checkpoint now").run()
    at.slider(key="depth_max_iterations").set_value(3).run()
    assert_clean(at)
    assert shape(heatmap_z(at)[0])[1] == 3


def test_query_page_checkpoint_changes_lens(monkeypatch, runs):
    at = start(monkeypatch, runs, page="query")
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "bridge 1" in text and "(answer)" in text and "**Prediction**" in text
    assert len(charts(at)) == 3  # lens of bridge 1, lens of the answer, attention
    slider = at.select_slider(key="_w:query_step:" + str(runs / "comp-looped"))
    assert slider.value == 1200
    late = heatmap_z(at)
    slider.set_value(16).run()
    assert_clean(at)
    assert heatmap_z(at) != late, "another checkpoint must change the logit lens"

    at.slider(key="query_iterations").set_value(4).run()
    assert_clean(at)
    assert "t3.b1" in charts(at)[0]["data"][0]["x"]  # 4 iterations x 2 blocks


def test_query_page_bad_queries(monkeypatch, runs):
    at = start(monkeypatch, runs, page="query")
    for query, message in [("e5 r1 x9", "'x9' at position 2 is not a known token"),
                           ("e999 r0", "'e999' at position 0 is not a known token"),
                           ("r1 e5", "is a relation; expected an entity"),
                           ("e5", "has no relation"),
                           ("e5 r1 r2 r3 r0 r1", "has 5 hops; this run's model reads at most 2")]:
        at.text_input(key="query_text").set_value(query).run()
        assert not at.exception, (query, at.exception)
        assert errors(at) and message in errors(at)[0], (query, errors(at))
    at.text_input(key="query_text").set_value("e5 r1 r2").run()
    assert_clean(at)


def test_query_page_builder_and_random(monkeypatch, runs):
    at = start(monkeypatch, runs, page="query")
    at.selectbox(key="query_head").set_value(7).run()
    assert_clean(at)
    assert "`e7`" in " ".join(m.value for m in at.markdown)
    at.button[0].click().run()  # "Random query": fills the text box from the chosen split
    assert_clean(at)
    assert at.text_input(key="query_text").value.startswith("e")


def test_patching_page(monkeypatch, runs):
    at = start(monkeypatch, runs, page="patching")
    assert_clean(at)
    rows = charts(at)[0]["data"][0]["y"]
    assert len(rows) == 3  # one row per position of a 2-hop query
    at.toggle(key="patch_per_head").set_value(True).run()
    assert_clean(at)
    assert len(charts(at)[0]["data"][0]["y"]) == 3 * 2  # positions x heads
    at.selectbox(key="patch_corrupt").set_value("relation 2").run()
    assert_clean(at)

    at.radio(key="patch_mode").set_value("one pair I type").run()
    assert_clean(at)
    assert len(charts(at)) == 1
    at.text_input(key="patch_corrupted").set_value("e1 r0").run()
    assert not at.exception and "differ in length" in errors(at)[0]
    at.text_input(key="patch_corrupted").set_value(at.text_input(key="patch_clean").value).run()
    assert not at.exception and "both queries have the answer" in errors(at)[0]


@pytest.mark.slow
def test_iterations_page_halting_sliders(monkeypatch, runs):
    at = start(monkeypatch, runs, page="iterations")
    assert_clean(at)
    assert len(charts(at)) == 3  # fixed points, overthinking, halting
    star = charts(at)[2]["data"][1]
    at.select_slider(key="iter_eps").set_value(1.0).run()
    at.slider(key="iter_entropy").set_value(6.0).run()
    assert_clean(at)
    loose = charts(at)[2]["data"][1]
    assert loose["x"][0] < star["x"][0], "looser thresholds must halt earlier"
    at.selectbox(key="iter_measure").set_value("attention_drift").run()
    assert_clean(at)
    at.button(key="iter_spectral").click().run()
    assert_clean(at)


# ---------------------------------------------------------------------------------------------------
# Bad runs: messages in the page, the rest keeps working
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, runs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    # a checkpoint whose weights belong to another architecture (sidecar checksum updated to match)
    mismatch = root / "mismatch"
    shutil.copytree(runs / "comp-looped", mismatch)
    import hashlib

    step = 1200
    weights = (runs / "comp-vanilla" / "checkpoints" / f"step_{step}.safetensors").read_bytes()
    (mismatch / "checkpoints" / f"step_{step}.safetensors").write_bytes(weights)
    sidecar = mismatch / "checkpoints" / f"step_{step}.json"
    meta = json.loads(sidecar.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    sidecar.write_text(json.dumps(meta))
    return {"missing": root / "missing", "empty": root / "empty", "corrupt": corrupt, "mismatch": mismatch}


def test_bad_run_dirs_are_reported_in_the_sidebar(monkeypatch, runs, bad_runs):
    at = start(monkeypatch, bad_runs["missing"], bad_runs["empty"], bad_runs["corrupt"], runs / "comp-looped")
    assert not at.exception
    text = "\n".join(errors(at))
    assert "does not exist" in text and "is empty" in text and "corrupt" in text
    assert len(charts(at)) == 1, "the good run is still plotted"
    at.switch_page("views/query.py").run()
    assert not at.exception and len(charts(at)) == 3


def test_no_usable_run(monkeypatch, bad_runs):
    for page in ["training", "depth", "query", "patching", "iterations"]:
        at = start(monkeypatch, bad_runs["missing"], page=page if page != "training" else None)
        assert not at.exception, page
        assert any("No usable run" in w.value for w in at.warning), page


def test_open_run_from_the_sidebar(monkeypatch, runs, tmp_path):
    at = start(monkeypatch)
    assert any("No run given" in i.value for i in at.info)
    at.text_input(key="open_run_path").set_value(str(tmp_path / "typo"))  # submitted with the form
    at.button(key="FormSubmitter:open_run-Open").click().run()
    assert not at.exception and "does not exist" in "\n".join(errors(at))
    at.text_input(key="open_run_path").set_value(str(runs / "comp-vanilla"))
    at.button(key="FormSubmitter:open_run-Open").click().run()
    assert not at.exception and len(charts(at)) == 1


def test_checkpoint_not_matching_its_config(monkeypatch, bad_runs):
    at = start(monkeypatch, bad_runs["mismatch"], page="query")
    assert not at.exception
    assert any("does not match its config" in e for e in errors(at)), errors(at)
    at.select_slider(key="_w:query_step:" + str(bad_runs["mismatch"])).set_value(384).run()
    assert_clean(at)  # the other checkpoints still load
    at.switch_page("views/patching.py").run()
    assert not at.exception


def test_query_leaving_a_random_tail_world(monkeypatch, tmp_path):
    """A well-formed query whose chain has no fact at some hop is explained, not an error; the builder
    offers only the relations an entity has."""
    import numpy as np
    from looplens.app import state
    from looplens.data import DataConfig, build_dataset, load_dataset

    cfg = DataConfig(task="composition", world="random-tail", n_entities=30, n_relations=6, out_degree=2,
                     phi=1.0, eval_max=50, ood_fraction=0.2, test_id_fraction=0.05)  # non-empty test splits
    ds = load_dataset(build_dataset(cfg, tmp_path / "ds"))
    monkeypatch.setattr(state, "dataset", lambda path: ds)
    monkeypatch.setattr(state, "max_query_hops", lambda path: 2)
    head = 0
    have = state.entity_relations("run", head)
    assert len(have) == 2 and all(ds.world.tails[head, r] >= 0 for r in have)
    missing = int(np.nonzero(ds.world.tails[head] < 0)[0][0])
    q = state.parse_query("run", f"e{head}  r{missing} r0")
    assert q["chain"] is None and f"e{head} has no relation r{missing}" in q["problem"]
    bridge = int(ds.world.tails[head, have[0]])
    r2 = state.entity_relations("run", bridge)[0]
    q = state.parse_query("run", f"e{head} r{have[0]} r{r2}")
    assert q["chain"] == [bridge, int(ds.world.tails[bridge, r2])] and q["problem"] is None
    with pytest.raises(ValueError, match="'e30' at position 0 is not a known token"):
        state.parse_query("run", "e30 r0")


# ---------------------------------------------------------------------------------------------------
# The fidelity rule: a run that is not the paper's model is labelled wherever it is chosen or shown
# ---------------------------------------------------------------------------------------------------
MODIFIED_BANNER = "Modification of the paper's model"


def banners(at: AppTest) -> list[str]:
    return [w.value for w in at.warning if MODIFIED_BANNER in w.value]


def all_captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


@pytest.fixture(scope="module")
def shipped_looped(tmp_path_factory) -> Path:
    """A copy of the shipped looped run (the app rebuilds its dataset beside it: not in the repository)."""
    from looplens.analyses import shipped_run_path

    root = tmp_path_factory.mktemp("shipped")
    shutil.copytree(shipped_run_path() / "looped", root / "looped")
    return root / "looped"


@pytest.fixture(scope="module")
def paper_model_run(tmp_path_factory) -> Path:
    """A composition run with the paper's model, loss and world type (no feedback, answer-only loss, a
    random-tail world), trained for 20 steps: its recipe values differ from the paper's, its model not."""
    from looplens.models.train import preset, train

    out = tmp_path_factory.mktemp("paper") / "rt-looped"
    cfg = preset("smoke-composition").with_overrides(
        ["data.world=random-tail", "data.out_degree=2", "data.phi=1.0", "run.max_steps=20", "eval.every=10",
         "eval.iterations=1,2", "run.save_every=10"])
    train(cfg, out, progress=False)
    return out


def test_shipped_run_is_labelled_a_modification(monkeypatch, shipped_looped):
    at = start(monkeypatch, shipped_looped)
    assert not at.exception, [e.value for e in at.exception]
    assert "looped — modified" in all_captions(at)  # the sidebar's run list
    options = at.multiselect(key="training_runs").options
    assert options == ["looped — modified"], options
    for page in ["training", "depth", "query", "patching"]:
        if page != "training":
            at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
        found = banners(at)
        assert len(found) == 1, (page, found)
        assert "readout feedback (model.feedback=1)" in found[0], found
        assert "intermediate supervision (recurrence.supervise=from_hops)" in found[0], found
        assert "world permutation (paper random-tail)" in found[0], found
        assert "at best 'reproduced with modifications'" in found[0], found
        expander = [e for e in at.expander if e.label.startswith("Recipe differences from the paper")]
        assert expander and "model.d_model=128 (paper 768)" in all_captions(at), page
        if page != "training":
            assert at.selectbox(key="_w:run").options == ["looped — modified"], page


def test_paper_model_run_has_no_modification_banner(monkeypatch, runs, paper_model_run):
    """Beside a modified run (comp-looped: a permutation world), the paper-model run gets no banner, no
    suffix, and a caption saying it is the paper's model."""
    at = start(monkeypatch, paper_model_run, runs / "comp-looped")
    assert_clean(at)
    assert at.multiselect(key="training_runs").options == ["rt-looped", "comp-looped — modified"]
    found = banners(at)
    assert len(found) == 1 and found[0].startswith("**comp-looped**") and "world permutation" in found[0], found
    assert "rt-looped**: the paper's model; recipe differences: data.n_entities=40" in all_captions(at)
    assert "**rt-looped** (the paper's model)" in all_captions(at)  # the sidebar
    for page in ["query", "patching"]:
        at.switch_page(f"views/{page}.py").run()
        assert_clean(at)
        assert at.selectbox(key="_w:run").value == "rt-looped", page
        assert banners(at) == [], (page, banners(at))
        assert ":material/verified: the paper's model; recipe differences:" in all_captions(at), page
        at.selectbox(key="_w:run").set_value("comp-looped").run()  # the other run does get the banner
        assert not at.exception and len(banners(at)) == 1 and "world permutation" in banners(at)[0], page
        at.selectbox(key="_w:run").set_value("rt-looped").run()
