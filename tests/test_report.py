"""The HTML report (make report): sections, self-contained links, the random-weights banner, summary.json,
a dataset where only mining ran, and a rebuild after a stage changed (stale marked). Synthetic artifacts."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.artifacts import read_json, write_json
from pipeline.report import ReportError, build_report
from report_fixtures import FOLDER_BAD, layout_for, make_experiment, mine_folder, partial_training
from stage_utils import compose_cfg, run_cli

CHAIN = ["detector=mobilenet_fpn", "schedule=smoke", "cluster.k=3", "train_cad.cluster_run=lost/k3",
         "backbone.init=random", "progress=false"]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.scripts = [], set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(a.get("src"))
        if tag == "a" and a.get("href") and not a["href"].startswith("#"):
            self.refs.append(a["href"])
        if tag == "script":
            self.scripts += 1
        if a.get("id"):
            self.ids.add(a["id"])


class _Element(HTMLParser):
    """The text and the table rows (cell texts) inside the element with id ``target``."""

    def __init__(self, target: str):
        super().__init__()
        self.target, self.depth, self.tag = target, 0, None
        self.text, self.rows, self.found = [], [], False

    def handle_starttag(self, tag, attrs):
        if self.depth == 0 and dict(attrs).get("id") == self.target:
            self.tag, self.depth, self.found = tag, 1, True
        elif self.depth and tag == self.tag:
            self.depth += 1
        if self.depth and tag == "tr":
            self.rows.append([])
        if self.depth and tag in ("td", "th") and self.rows:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if self.depth and tag == self.tag:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)
            if self.rows and self.rows[-1]:
                self.rows[-1][-1] += data


def element(report: Path, id_: str) -> _Element:
    p = _Element(id_)
    p.feed((report / "index.html").read_text())
    assert p.found, f"no element with id {id_}"
    return p


def text_of(report: Path, id_: str) -> str:
    """The visible text of one section (whitespace collapsed)."""
    return " ".join("".join(element(report, id_).text).split())


def parse(index: Path) -> _Refs:
    p = _Refs()
    p.feed(index.read_text())
    return p


def check_self_contained(report: Path) -> _Refs:
    p = parse(report / "index.html")
    assert p.refs, "no pictures"
    for ref in p.refs:
        assert ref and not re.match(r"^[a-z]+:", ref) and not ref.startswith("/") and ".." not in ref, ref
        assert (report / ref).is_file(), f"{ref} does not resolve inside {report}"
    assert p.scripts == 0
    return p


@pytest.fixture
def experiment(tmp_path):
    return make_experiment(tmp_path / "outputs", tmp_path / "data")


def test_full_report(experiment):
    s = build_report(experiment)
    report = experiment / "report"
    assert Path(s["index"]) == report / "index.html"
    p = check_self_contained(report)
    sections = ["provenance", "mining", "train-cag", "cluster", "train-cad", "evaluate-cad"]
    assert s["sections"] == sections and set(sections) <= p.ids
    html = (report / "index.html").read_text()
    assert "random-weights-warning" in p.ids and "WARNING: RANDOM WEIGHTS" in html
    # summary.json is what the page shows
    summary = read_json(report / "summary.json")
    assert summary["sections"] == sections and summary["random_init"] and not summary["numbers_are_results"]
    m = summary["mining"][0]
    assert m["corloc"] == 50.0 and m["corloc_recomputed"] == 50.0 and not m["is_result"]
    assert m["published_corloc"] == 61.9 and not m["full_set"]
    assert [q["hit"] for q in m["pictures"]] == [True, False, True]            # first 3 (viz/)
    assert [w["image_id"] for w in m["worst"]] == ["5", "6", "4"]  # lowest IoU first, not those shown above
    assert m["failed_images"][0]["path"] == "/data/broken.jpg" and "/data/broken.jpg" in html
    assert "61.9" in html and "random weights: not a result" in html
    c = summary["cluster"][0]
    assert c["run"] == "lost/k2" and c["quality_from"] == "computed by the report"
    assert c["quality"]["purity"] == 1.0 and c["quality"]["nmi"] == pytest.approx(1.0)
    assert c["quality"]["matched"] == 3 and c["quality"]["unmatched_per_cluster"] == [1, 2]
    assert len(c["galleries"]) == 2 and c["heatmap"] and c["sizes_plot"]
    assert summary["train_cag"]["AP50"] == 12.5 and summary["train_cag"]["curves"]
    assert summary["train_cad"]["num_classes"] == 2
    e = summary["evaluate_cad"][0]
    assert e["unmatched_clusters"] == [3] and {r["class"]: r["cluster"] for r in e["per_class"]} == {"cat": 1, "dog": 2}
    assert [st["state"] for st in summary["provenance"]["stages"]] == ["done"] * 5
    assert summary["provenance"]["missing"] == [] and summary["provenance"]["stale"] == []
    assert not list(experiment.glob(".report*"))   # no temp dirs left


def test_cluster_quality_from_the_stage_metrics_wins(experiment):
    mp = experiment / "cluster" / "lost" / "k2" / "metrics.json"
    q = {"purity": 0.5, "nmi": 0.25, "boxes": 6, "matched": 4, "clusters": ["cluster_0", "cluster_1"],
         "classes": ["cat"], "confusion": [[2], [2]], "unmatched_per_cluster": [1, 1]}
    write_json(mp, {**read_json(mp), "cluster_quality": q})
    c = build_report(experiment)["cluster"][0]
    assert c["quality_from"] == "metrics.json" and c["quality"]["purity"] == 0.5


def test_real_weights_have_no_banner(tmp_path):
    base = make_experiment(tmp_path / "outputs", tmp_path / "data", random_init=False)
    s = build_report(base)
    html = (base / "report" / "index.html").read_text()
    assert not s["random_init"] and s["numbers_are_results"] and s["random_sources"] == []
    assert "random-weights-warning" not in parse(base / "report" / "index.html").ids
    assert 'class="notresult"' not in html and "not a result" not in html
    assert s["mining"][0]["is_result"]


def test_only_mine_ran(tmp_path):
    base = make_experiment(tmp_path / "outputs", tmp_path / "data", stages=("mine",))
    s = build_report(base, args=["dataset=voc07", "schedule=smoke"])
    p = check_self_contained(base / "report")
    assert s["sections"] == ["provenance", "mining"]
    assert {"train-cag", "cluster", "train-cad", "evaluate-cad"}.isdisjoint(p.ids)
    missing = {m["stage"]: m["run"] for m in s["provenance"]["missing"]}
    args = 'ARGS="dataset=voc07 schedule=smoke"'
    assert missing == {"cag": f"make train-cag {args}", "cluster": f"make cluster {args}",
                       "cad": f"make train-cad {args}"}
    html = (base / "report" / "index.html").read_text()
    assert "missing-stages" in p.ids and f"make train-cag {args}".replace('"', "&#34;") in html
    # without the experiment's ARGS, the commands name the experiment by its directories
    s = build_report(base)
    assert {m["stage"]: m["run"] for m in s["provenance"]["missing"]}["cag"] == \
        f'make train-cag ARGS="dataset=voc07 backbone=dino_vits16 paths.output_root={tmp_path / "outputs"}"'


def test_rebuild_after_a_stage_changed_marks_stale(experiment):
    build_report(experiment)
    assert (experiment / "report" / "img" / "cad_curves.png").is_file()
    # mining reran with other results: the downstream stages are now stale; cad's outputs are gone
    mine = experiment / "mine"
    coco = read_json(mine / "pseudo_boxes.json")
    coco["annotations"][1]["bbox"] = [30, 10, 30, 30]                         # image 2 becomes a hit
    write_json(mine / "pseudo_boxes.json", coco)
    write_json(mine / "metrics.json", {**read_json(mine / "metrics.json"), "corloc": 66.7, "corloc_hits": 4})
    import shutil

    shutil.rmtree(experiment / "cad")
    s = build_report(experiment)
    states = {st["stage"]: st["state"] for st in s["provenance"]["stages"]}
    assert states["cag"] == "stale" and states["cluster/lost/k2"] == "stale" and states["mine"] == "done"
    assert states["cad"] == "missing"
    assert set(s["provenance"]["stale"]) == {"cag", "cluster/lost/k2"}
    html = (experiment / "report" / "index.html").read_text()
    assert html.count('class="state-stale">STALE') == 2 and "changed since it ran" in html
    assert s["mining"][0]["corloc"] == 66.7 and s["mining"][0]["corloc_recomputed"] == pytest.approx(400 / 6)
    assert "66.7" in html
    assert s["sections"] == ["provenance", "mining", "train-cag", "cluster"]
    assert not (experiment / "report" / "img" / "cad_curves.png").exists()   # the old pictures went too
    check_self_contained(experiment / "report")


def test_no_outputs_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match=r"no pipeline outputs under .*nothing.*run the mine stage"):
        build_report(tmp_path / "nothing" / "dino_vits16")


def test_stage_accepts_the_chain_args(experiment, tmp_path, capsys):
    from stages.common import run_guarded
    from stages.report import run

    out = experiment.parents[1]
    cfg = compose_cfg("report", [f"paths.output_root={out}", "dataset=voc07", *CHAIN])
    s = run(cfg)
    assert Path(s["index"]) == experiment / "report" / "index.html" and len(s["sections"]) == 6
    # the same ARGS on a dataset without outputs: one `error:` line, exit code 2 (as `python -m stages.report`)
    cfg = compose_cfg("report", [f"paths.output_root={tmp_path / 'empty'}", "dataset=voc12", *CHAIN])
    with pytest.raises(SystemExit) as e:
        run_guarded(run, cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no pipeline outputs under") and "run the mine stage" in err[0]


@pytest.mark.slow
def test_cli_error_line(tmp_path):
    proc = run_cli("stages.report", [f"paths.output_root={tmp_path}", "dataset=voc12", *CHAIN], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no pipeline outputs under")


def test_summary_is_json_serialisable_and_html_escapes(experiment):
    mp = experiment / "mine" / "metrics.json"
    write_json(mp, {**read_json(mp), "failed_images": [{"path": "<b>x.jpg", "error": "bad & <worse>"}]})
    build_report(experiment)
    html = (experiment / "report" / "index.html").read_text()
    assert "<b>x.jpg" not in html and "&lt;b&gt;x.jpg" in html
    json.loads((experiment / "report" / "summary.json").read_text())


def test_several_miners_side_by_side(experiment):
    import shutil

    shutil.copytree(experiment / "mine", experiment / "mine_dinoseg")
    mp = experiment / "mine_dinoseg" / "metrics.json"
    write_json(mp, {**read_json(mp), "method": "dinoseg", "corloc": 33.3})
    assert [m["stage"] for m in build_report(experiment)["mining"]] == ["mine"]   # the default chain only
    s = build_report(experiment, layout=layout_for(experiment))
    assert [m["stage"] for m in s["mining"]] == ["mine", "mine_dinoseg"]
    assert [m["published_corloc"] for m in s["mining"]] == [61.9, 45.8]
    assert "mine_dinoseg" in {st["stage"] for st in s["provenance"]["stages"]}
    p = check_self_contained(experiment / "report")
    assert {"mining-mine", "mining-mine_dinoseg"} <= p.ids
    assert len({q["src"] for m in s["mining"] for q in m["pictures"]}) == 6   # no picture overwrites another


def test_without_ground_truth(experiment, tmp_path):
    """A folder of images (no GT): no hit/miss marks, the worst images are the lowest-scoring boxes,
    no purity/NMI; nothing breaks."""
    for f in (experiment / "mine" / "pseudo_boxes.json", experiment / "cluster" / "lost" / "k2" / "pseudo_labels.json"):
        coco = read_json(f)
        coco["info"]["config"]["dataset"] = {"kind": "folder", "root": coco["info"]["image_root"], "name": "voc07"}
        write_json(f, coco)
    s = build_report(experiment)
    m = s["mining"][0]
    assert [q["hit"] for q in m["pictures"]] == [None] * 3 and "corloc_recomputed" not in m
    assert [w["image_id"] for w in m["worst"]] == ["4", "5", "6"] and all(w["hit"] is None for w in m["worst"])
    assert s["cluster"][0]["quality"] is None and s["cluster"][0]["heatmap"] is None
    html = (experiment / "report" / "index.html").read_text()
    assert "purity/NMI skipped" in html and "MISS" not in html
    check_self_contained(experiment / "report")


# --------------------------------------------------------------------- issue 20: stale, partial, worst, multi-box
def _change_boxes(base: Path) -> None:
    coco = read_json(base / "mine" / "pseudo_boxes.json")
    coco["annotations"][1]["bbox"] = [30, 10, 30, 30]
    write_json(base / "mine" / "pseudo_boxes.json", coco)


def test_every_section_of_a_stale_stage_says_so_with_the_real_command(experiment):
    """Mining reran with another setting: train-cag, the clusters, train-cad and its evaluation keep their old
    numbers, so each section says STALE, what changed upstream, and the command that redoes it (FORCE=1: the
    stage has finished results)."""
    report = experiment / "report"
    _change_boxes(experiment)
    args = ["dataset=voc07", "schedule=smoke"]
    s = build_report(experiment, args=args)
    expected = {
        "train-cag": ("mine/pseudo_boxes.json", 'make train-cag FORCE=1 ARGS="dataset=voc07 schedule=smoke"'),
        "cluster-lost-k2": ("mine/pseudo_boxes.json",
                            'make cluster FORCE=1 ARGS="dataset=voc07 schedule=smoke cluster.k=2"'),
        "train-cad": ("upstream cluster/lost/k2 is stale",
                      'make train-cad FORCE=1 ARGS="dataset=voc07 schedule=smoke train_cad.cluster_run=lost/k2"'),
        "evaluate-cad-eval_trainval": ("upstream cad is stale",
                                       'make evaluate-cad FORCE=1 ARGS="dataset=voc07 schedule=smoke"'),
    }
    for id_, (why, command) in expected.items():
        text = text_of(report, id_)
        assert "STALE" in text and why in text and command in text, (id_, text[:400])
    assert "STALE" not in text_of(report, "mining")
    assert "(rerun it)" not in (report / "index.html").read_text()
    prov = {r["stage"]: r for r in s["provenance"]["stages"]}
    assert prov["cag"]["command"] == expected["train-cag"][1]
    assert s["train_cag"]["status"]["state"] == "stale" and s["cluster"][0]["status"]["state"] == "stale"


def test_a_killed_training_is_shown_partial_with_how_to_resume_not_with_numbers(experiment):
    report, cag = experiment / "report", experiment / "cag"
    for name in ("metrics.json", "manifest.json", "metrics.jsonl"):
        (cag / name).unlink()
    import shutil

    shutil.rmtree(cag / "viz")
    partial_training(cag, 5, 30)
    s = build_report(experiment, args=["dataset=voc07"])
    text = text_of(report, "train-cag")
    assert "partial 5/30" in text and 'make train-cag ARGS="dataset=voc07 train_cag.resume=true"' in text
    assert "final loss" not in text and "AP50" not in text and "33.3" not in text and "12.5" not in text
    assert s["train_cag"]["status"]["label"] == "partial 5/30" and s["train_cag"]["AP50"] is None
    assert {r["stage"]: r["label"] for r in s["provenance"]["stages"]}["cag"] == "partial 5/30"
    # killed before its first checkpoint: failed, and a plain rerun starts it again
    (cag / "model.pt").unlink()
    s = build_report(experiment, args=["dataset=voc07"])
    text = text_of(report, "train-cag")
    assert "failed" in text and "before its first checkpoint" in text and 'make train-cag ARGS="dataset=voc07"' in text
    assert "final loss" not in text and s["train_cag"]["status"]["state"] == "failed"


def test_worst_images_are_never_failed_or_degenerate_images(experiment):
    """Image 5 failed (listed in metrics.json), image 4 is 1x1 px: neither is a "worst image" (each would be
    a black or empty picture, not a miss of the miner)."""
    from PIL import Image

    mp = experiment / "mine" / "metrics.json"
    write_json(mp, {**read_json(mp), "failed_images": [{"image_id": "5", "path": "im5.png", "error": "broken"}]})
    coco = read_json(experiment / "mine" / "pseudo_boxes.json")
    Image.new("RGB", (1, 1)).save(Path(coco["info"]["image_root"]) / "im4.png")
    coco["images"][3].update(width=1, height=1)
    write_json(experiment / "mine" / "pseudo_boxes.json", coco)
    s = build_report(experiment)
    assert [w["image_id"] for w in s["mining"][0]["worst"]] == ["6"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    return mine_folder(tmp / "out", tmp / "imgs")


def test_worst_images_of_a_real_run_with_failures(folder_run, tmp_path):
    """A real folder run where the miner failed on 4 non-images and a 1x1 image (no GT: the worst are the
    lowest box scores): the worst images are real, mined images."""
    s = build_report(folder_run, tmp_path / "report")
    m = s["mining"][0]
    assert len(m["failed_images"]) == len(FOLDER_BAD)
    worst = [w["image_id"] for w in m["worst"]]
    shown = {p["image_id"] for p in m["pictures"]}
    assert len(worst) == 4 and not set(worst) & set(FOLDER_BAD) and not set(worst) & shown, worst
    assert all(w.startswith("img") for w in worst)


def test_multi_box_scores_are_in_the_mining_section(experiment):
    """MaskCut's object recall, boxes per image and any-box CorLoc (metrics.json ``multi_box``) beside each
    miner that has them, the last never under the name CorLoc."""
    import shutil

    shutil.copytree(experiment / "mine", experiment / "mine_maskcut")
    mp = experiment / "mine_maskcut" / "metrics.json"
    mb = {"object_recall": 62.5, "objects_covered": 5, "objects_total": 8, "boxes_per_image": 2.5,
          "any_box_corloc": 83.3, "any_box_hits": 5, "images_scored": 6}
    write_json(mp, {**read_json(mp), "method": "maskcut", "multi_box": mb})
    s = build_report(experiment, layout=layout_for(experiment))
    m = {x["stage"]: x for x in s["mining"]}
    assert m["mine_maskcut"]["multi_box"]["any_box_corloc"] == 83.3 and m["mine"]["multi_box"] is None
    rows = {r[0].strip(): r[1:] for r in element(experiment / "report", "mining").rows if r}
    recall = next(v for k, v in rows.items() if k.startswith("object recall"))
    per_image = next(v for k, v in rows.items() if k.startswith("boxes per image"))
    any_box = next(v for k, v in rows.items() if k.startswith("any-box CorLoc"))
    assert recall[0].strip() == "-" and "62.5" in recall[1] and "(5/8)" in recall[1]
    assert per_image[0].strip() == "-" and "2.50" in per_image[1]
    assert any_box[0].strip() == "-" and "83.3" in any_box[1] and "(5/6)" in any_box[1]
    assert all("83.3" not in " ".join(v) for k, v in rows.items() if not k.startswith("any-box"))
