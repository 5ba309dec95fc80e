"""The report: one HTML page over every study, each figure also as its own page, tables as CSV, a claims
summary. The folder is self-contained and opens offline, with plotly's JavaScript in it exactly once:

    OUT/index.html            claims, runs, every study's notes, figures (divs) and tables; loads
                              figures/plotly.min.js
    OUT/summary.md            per claim (PAPER.md 1-6): paper, ours, run, verdict; then each verdict rule
    OUT/figures/plotly.min.js plotly.js (~4.8 MB), the report's only copy: index.html and every page load it
    OUT/figures/*.html        one page per figure
    OUT/figures/*.png         only with png=True (headless Chromium screenshots of those pages)
    OUT/tables/*.csv          every study table
    OUT/studies/NAME/         the study results themselves (``looplens report`` only; reproduce keeps
                              them in its own OUT/studies)

:func:`report_runs` runs every study that applies to a set of run directories and builds the report,
so any run (the one shipped in ``analyses/shipped_run`` included) can regenerate its report.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from looplens.analyses.claims import RULES, ClaimResult, claims_table, judge_claims, run_configs
from looplens.analyses.studies.base import StudyOptions, StudyResult, as_runs, runs_table, write_figure_html
from looplens.data.provenance import atomic_write_text, provenance

PLOTLY_JS = "figures/plotly.min.js"  # relative to the report folder
VERDICT_COLORS = {"reproduced": "#1a7f37", "reproduced with modifications": "#4d8f2a", "partly": "#9a6700",
                  "not reproduced": "#cf222e", "not testable on these runs": "#6e7781", "not measured": "#6e7781"}
MAX_TABLE_ROWS = 40
RUN_COLUMNS = ("run", "task", "world", "kind", "recurrence", "R", "n_blocks", "virtual_layers", "d_model",
               "n_parameters", "final_step", "stop_reason", "learnable_depth", "train_seconds")
_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.7rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .8rem 0; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.verdict { font-weight: 600; color: white; border-radius: .3rem; padding: .1rem .4rem; white-space: nowrap; }
.note { color: #57606a; font-size: .9rem; }
details { margin: .5rem 0 1rem; } summary { cursor: pointer; color: #0969da; }
nav a { margin-right: .8rem; }
"""


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _md(x: Any) -> str:
    return ("" if x is None else str(x)).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_md(_short(v)) for v in row) + " |")
    return "\n".join(lines)


def _short(v: Any) -> Any:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}"
    return v


def claims_frame(claims: Sequence[ClaimResult]) -> pd.DataFrame:
    return pd.DataFrame([{"claim": c.claim, "title": c.title, "paper": c.paper, "ours": c.ours,
                          "run(s)": ", ".join(c.runs), "differences from the paper": " | ".join(c.differences),
                          "verdict": c.verdict} for c in claims])


def summary_markdown(claims: Sequence[ClaimResult], results: Sequence[StudyResult], title: str, intro: str = "") -> str:
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro.strip(), ""]
    lines += ["## Claims (PAPER.md 1-6)", "", markdown_table(claims_frame(claims)), "",
              "## Verdict rules", "",
              "Each verdict is computed by `analyses/claims.py` from the studies' numbers, never by hand. Where "
              "several runs qualify, each is judged and the best verdict counts (its run is named above).", ""]
    lines += [f"{n}. {RULES[n]}" for n in sorted(RULES)]
    lines += ["", "## Study notes", ""]
    for r in results:
        lines += [f"### {r.title}", ""] + [f"- {n}" for n in r.notes] + [""]
    prov = provenance()
    lines += ["## Provenance", "", f"looplens {prov['looplens_version']}, git {prov['git_sha']}, torch "
              f"{prov['torch_version']}.", ""]
    return "\n".join(lines)


def _table_html(frame: pd.DataFrame, csv_name: str) -> str:
    shown = frame.head(MAX_TABLE_ROWS).map(_short) if len(frame) else frame
    more = f" (first {MAX_TABLE_ROWS} of {len(frame)} rows)" if len(frame) > MAX_TABLE_ROWS else ""
    return (f"<details><summary>table {_esc(csv_name)}{more}: tables/{_esc(csv_name)}.csv</summary>"
            + shown.to_html(index=False, border=0, escape=True, na_rep="") + "</details>")


def _claims_html(claims: Sequence[ClaimResult]) -> str:
    rows = []
    for c in claims:
        color = VERDICT_COLORS.get(c.verdict, "#6e7781")
        rows.append(f"<tr><td>{c.claim}</td><td>{_esc(c.title)}</td><td>{_esc(c.paper)}</td><td>{_esc(c.ours)}</td>"
                    f"<td>{_esc(', '.join(c.runs))}</td><td>{'<br>'.join(_esc(d) for d in c.differences)}</td>"
                    f"<td><span class='verdict' style='background:{color}'>"
                    f"{_esc(c.verdict)}</span></td></tr>")
    rules = "".join(f"<li>{_esc(RULES[n])}</li>" for n in sorted(RULES))
    return ("<table><tr><th>#</th><th>claim</th><th>paper</th><th>ours</th><th>run(s)</th>"
            "<th>differences from the paper</th><th>verdict</th></tr>"
            + "".join(rows) + "</table><details><summary>verdict rules (analyses/claims.py)</summary><ol>" + rules
            + "</ol></details>")


def build_report(results: Sequence[StudyResult], out_dir: str | os.PathLike, *, title: str = "looplens report",
                 intro: str = "", runs: pd.DataFrame | None = None, claims: Sequence[ClaimResult] | None = None,
                 png: bool = False, configs: Any = None) -> Path:
    """Write index.html, summary.md, figures/ and tables/ for ``results`` into ``out_dir``.

    ``configs`` (``{run name: TrainConfig}``) let each claim row list the runs' differences from the paper
    (:func:`analyses.claims.run_differences`); tables/claims.csv holds claim, verdict, runs, differences.

    ``claims`` default to :func:`analyses.claims.judge_claims` over the results' findings. ``png`` also
    screenshots every figure page with headless Chromium (ValueError when no Chromium is installed).
    Returns the path of index.html.
    """
    from plotly.offline import get_plotlyjs

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    # Written every time (a newer plotly replaces the file), before the figure pages that share it.
    atomic_write_text(out / PLOTLY_JS, get_plotlyjs())
    if claims is None:
        claims = judge_claims({r.study: r.findings for r in results}, configs)
    atomic_write_text(out / "tables" / "claims.csv", claims_table(claims).to_csv(index=False))
    nav = " ".join(f"<a href='#{_esc(r.study)}'>{_esc(r.study)}</a>" for r in results)
    body = [f"<h1>{_esc(title)}</h1>"]
    if intro:
        body.append("".join(f"<p>{_esc(p)}</p>" for p in intro.strip().split("\n\n")))
    body.append(f"<nav>{nav}</nav><h2 id='claims'>Claims (PAPER.md 1-6)</h2>{_claims_html(claims)}")
    if runs is not None and len(runs):
        shown = runs[[c for c in RUN_COLUMNS if c in runs.columns]]
        body.append("<h2 id='runs'>Runs</h2>" + shown.map(_short).to_html(index=False, border=0, na_rep=""))
    figure_pages = []
    for r in results:
        body.append(f"<h2 id='{_esc(r.study)}'>{_esc(r.title)}</h2>")
        body.append(f"<p class='note'>runs: {_esc(', '.join(r.runs))}</p>")
        body.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in r.notes) + "</ul>")
        for name, fig in r.figures.items():
            key = f"{r.study}__{name}"
            body.append(fig.to_html(include_plotlyjs=False, full_html=False, div_id=f"fig-{key}"))
            page = out / "figures" / f"{key}.html"
            write_figure_html(fig, page, div_id=f"page-{key}")
            figure_pages.append(page)
            body.append(f"<p class='note'>standalone: <a href='figures/{_esc(key)}.html'>figures/{_esc(key)}.html</a>"
                        "</p>")
        for name, table in r.tables.items():
            key = f"{r.study}__{name}"
            atomic_write_text(out / "tables" / f"{key}.csv", table.to_csv(index=False))
            body.append(_table_html(table, key))
    prov = provenance()
    body.append(f"<p class='note'>looplens {_esc(prov['looplens_version'])}, git {_esc(prov['git_sha'])}, torch "
                f"{_esc(prov['torch_version'])}. Verdicts: analyses/claims.py. Summary: summary.md.</p>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + _esc(title) + "</title><style>" + _CSS
            + f"</style><script type='text/javascript' src='{PLOTLY_JS}'></script></head><body>"
            + "\n".join(body) + "</body></html>\n")
    atomic_write_text(out / "index.html", page)
    atomic_write_text(out / "summary.md", summary_markdown(claims, results, title, intro))
    if png:
        export_png(figure_pages)
    return out / "index.html"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def export_png(pages: Sequence[Path], width: int = 1200, height: int = 700, timeout: float = 60.0) -> list[Path]:
    """Screenshot figure pages with headless Chromium (offline; kaleido would need a browser download).
    Writes PAGE.png beside each PAGE.html."""
    browser = chromium_path()
    if browser is None:
        raise ValueError("--png needs Chromium (headless) on PATH; none found. The HTML figures are written anyway")
    out = []
    for page in pages:
        png = page.with_suffix(".png")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", "--virtual-time-budget=5000",
                        f"--screenshot={png}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=timeout)
        out.append(png)
    return out


def report_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                studies: Sequence[str] | None = None, options: StudyOptions | None = None, title: str | None = None,
                png: bool = False, log: Any = None) -> Path:
    """Run every study that applies to ``run_dirs`` (or ``studies``), save each under OUT/studies/NAME,
    and build the report in ``out_dir``. Returns the path of index.html.

    A study that does not apply (e.g. "depth" without a depth-task run) is skipped with a note in the
    report; asking for it by name makes it an error instead.
    """
    from looplens.analyses.studies import get_study, study_names

    options = options or StudyOptions()
    runs = as_runs(run_dirs)
    out = Path(out_dir)
    names = list(studies) if studies else study_names()
    results, skipped = [], []
    for name in names:
        module = get_study(name)
        try:
            chosen = module.select(runs)
        except ValueError as err:
            if studies:
                raise
            skipped.append(f"{name}: {err}")
            continue
        if log:
            log(f"study {name} on {', '.join(r.name for r in chosen)}")
        result = module.run(chosen, options)
        result.save(out / "studies" / name, html=False)  # the report's figures/ holds the HTML
        results.append(result)
    intro = "Runs: " + ", ".join(str(Path(r.path)) for r in runs) + "."
    if skipped:
        intro += "\n\nStudies not applicable to these runs: " + "; ".join(skipped) + "."
    return build_report(results, out, title=title or f"looplens report: {', '.join(r.name for r in runs)}",
                        intro=intro, runs=runs_table(runs), png=png, configs=run_configs(runs))
