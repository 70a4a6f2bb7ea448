"""What a user sees in the MLflow UI after a smoke search, without choosing columns: the
experiment opens on its runs; trial runs are named by their knobs, each knob logged once, the
config one artifact; early stops say why; one Pareto plot; the champion's reason and URI in the
descriptions; the ONNX as an MLflow model with its signature; the agent's housekeeping out of the
tags. A real MLflow server, a real local Ray and the local edge agent (search/configs/smoke.yaml, run
once for the suite: conftest's smoke_study).
"""

import json
import re
from pathlib import Path

import pytest

from edge_agent import contract
from search import study

pytestmark = [pytest.mark.e2e, pytest.mark.ray]  # the smoke study runs Ray
NAME = re.compile(r"^t\d\d C\d+ r\d+ a\d\.\d\d( · (stopped@\d+|failed|champion))?$")


@pytest.fixture(scope="module")
def smoke(smoke_study, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(smoke_study["uri"])
    report = smoke_study["report"]
    exp = client.get_experiment(client.get_run(report["study_run_id"]).info.experiment_id)
    runs = client.search_runs([exp.experiment_id])
    tmp, uri = tmp_path_factory.mktemp("ui"), smoke_study["uri"]
    return {"client": client, "exp": exp, "runs": runs, "report": report, "uri": uri, "tmp": tmp}


def fetch(smoke, run_id: str, path: str) -> Path:
    """One artifact of a run, downloaded as a user's client would."""
    import mlflow

    dst = smoke["tmp"] / "downloads" / run_id
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=smoke["uri"]
    )
    return Path(local)


def by_role(smoke, role: str) -> list:
    return [r for r in smoke["runs"] if r.data.tags.get(contract.ROLE) == role]


def test_the_experiment_opens_on_its_runs_with_a_description(smoke):
    tags = smoke["exp"].tags
    assert tags[study.EXPERIMENT_KIND] == "custom_model_development"  # not the GenAI traces page
    assert "trials are child runs named by their knobs" in tags[study.NOTE]


def test_trial_runs_carry_their_knobs_once_and_say_how_they_ended(smoke):
    trials = by_role(smoke, contract.ROLE_TRIAL)
    assert len(trials) == 4
    for run in trials:
        name, tags = run.info.run_name, run.data.tags
        assert NAME.match(name), name
        assert set(run.data.params) == {"embed_dim", "rank", "alpha", "scan_form", "init"}  # one column each
        # training.init auto: the smoke space reaches embed dim 12, wider than its tiny teacher's 8
        assert run.data.params["init"] == "scratch"
        assert f"C{run.data.params['embed_dim']} r{run.data.params['rank']} " in name
        alpha = run.data.params["alpha"]
        assert alpha == f"{float(alpha):.4g}"  # rounded for the runs table
        config = json.loads(fetch(smoke, run.info.run_id, study.TRIAL_CONFIG_ARTIFACT).read_text())
        assert config["model"]["embed_dim"] == int(run.data.params["embed_dim"])  # the whole config
        verdict = tags[study.TAG_VERDICT]
        assert (run.info.status, verdict in ("complete", "stopped")) == ("FINISHED", True)
        if verdict == "stopped":
            assert name.endswith(f"stopped@{tags[study.TAG_STOP_STEP]}")
            # the reason names the peer that dominated it, as the peer's own run is named
            peer = re.match(r"at step \d+, (t\d\d C\d+ r\d+ a\d\.\d\d) reached", tags[study.TAG_STOP_REASON])
            assert peer and any(t.info.run_name.startswith(peer.group(1)) for t in trials), tags
            assert tags[study.NOTE].startswith("**Stopped early** at step")
    assert any(r.data.tags[study.TAG_VERDICT] == "stopped" for r in trials)  # the smoke stops some
    # the runs table: few param columns in all (each knob once, the study's few, the teacher's one)
    columns = {k for r in smoke["runs"] for k in r.data.params}
    assert len(columns) <= 12 and not {"model.embed_dim", "flops_g", "params"} & columns, columns


def test_one_pareto_plot_with_stopped_trials_and_the_champion_in_the_descriptions(smoke):
    client = smoke["client"]
    (study_run,) = by_role(smoke, contract.ROLE_STUDY)
    run_id = study_run.info.run_id

    def files(path=None):
        for f in client.list_artifacts(run_id, path):
            yield from files(f.path) if f.is_dir else [f]

    pngs = [f.path for f in files() if f.path.endswith(".png")]
    assert pngs == ["pareto/pareto.png"]
    html = next(f for f in files("pareto") if f.path.endswith("pareto.html"))
    page = fetch(smoke, run_id, html.path).read_text()
    assert html.file_size < 200_000 and "stopped early" in page and "chosen" in page
    note = study_run.data.tags[study.NOTE]
    champion = smoke["report"]["champion"]
    model = contract.REGISTERED_MODEL
    assert "### Result" in note and "### Champion" in note and f"models:/{model}@champion" in note
    assert champion["message"] in note
    version = client.get_model_version_by_alias(model, contract.CHAMPION_ALIAS)
    assert version.version == champion["champion_version"]
    assert "**Champion**" in version.description and f"models:/{model}@champion" in version.description


def test_the_study_page_answers_what_ran_how_it_ended_the_front_and_why_the_champion_won(smoke):
    """From the study run's description alone: the front as a table (knobs in each trial's name,
    validation PSNR, the cost with its unit, the device's mean and SD), each stopped trial with its
    reason, the champion and what it trades against the runner-up, the line that loads it; each
    trial a link that keeps the model-training view; the champion's trial marked in the runs table."""
    (study_run,) = by_role(smoke, contract.ROLE_STUDY)
    note, exp_id = study_run.data.tags[study.NOTE], smoke["exp"].experiment_id
    trials = {r.info.run_id: r for r in by_role(smoke, contract.ROLE_TRIAL)}
    head = "| version | trial | val PSNR-Y (dB) | flops_g (GFLOPs per image) | local-cpu latency (ms, mean ± SD) |"  # noqa: E501
    assert head in note, note
    champion = smoke["report"]["champion"]["champion_version"]
    front = re.findall(
        r"^\| (v\d+)( ★ champion)? \| \[`([^`]+)`\]\(([^)]+)\) \| ([\d.]+) \| ([\d.e-]+) \| "
        r"([\d.]+) ± ([\d.e-]+) \|$",
        note,
        re.M,
    )
    assert len(front) >= 1 and [v for v, star, *_ in front if star] == [f"v{champion}"], note
    for _, _, name, link, psnr, *_ in front:
        run_id = link.split("/runs/")[1].split("?")[0]
        assert link == f"#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
        assert trials[run_id].info.run_name.startswith(name.split(" · ")[0])
        assert abs(float(psnr) - trials[run_id].data.metrics["val_psnr_y"]) < 0.006
    stopped = [r for r in trials.values() if r.data.tags[study.TAG_VERDICT] == "stopped"]
    assert stopped and "Stopped early:" in note
    for r in stopped:
        assert f"`{r.info.run_name}`]" in note and r.data.tags[study.TAG_STOP_REASON] in note
    champ = note.split("### Champion")[1].split("###")[0]
    trade = re.search(
        rf"v{champion}: [+-]\d+\.\d\d dB for [+-][\d.e+-]+ ms \(mean latency\) over the runner-up v\d+", champ
    )
    assert trade, champ
    assert f'`mlflow.onnx.load_model("models:/{contract.REGISTERED_MODEL}@champion")`' in champ
    marked = [r for r in trials.values() if r.data.tags.get(study.TAG_IS_CHAMPION) == "true"]
    assert len(marked) == 1 and marked[0].info.run_name.endswith(study.CHAMPION_SUFFIX)
    version = smoke["client"].get_model_version(contract.REGISTERED_MODEL, champion)
    assert marked[0].info.run_id in (version.run_id, version.tags.get(contract.TAG_TRIAL_RUN))


def test_versions_show_the_onnx_model_the_measurement_and_no_housekeeping_tags(smoke):
    from mlflow.models import Model

    client = smoke["client"]
    versions = client.search_model_versions(f"name='{contract.REGISTERED_MODEL}'")
    assert versions
    for v in versions:
        # a device type never in the loop says what it waits for
        assert v.tags[contract.status_tag("orin-nano")] == contract.PENDING
        assert "orin-nano: pending — waiting for an edge agent of this device type" in v.description
        assert v.tags[contract.status_tag("local-cpu")] == contract.DONE
        # the measured device's line says what was measured, as its tags do: nothing stale
        mean = float(v.tags[contract.edge_key("local-cpu", contract.LATENCY_MEAN)])
        assert f"- local-cpu: done — latency {mean:.4g} ms mean (SD " in v.description, v.description
        assert "local-cpu: pending" not in v.description and "power source: unavailable" in v.description
        assert not [k for k in v.tags if k.endswith(tuple("." + t for t in contract.CLAIM_TAGS))]
        folder = fetch(smoke, v.run_id, contract.ONNX_ARTIFACT_DIR)
        inputs = Model.load(str(folder)).signature.inputs.to_dict()
        assert list(inputs[0]["tensor-spec"]["shape"]) == [1, 3, 32, 32]
        run = client.get_run(v.run_id)
        edge_tags = {k for k in run.data.tags if k.startswith("edge.local-cpu.")}
        assert edge_tags == {f"edge.local-cpu.{k}" for k in ("backend", "power_source", "power_note")}
        assert run.data.tags["edge.local-cpu.power_source"] == "unavailable"  # no sensor on this CPU
        measurement = json.loads(
            fetch(smoke, v.run_id, contract.measurement_artifact("local-cpu")).read_text()
        )
        assert measurement["agent_id"] and measurement["result_id"]
