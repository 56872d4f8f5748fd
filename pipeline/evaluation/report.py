"""The report: one document model (headings, paragraphs, tables, figures) rendered twice, as Markdown
(reports/report.md, figures linked) and as one self-contained HTML file (reports/report.html, figures embedded as
data URIs, no scripts, no external requests), so the two always say the same thing."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup, escape

from pipeline.data.collected import DEV, TEST, Collected, natural_key
from pipeline.evaluation.labelling import ERRORS_PNG, NEXT_PNG
from pipeline.runtime import atomic
from pipeline.runtime.params import Variant

# --------------------------------------------------------------------------------------------------
# The document model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str  # Markdown inline: **bold** only


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    path: Path  # a PNG file
    caption: str


@dataclass(frozen=True)
class Figures:
    items: list[Figure]  # shown side by side


@dataclass(frozen=True)
class Details:
    summary: str
    blocks: list = field(default_factory=list)  # folded away in HTML, a sub-section in Markdown


# --------------------------------------------------------------------------------------------------
# Inputs from other stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    """Pictures made by earlier stages that the report shows."""

    data_card: list[Path]  # collect: image sizes and a grid per class
    preview: Path | None  # augment: originals above their augmented versions
    gan: list[tuple[str, Path, dict]]  # synthesize: (fold, sample grid, its FID/KID/CAS metrics)

    @staticmethod
    def gather(data_card: Path, preview: Path, synthesize_reports: Path) -> "Assets":
        cards = sorted(data_card.glob("*.png"), key=lambda p: (p.stem != "sizes", natural_key(p.stem)))
        gan = []
        for metrics in sorted(synthesize_reports.glob("*.json"), key=lambda p: natural_key(p.stem)):
            grid = metrics.with_name(f"{metrics.stem}-grid.png")
            if grid.exists():
                gan.append((metrics.stem, grid, json.loads(metrics.read_text())))
        return Assets(cards, preview if preview.exists() else None, gan)


def data_summary(collected: Collected) -> dict:
    """What the report says about the data: counts per split and class, folds, repeats, groups."""
    labelled = collected.labelled
    return {"labelled": len(labelled), "external": len(collected.external), "dev": len(collected.part(DEV)),
            "test": len(collected.part(TEST)), "classes": list(collected.classes),
            "per_class": {c: int((labelled.target == i).sum()) for i, c in enumerate(collected.classes)},
            "folds": len(collected.folds), "repeats": len(collected.repeats),
            "groups": int(labelled.group.nunique()), "unlabelled": len(collected.unlabelled)}


def recipe(variant: Variant) -> str:
    """A variant in a few words."""
    parts = [variant.backbone, f"{variant.weights} weights", variant.strategy.replace("_", " "),
             f"{variant.input_size} px" if variant.input_size else "its own input size"]
    if variant.strategy != "linear_probe":
        parts.append(f"{variant.epochs} epochs")
    parts += [name for name, on in (("+augment", variant.augment), ("+GAN samples", variant.synthetic),
                                    ("+unlabelled pool", variant.unlabelled)) if on]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# What the report says
# --------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ci(low: float, high: float) -> str:
    return f"[{_f(low)}, {_f(high)}]"


def _p(p: float, resamples: int | None = None) -> str:
    """A p-value in words; a bootstrap's at its floor, 2 / (resamples + 1), is only known to be that small."""
    if not np.isfinite(p):
        return "–"
    if resamples and p <= 2 / (resamples + 1) + 1e-12:
        return f"≤ {p:.3f}"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def headline(ev: dict) -> list:
    d, best = ev["data"], ev["best"]
    s = ev["variants"][best]
    level = f"{ev['params']['confidence']:.0%}"
    oof = s["oof"]["accuracy"]
    lines = [f"{d['labelled']} labelled images in {len(d['classes'])} classes, {d['folds']}-fold cross-validation"
             + (f" repeated {d['repeats']} times" if d["repeats"] > 1 else "")
             + (f"; {d['external']} external images that no variant or fold model trained on: {d['dev']} in the "
                f"development part, for choosing settings, and {d['test']} in the final test, which only reports."
                if d["external"] else "."),
             f"**{best}** did best: out-of-fold accuracy **{_f(oof['value'])}** ({level} interval "
             f"{_f(oof['low'])} to {_f(oof['high'])})."]
    selection = ev.get("selection")
    if selection and len(ev["variants"]) > 1:
        aware, cv = selection["accuracy"], s["cv"]["accuracy"]
        lines.append(f"It was chosen among {len(ev['variants'])} variants on these same folds, so its figures are "
                     f"optimistic (the best of several noisy estimates; per fold model {_f(cv['mean'])}). Choosing "
                     f"on the other folds and scoring the choice on the held-out one (leave-one-fold-out selection) "
                     f"estimates the whole choose-then-train procedure: **{_f(aware['mean'])}** per fold model "
                     f"({level} interval {_f(aware['low'])} to {_f(aware['high'])}).")
    dev, test = s[DEV], s[TEST]
    if dev:
        lines.append(f"On the development part its fold models score {_f(dev['accuracy']['fold_mean'])} on average, "
                     f"their ensemble {_f(dev['accuracy']['ensemble'])}.")
    if test:
        inside = "inside" if s["test_inside_cv_interval"] else "outside"
        cv = s["cv"]["accuracy"]
        lines.append(f"On the **final test**, which chose nothing, its fold models score "
                     f"{_f(test['accuracy']['fold_mean'])} on average ({inside} the cross-validation interval "
                     f"{_ci(cv['low'], cv['high'])} for a fold model), and their ensemble "
                     f"**{_f(test['accuracy']['ensemble'])}**.")
    return [Text(" ".join(lines))]


TEST_NAMES = {"corrected_t": "corrected resampled t-test", "bootstrap": "paired bootstrap"}


def verdicts(ev: dict) -> list[str]:
    """One sentence per comparison: what changed, by how much, and whether the test can tell."""
    out, resamples = [], ev["params"]["bootstrap"]
    for c in ev["comparisons"]:
        test = TEST_NAMES[c["test"]]
        move = "raised" if c["difference"] > 0 else "lowered" if c["difference"] < 0 else "left"
        body = (f"{c['what']} ({c['a']} → {c['b']}) {move} accuracy by {abs(c['difference']):.3f} "
                f"(interval {c['low']:+.3f} to {c['high']:+.3f}, Holm-corrected p {_p(c['p_holm'])}, {test})")
        if c["significant"]:
            words = ("Ahead", "Behind") if c["what"].startswith("best") else ("Helped", "Hurt")
            text = f"**{words[0] if c['difference'] > 0 else words[1]}:** {body}."
        else:
            text = f"**Not significant:** {body}; this data cannot tell the two apart."
        x = c.get("external", {}).get(DEV)
        if x:
            text += (f" On the development part the fold ensembles differ by {x['difference']:+.3f} "
                     f"({x['low']:+.3f} to {x['high']:+.3f}, p {_p(x['p_value'], resamples)}).")
        out.append(text)
    return out


def comparison_summary(ev: dict) -> str:
    """How many comparisons the test could decide, and what would give it more power."""
    compared = ev["comparisons"]
    decided = sum(c["significant"] for c in compared)
    d = ev["data"]
    text = (f"{decided} of {len(compared)} differences are significant at {ev['params']['alpha']} after Holm's "
            "correction (the p-values are adjusted for the number of comparisons; the intervals are not).")
    if d["repeats"] == 1 and ev["params"]["test"] == "corrected_t":
        text += (f" The corrected t-test sees {d['folds']} folds, {d['folds'] - 1} degrees of freedom, so only "
                 "large differences pass; more repeats of the split (`collect.repeats: [0, 1, 2, ...]`) give it "
                 "more power.")
    if any(DEV in c.get("external", {}) for c in compared):
        text += (" The development part of the external images is far larger than the cross-validation, so its "
                 "differences are measured much more tightly; they are shown beside each verdict, not used for it. "
                 "The final test's differences are in its own section below.")
    return text


def variants_table(ev: dict) -> Table:
    """Every variant's figures to choose by: cross-validation and the development part."""
    level = f"{ev['params']['confidence']:.0%}"
    has_dev = any(s[DEV] for s in ev["variants"].values())
    header = ["variant", "recipe", f"out-of-fold accuracy [{level}]", f"per-fold mean ± std [{level} corrected]",
              "balanced accuracy", "macro-F1", "ROC AUC", "log loss", "ECE"]
    if has_dev:
        header += ["development part, fold models", "development part, ensemble"]
    rows = []
    for name, s in _by_cv(ev):
        o, cv = s["oof"], s["cv"]["accuracy"]
        row = [f"**{name}**" if name == ev["best"] else name, s["recipe"],
               f"{_f(o['accuracy']['value'])} {_ci(o['accuracy']['low'], o['accuracy']['high'])}",
               f"{_f(cv['mean'])} ± {_f(cv['std'])} {_ci(cv['low'], cv['high'])}"]
        row += [f"{_f(o[m]['value'])} {_ci(o[m]['low'], o[m]['high'])}"
                for m in ("balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece")]
        if has_dev:
            row += _fold_and_ensemble(s[DEV])
        rows.append(row)
    return Table(header, rows)


def _by_cv(ev: dict) -> list[tuple[str, dict]]:
    return sorted(ev["variants"].items(), key=lambda kv: -kv[1]["cv"]["accuracy"]["mean"])


def _fold_and_ensemble(part: dict | None) -> list[str]:
    if not part:
        return ["–", "–"]
    return [f"{_f(part['accuracy']['fold_mean'])} ± {_f(part['accuracy']['fold_std'])}",
            _f(part["accuracy"]["ensemble"])]


def _part_difference(c: dict, part: str, resamples: int) -> str:
    x = c.get("external", {}).get(part)
    return f"{x['difference']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}], p {_p(x['p_value'], resamples)}" if x else "–"


def comparisons_table(ev: dict) -> Table:
    has_dev = any(DEV in c.get("external", {}) for c in ev["comparisons"])
    rows, resamples = [], ev["params"]["bootstrap"]
    for c in ev["comparisons"]:
        row = [c["what"], f"{c['a']} → {c['b']}", f"{c['difference']:+.3f}", f"[{c['low']:+.3f}, {c['high']:+.3f}]",
               _p(c["corrected_t"]["p_value"]), _p(c["bootstrap"]["p_value"], resamples), TEST_NAMES[c["test"]],
               _p(c["p_holm"]), "**yes**" if c["significant"] else "no"]
        if has_dev:
            row.append(_part_difference(c, DEV, resamples))
        rows.append(row)
    return Table(["change", "variants", "accuracy difference", "interval", "p, corrected t", "p, paired bootstrap",
                  "test used", "its p, Holm-corrected", "significant"]
                 + (["development part: ensemble difference"] if has_dev else []), rows)


def final_test_blocks(ev: dict) -> list:
    """The final test, apart from everything used to choose: it reports how the chosen recipe does on images that
    chose nothing."""
    if not any(s[TEST] for s in ev["variants"].values()):
        return []
    level = f"{ev['params']['confidence']:.0%}"
    resamples = ev["params"]["bootstrap"]
    rows = [[f"**{name}**" if name == ev["best"] else name, *_fold_and_ensemble(s[TEST]),
             ("yes" if s["test_inside_cv_interval"] else "**no**") if s[TEST] else "–"] for name, s in _by_cv(ev)]
    blocks = [Heading("The final test"),
              Text(f"{ev['data']['test']} external images that chose nothing: the best variant was chosen on "
                   "cross-validation, and settings are meant to be tuned on cross-validation and the development "
                   "part. These figures only report; choosing by them (here or in `dvc exp show`, where they sit "
                   "apart in reports/test_metrics.json) would make them optimistic too. The last column says "
                   "whether the fold models' final-test accuracy lies inside the cross-validation interval (when "
                   "it does not, CV was optimistic or pessimistic for that variant)."),
              Table(["variant", "final test, fold models (mean ± std)", "final test, ensemble",
                     f"inside the {level} CV interval?"], rows)]
    if ev["comparisons"]:
        blocks += [Text("The comparisons above, on the final test (paired bootstrap of the fold ensembles over its "
                        "groups of images):"),
                   Table(["change", "variants", "final test: ensemble difference [interval], p"],
                         [[c["what"], f"{c['a']} → {c['b']}", _part_difference(c, TEST, resamples)]
                          for c in ev["comparisons"]])]
    return blocks


def scarcity_blocks(ev: dict, figures: Path) -> list:
    curves = ev["scarcity"]
    if not curves:
        return []
    blocks = [Heading("How it scales with labelled data"),
              Text("The same cross-validation with fewer or more labelled images per class (nested draws, the same "
                   "fixed test set at every point). For a bundled dataset the points beyond its labelled images draw "
                   "from its external images, except the curve's own fixed test set: those images are no external "
                   "test images for the curve.")]
    if (figures / "scarcity.png").exists():
        blocks.append(Figure(figures / "scarcity.png", "Label-scarcity curve"))
    sizes = sorted({p["images_per_class"] for points in curves.values() for p in points})
    rows = []
    for name, points in curves.items():
        by_n = {p["images_per_class"]: p for p in points}
        cells = []
        for n in sizes:
            p = by_n.get(n, {})
            if "not_run" in p:
                cells.append(f"not run: {p['not_run']}")
            elif "oof_accuracy" in p:
                test = f"; test {_f(p['test_accuracy_fold_mean'])}" if "test_accuracy_fold_mean" in p else ""
                cells.append(f"{_f(p['oof_accuracy'])} {_ci(p['oof_accuracy_low'], p['oof_accuracy_high'])}{test}")
            else:
                cells.append("–")
        rows.append([name] + cells)
    blocks.append(Table(["variant"] + [f"{n} per class" for n in sizes], rows))
    return blocks


def per_class_table(classes: list[str], table: dict[str, list[float]]) -> Table:
    rows = [[c, _f(table["precision"][i]), _f(table["recall"][i]), _f(table["f1"][i]), str(int(table["support"][i]))]
            for i, c in enumerate(classes)]
    return Table(["class", "precision", "recall", "F1", "images"], rows)


def error_blocks(ev: dict, figures: Path) -> list:
    classes = ev["data"]["classes"]
    blocks = [Heading("Where the errors are"),
              Text("Confusion matrices of the out-of-fold predictions (rows: true class), and of the ensemble on the "
                   "development part of the external images where there is one. Per-class tables below.")]
    for name, s in ev["variants"].items():
        pictures = [Figure(figures / f"confusion_{name}.png", f"{name}, out-of-fold")]
        if (figures / f"confusion_{name}_dev.png").exists():
            pictures.append(Figure(figures / f"confusion_{name}_dev.png", f"{name}, development part"))
        inner = [Figures(pictures), Text("Out-of-fold:"), per_class_table(classes, s["oof_per_class"])]
        if s.get("dev_per_class"):
            inner += [Text("Development part, ensemble:"), per_class_table(classes, s["dev_per_class"])]
        blocks.append(Details(f"{name}" + (" (best)" if name == ev["best"] else ""), inner))
    return blocks


def labelling_blocks(ev: dict, figures: Path) -> list:
    """The labels to check and the pool images to label next, from the best variant."""
    lab, best = ev.get("labelling"), ev["best"]
    if lab is None:
        return []
    errors = lab["label_errors"]
    method = ("confident learning: how many labels are wrong is estimated from how often each class is "
              "confidently predicted as another, and that many of the least self-confident images are listed")
    if errors:
        text = (f"{len(errors)} labelled images whose label the out-of-fold predictions of {best} doubt ({method}). "
                "Each shows its given label, the class the predictions suggest and that class's probability. A wrong "
                "label costs much when there are ten per class: look at each, fix it in your data and re-run. The "
                "full list is reports/labelling/label_errors.csv.")
    else:
        text = f"The out-of-fold predictions of {best} doubt none of the {ev['data']['labelled']} labels ({method})."
    blocks = [Heading("Labels to check"), Text(text)]
    if errors and (figures / ERRORS_PNG).exists():
        blocks.append(Figure(figures / ERRORS_PNG, "Likely label errors, most doubtful first"))
    return blocks + next_blocks(lab, best, figures)


def next_blocks(lab: dict, best: str, figures: Path) -> list:
    """The pool images worth labelling next, and how they were chosen."""
    blocks = []
    if lab["label_next"]:
        how = {"typicality": "the most typical image of each of the largest regions of feature space that no "
                             "labelled image covers yet (TypiClust: with this few labels a model's uncertainty is not "
                             "worth much yet)",
               "uncertainty_diversity": f"the images {best}'s fold ensemble is least sure about (smallest margin "
                                        "between its top two classes), spread over feature space so they are not "
                                        "near-copies of one confusing shape"}[lab["next_strategy"]]
        blocks += [Heading("What to label next"),
                   Text(f"{len(lab['label_next'])} unlabelled pool images worth labelling first, in order: {how}. "
                        "Each shows the ensemble's guess and its probability. Label them, move them into their class "
                        "folders and re-run. The full list is reports/labelling/label_next.csv."),
                   Figure(figures / NEXT_PNG, "Pool images to label next")]
    return blocks


def data_blocks(ev: dict, assets: Assets) -> list:
    d = ev["data"]
    per_class = ", ".join(f"{c}: {n}" for c, n in d["per_class"].items())
    blocks = [Heading("The data"),
              Text(f"{d['labelled']} labelled images ({per_class}) in {d['groups']} near-duplicate groups, which "
                   f"folds keep together; {d['external']} external images ({d['dev']} development, {d['test']} final "
                   f"test); {d.get('unlabelled', 0)} unlabelled pool images.")]
    blocks += [Figures([Figure(p, p.stem.replace("_", " ")) for p in assets.data_card])] if assets.data_card else []
    if assets.preview is not None:
        blocks += [Heading("Augmentation", 3), Text("Training images (top of each pair) and augmented versions."),
                   Figure(assets.preview, "augmentation preview")]
    if assets.gan:
        blocks += [Heading("Synthetic samples", 3),
                   Text("Each fold's GAN (trained on that fold's training images only): a row per class, best-scoring "
                        "first. Acceptance is the share of candidates the filter (a classifier of the fold's real "
                        "images and of their augmented views) gave their class at least its threshold; that filter, a "
                        "probe of a few real images, also turns down real ones, so beside it stands its acceptance of "
                        "real held-out images (the development part where there is one, else the validation images), "
                        "what samples as good as real ones would score. FID and KID compare the accepted samples' "
                        "features with the real training images (lower is closer; biased upwards at these sample "
                        "sizes). Novelty is the samples' distance to their nearest real training image over the real "
                        "images' distance to their nearest other one: about 1, as new as another real image; near 0, "
                        "copies. CAS is the accuracy on real validation images of a classifier trained on the samples "
                        "alone, beside the same classifier trained on the real images; on the development part "
                        "(1,000 images) where there is one, since a fold's validation images are few."),
                   Table(["fold", "accepted", "acceptance", "acceptance of real images", "novelty", "FID", "KID",
                          "CAS (samples)", "CAS (real)", "CAS on development (samples / real)"],
                         [[fold, f"{m.get('accepted', '–')} of {m.get('candidates', '–')}", _f(m.get("acceptance")),
                           _f(m.get("acceptance_real_dev", m.get("acceptance_real"))),
                           _f(m.get("novelty_accepted"), 2), _f(m.get("fid_accepted"), 1),
                           _f(m.get("kid_accepted"), 4), _f(m.get("cas_synthetic")), _f(m.get("cas_real")),
                           f"{_f(m.get('cas_synthetic_dev'))} / {_f(m.get('cas_real_dev'))}"]
                          for fold, _, m in assets.gan]),
                   Figures([Figure(grid, fold) for fold, grid, _ in assets.gan])]
    return blocks


def document(ev: dict, figures: Path, assets: Assets) -> list:
    level = f"{ev['params']['confidence']:.0%}"
    blocks = [Heading("Results", 1), *headline(ev), Figure(figures / "accuracy.png", "Accuracy of each variant"),
              variants_table(ev),
              Text(f"Out-of-fold intervals are {level} percentile bootstrap intervals that resample groups of images "
                   "(near-duplicates and a CSV's groups count as one, so pictures of one object cannot narrow them); "
                   "the per-fold "
                   "interval is the Nadeau-Bengio corrected t interval, which widens the naive one because folds "
                   "share training images. Neither includes the variation from collecting another dataset. ECE is "
                   "the expected calibration error (0 = probabilities match accuracy).")]
    if ev["comparisons"]:
        blocks += [Heading("What each ingredient bought"), Text(comparison_summary(ev)), Bullets(verdicts(ev)),
                   Text(f"The comparisons of the best variant ({ev['best']}) with the others test it on the folds that "
                        "chose it, so they favour it. The comparisons of two variants that differ in one setting were "
                        "planned in params.yaml before any result, and do not have that bias.")]
        if (figures / "differences.png").exists():
            blocks.append(Figure(figures / "differences.png", "Paired differences in accuracy"))
        blocks.append(comparisons_table(ev))
    blocks += final_test_blocks(ev)
    blocks += scarcity_blocks(ev, figures)
    blocks += error_blocks(ev, figures)
    blocks += labelling_blocks(ev, figures)
    blocks += [Heading("Calibration and ranking"),
               Figures([Figure(figures / "reliability.png", "Reliability (out-of-fold)"),
                        Figure(figures / "roc.png", "ROC, micro-averaged one-vs-rest (out-of-fold)")])]
    if (figures / "training.png").exists():
        blocks += [Heading("Training"), Figure(figures / "training.png", "Training loss per epoch")]
    return blocks + data_blocks(ev, assets)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def to_markdown(blocks: list, base: Path) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(row) + " |" for row in b.rows] + [""]
        elif isinstance(b, (Figure, Figures)):
            items = b.items if isinstance(b, Figures) else [b]
            out += [" ".join(f"![{f.caption}]({Path(os.path.relpath(f.path, base)).as_posix()})" for f in items), ""]
        elif isinstance(b, Details):
            out += [f"### {b.summary}", "", to_markdown(b.blocks, base)]
    return "\n".join(out)


def _inline(text: str) -> Markup:
    """Escape, then turn **bold** into <strong>: the only markup a Text, bullet or table cell carries."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", str(escape(text))))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@functools.cache
def _environment() -> jinja2.Environment:
    # autoescape: class names and captions come from users' folder names and may hold < or &.
    # StrictUndefined: a misspelt name in the template fails the stage instead of leaving a hole in the page.
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.evaluation", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(kind=lambda block: type(block).__name__, inline=_inline, data_uri=_data_uri)
    return env


def to_html(blocks: list, title: str) -> str:
    """One self-contained page (templates/report.html.j2): figures embedded, no scripts, no external requests."""
    return _environment().get_template("report.html.j2").render(blocks=blocks, title=title)


def write(ev: dict, figures: Path, assets: Assets, markdown: Path, html_path: Path) -> None:
    blocks = document(ev, figures, assets)
    atomic.write_text(markdown, to_markdown(blocks, markdown.parent))
    atomic.write_text(html_path, to_html(blocks, f"Results: {ev['best']} did best"))

