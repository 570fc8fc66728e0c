"""`jora gui`: the form holds every setting with its default, bad settings are reported next to their
field and launch nothing, and the real page, driven in headless Chromium, runs the bundled demo to the
end and shows its eval loss and output paths.

The browser test needs Playwright (`pip install 'jora[gui]'`) and a system Chromium (`apt-get install
chromium`); .ci/run installs both and sets JORA_REQUIRE_BROWSER=1 so that CI fails rather than skips.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo import CONTEXT, QUESTION
from pipeline.gui import checks, progress
from pipeline.gui.form import form_fields, from_form, grouped, to_form
from pipeline.settings import FinetuneSettings
from tests.processes import free_port, stop_group

JORA = Path(sys.executable).with_name("jora")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _dotted(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_form_holds_every_setting_with_its_default():
    fields = form_fields()
    defaults = _dotted(FinetuneSettings().model_dump())
    assert [f.name for f in fields] == list(defaults)
    shown = dict(zip((f.name for f in fields), to_form(FinetuneSettings(), fields)))
    kinds = {f.name: f.kind for f in fields}
    for name, value in defaults.items():
        assert shown[name] == ("" if value is None and kinds[name] == "text" else value), name
    assert all(f.help for f in fields), [f.name for f in fields if not f.help]  # the example YAML documents each
    titles = [title for title, _ in grouped(fields)]
    assert titles == ["Work directory", "Model", "Data", "LoRA", "Training", "Mesh", "Evaluation gate", "Export"]
    placed = [f.name for _, members in grouped(fields) for f in members]
    assert sorted(placed) == sorted(defaults)  # each field in exactly one group
    assert [f.name for f in dict(grouped(fields))["Mesh"]][0] == "train.mesh"


def test_form_round_trip_and_field_errors(tmp_path):
    fields = form_fields()
    settings = FinetuneSettings.model_validate({
        "workdir": str(tmp_path / "w"), "model": {"checkpoint": str(tmp_path / "ck"), "tokenizer": None},
        "data": {"path": str(tmp_path / "d.json"), "max_seq_len": 256}, "lora": {"targets": ["q_proj", "o_proj"]},
        "train": {"max_steps": 7, "mesh": "data=1,model=2", "lr": 3e-4}})
    back, errors = from_form(fields, to_form(settings, fields), tmp_path)
    assert errors == {} and back == settings
    values = dict(zip((f.name for f in fields), to_form(settings, fields)))
    values.update({"train.lr": 0, "train.epochs": 2.5, "data.max_seq_len": None, "model.dtype": "fp16"})
    back, errors = from_form(fields, list(values.values()), tmp_path)
    assert back is None
    assert set(errors) == {"train.lr", "train.epochs", "data.max_seq_len", "model.dtype"}, errors
    values = dict(zip((f.name for f in fields), to_form(settings, fields)))
    values.update({"workdir": "rel/work", "data.path": "d.json"})  # relative paths start at the base directory
    back, _ = from_form(fields, list(values.values()), tmp_path)
    assert back.workdir == str(tmp_path / "rel" / "work") and back.data.path == str(tmp_path / "d.json")


def _hf_checkpoint(directory: Path, tokenizer_model: Path) -> Path:
    """A Hugging Face Llama directory as transformers writes it (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).save_pretrained(directory)
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


def test_checks_report_the_field_at_fault(tmp_path, tokenizer_model):
    checkpoint = _hf_checkpoint(tmp_path / "hf", tokenizer_model)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    good = FinetuneSettings.model_validate({"workdir": str(tmp_path / "work"),
                                            "model": {"checkpoint": str(checkpoint)},
                                            "data": {"path": str(data), "max_seq_len": 256}})

    def check(devices=1, memory=None, **changes):
        values = good.model_dump()
        for dotted, value in changes.items():
            section, _, key = dotted.partition("__")
            if key:
                values[section][key] = value
            else:
                values[section] = value
        return checks.check_settings(FinetuneSettings.model_validate(values), checks.Machine(devices, memory))

    assert check() == {}
    assert check(devices=2, train__mesh="model=2") == {}  # 2 divides 4 query heads, 2 kv heads, 96, 320
    assert "does not divide the model's 4 query heads" in check(devices=3, train__mesh="model=3")["train.mesh"]
    # The shape's fault is named even on a machine without that many devices.
    assert "does not divide" in check(devices=1, train__mesh="model=3")["train.mesh"]
    assert check(devices=4, train__mesh="model=4") == {}  # wider than the 2 KV heads: each is copied on 2 devices
    assert "needs 2 devices, but 1 are available" in check(devices=1, train__mesh="model=2")["train.mesh"]
    assert "multiple of the mesh's data=2" in check(devices=2, train__mesh="data=2", train__batch_size=3)[
        "train.batch_size"]
    assert "bad mesh" in check(train__mesh="rows=2")["train.mesh"]
    assert set(check(data__path=str(tmp_path / "missing.json"))) == {"data.path"}
    assert set(check(model__checkpoint=str(tmp_path / "nowhere"))) == {"model.checkpoint"}
    assert "neither Meta's layout" in check(model__checkpoint=str(tmp_path))["model.checkpoint"]
    assert set(check(model__tokenizer=str(tmp_path / "no.model"))) == {"model.tokenizer"}
    assert "longer than the model allows (512)" in check(data__max_seq_len=1024)["data.max_seq_len"]
    (tmp_path / "file").write_text("")
    assert "not a directory" in check(workdir=str(tmp_path / "file"))["workdir"]
    assert "does not exist" in check(workdir=str(tmp_path / "no" / "work"))["workdir"]


def test_memory_check_follows_the_plan(tmp_path, tokenizer_model):
    """Launch is refused exactly when jora_model.training.memory_plan says the step does not fit a device."""
    from jora_model.model.config import read_hf_config
    from jora_model.model.lora import LoraSettings
    from jora_model.training.memory_plan import plan_memory
    from jora_model.parallel.sharding import MeshShape

    checkpoint = _hf_checkpoint(tmp_path / "hf", tokenizer_model)
    data = tmp_path / "data.json"
    data.write_text("[]")
    settings = FinetuneSettings.model_validate({"workdir": str(tmp_path / "work"),
                                                "model": {"checkpoint": str(checkpoint)},
                                                "data": {"path": str(data), "max_seq_len": 256},
                                                "train": {"batch_size": 2, "grad_accum": 3, "mesh": "data=2"}})
    need = plan_memory(read_hf_config(checkpoint / "config.json")[0], seq_len=256, batch_size=2,
                       mesh=MeshShape(2, 1), lora=LoraSettings(dropout=0.05), grad_accum=3).total_bytes_per_device
    assert checks.check_settings(settings, checks.Machine(2, need)) == {}
    short = checks.check_settings(settings, checks.Machine(2, need - 1))
    assert set(short) == {"train.mesh"} and "does not fit" in short["train.mesh"]


def test_stage_events_and_states():
    assert progress.stage_event("convert: skipped, /w/store is up to date (key 0123456789ab)") == ("convert", "skipped")
    assert progress.stage_event("12:00:01.5 | INFO | Task run 'export-adapter-0' - export-adapter: ran, wrote /w/p") == (
        "export-adapter", "ran")
    assert progress.stage_event("export: wrote /w/hf-model in 3.1 s") == ("export", "ran")
    # the PEFT adapter's base, exported by the export-adapter step, is not the merged model's export
    assert progress.stage_event("export: wrote /w/hf-base in 2.0 s") is None
    assert progress.stage_event("train: resuming from step 20 (/w/.train.work-ab/checkpoints)") is None
    demo = FinetuneSettings()
    states = progress.stage_states({"convert": "skipped", "tokenize": "ran"}, "running", demo)
    assert states == {"convert": "skipped", "tokenize": "ran", "train": "running", "evaluate": "waiting",
                      "merge": "waiting", "export": "waiting", "export-adapter": "waiting"}
    assert progress.stage_event("evaluate: wrote /w/evaluate in 2.0 s") == ("evaluate", "ran")
    assert progress.stage_event("evaluate: skipped, /w/evaluate-published is up to date") is None  # the gate's
    kept = progress.stage_states({s: "ran" for s in ("convert", "tokenize", "train", "evaluate")}, "succeeded",
                                 demo, kept_back=True)
    assert [kept[s] for s in ("merge", "export", "export-adapter")] == ["kept"] * 3
    ungated = demo.model_copy(update={"eval": demo.eval.model_copy(update={"gate": False})})
    assert progress.stage_states({}, "running", ungated)["evaluate"] == "off"
    failed = progress.stage_states({"convert": "ran"}, "failed", demo.model_copy(update={
        "export": demo.export.model_copy(update={"peft_adapter": False})}))
    assert failed["tokenize"] == "failed" and failed["train"] == "waiting" and failed["export-adapter"] == "off"
    assert progress.stage_states({"convert": "ran"}, "stopped", demo)["tokenize"] == "stopped"
    assert set(progress.stage_states({}, "succeeded", demo).values()) == {"waiting"}
    clock = progress.StepClock()
    assert clock.eta(1, 11, now=100.0) is None  # the first step seen starts the clock (compilation)
    assert clock.eta(3, 11, now=104.0) == pytest.approx(16.0)  # 2 s a step, 8 steps left


def test_gate_summary_reads_the_newest_run_of_the_lineage(tmp_path):
    assert progress.gate_summary(tmp_path) == ("", False)  # no lineage yet
    report = {"exact_match": 0.25, "token_f1": 0.5, "loss": 1.5, "no_context": {"exact_match": 0.05}}
    gate = {"decision": {"promote": False, "against": "published model", "reason": "new adapter kept back: [x](y)"},
            "reports": {"new": report, "published": {**report, "exact_match": 0.75, "no_context": None}}}
    lineage = {"format": "jora-lineage", "runs": [{"gate": None}, {"gate": gate}]}
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    text, kept_back = progress.gate_summary(tmp_path)
    assert kept_back and r"new adapter kept back\: \[x\]\(y\)" in text  # quoted text stays text
    assert "| new adapter | 0.250 | 0.500 | 1.500 | 0.050 |" in text
    assert "| published model | 0.750 | 0.500 | 1.500 | - |" in text


def test_launch_through_a_prefect_deployment(tmp_path, monkeypatch):
    """With PREFECT_API_URL set, Launch can run a served deployment (`jora deploy`) with the form's settings;
    its stages are followed through the server's logs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.demo import SAMPLE, TINY_MODEL
    from pipeline.gui.runs import DeploymentRun, check_deployment
    from pipeline.demo_source import make_demo_source

    source = make_demo_source(SAMPLE, TINY_MODEL, tmp_path / "demo-source").out_dir
    served_settings = tmp_path / "served.yaml"  # what the deployment was served with: the run must not use it
    served_settings.write_text(json.dumps({"workdir": str(tmp_path / "elsewhere"), "model": {"checkpoint": "/nowhere"},
                                           "data": {"path": "/nowhere.json"}}))
    settings = FinetuneSettings.model_validate({
        "workdir": str(tmp_path / "work"), "model": {"checkpoint": str(source)},
        "data": {"path": str(SAMPLE), "max_seq_len": 512, "val_fraction": 0.1}, "lora": {"r": 4, "alpha": 8},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 2, "eval_every": 0},
        "export": {"verify": False, "peft_adapter": False}})
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([JORA, "server", "--port", str(port), "--no-ui"], env=env, start_new_session=True,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    served = None
    monkeypatch.setenv("PREFECT_API_URL", api)
    try:
        _wait_up(f"{api}/health", server, tmp_path / "server.log")
        served = subprocess.Popen([JORA, "deploy", "--name", "gui", "--config", served_settings], env=env,
                                  start_new_session=True, stdout=open(tmp_path / "serve.log", "w"),
                                  stderr=subprocess.STDOUT)
        with temporary_settings({PREFECT_API_URL: api}):
            deadline = time.monotonic() + 120
            while check_deployment("finetune/gui") is not None:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, check_deployment("finetune/gui")
                time.sleep(1)
            assert "no deployment 'finetune/other'" in check_deployment("finetune/other")
            run = DeploymentRun(settings, "finetune/gui")
            deadline = time.monotonic() + 400
            while run.active and time.monotonic() < deadline:
                time.sleep(1)
            view = run.view()
    finally:
        if served is not None:
            stop_group(served)
        stop_group(server)
    assert view.status == "succeeded", "\n".join(view.log[-30:]) + (tmp_path / "serve.log").read_text()[-3000:]
    assert view.finished == {stage: "ran" for stage in ("convert", "tokenize", "train", "evaluate", "merge", "export")}
    out = progress.outputs(tmp_path / "work")
    assert (out.hf_model / "config.json").is_file() and out.peft_adapter is None and out.steps == 2
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------------------------
# The real page in a real browser


def _browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "jora gui exited:\n" + log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("jora gui did not start:\n" + log.read_text()[-3000:])


def _wait_text(page, selector: str, pattern: str, timeout: float) -> str:
    """Wait until `selector`'s text matches `pattern`; on timeout, fail with what the page says about the
    run (a loaded machine can make the run slow: the timeouts are generous, the message tells why)."""
    deadline = time.monotonic() + timeout
    while True:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        failed = "Failed" in page.locator("#run-status").inner_text()
        if failed or time.monotonic() > deadline:
            log = page.locator("#log-tail textarea").input_value()
            raise AssertionError(f"{selector} never matched {pattern!r} in {timeout:.0f} s; it says {text!r}\n"
                                 f"status: {page.locator('#run-status').inner_text()}\n"
                                 f"note: {page.locator('#launch-note').inner_text()}\nlog, newest first:\n{log[:3000]}")
        page.wait_for_timeout(500)


def _field(page, name: str):
    return page.locator(f"#field-{name.replace('.', '-')}").locator("input, textarea").first


def require_chromium(what: str) -> str:
    """The system Chromium for a browser test, else that test skips, or fails where JORA_REQUIRE_BROWSER
    is set (.ci/run sets it: CI never passes a browser test it did not run)."""
    chromium = _browser()
    if chromium is None:
        message = (f"{what} needs Playwright and a system Chromium: "
                   "pip install -e '.[test,gui]' and apt-get install chromium (.ci/run does both)")
        if os.environ.get("JORA_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium


def test_gui_runs_the_demo_in_a_browser(tmp_path):
    chromium = require_chromium("the GUI browser test")
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "gui.log"
    with open(log, "w") as log_file:
        gui = subprocess.Popen([JORA, "gui", "--port", str(port), "--workdir", tmp_path], stdout=log_file,
                               stderr=subprocess.STDOUT, env=env)
    try:
        _wait_up(url, gui, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url)
            work = tmp_path / "jora-demo"

            page.click("#demo-button")
            expect(_field(page, "workdir")).to_have_value(str(work), timeout=60_000)
            expect(_field(page, "model.checkpoint")).to_have_value(str(work / "demo-source"))

            # Bad settings: an error next to each field at fault, and nothing launched.
            _field(page, "data.path").fill(str(tmp_path / "no-such-data.json"))
            _field(page, "train.mesh").fill("model=3")
            page.click("#launch-button")
            expect(page.locator("#error-data-path")).to_contain_text("file not found", timeout=60_000)
            expect(page.locator("#error-train-mesh")).to_contain_text("does not divide the model's 4 query heads")
            expect(page.locator("#launch-note")).to_contain_text("Not launched")
            expect(page.locator("#run-status")).to_contain_text("Idle")
            # Only the two fields at fault are marked, each directly under its own input.
            assert page.locator("[id^='error-']:visible").count() == 2
            for name in ("data-path", "train-mesh"):
                field, error = (page.locator(f"#{kind}-{name}").bounding_box() for kind in ("field", "error"))
                assert 0 <= error["y"] - (field["y"] + field["height"]) < 40 and abs(error["x"] - field["x"]) < 40
            assert not (work / "gui-settings.yaml").exists() and not (work / "store").exists()
            page.screenshot(path=tmp_path / "gui-errors.png", full_page=True)

            # The demo as Demo fills it: launch, watch a few steps, stop.
            page.click("#demo-button")
            expect(_field(page, "train.mesh")).to_have_value("", timeout=60_000)
            expect(_field(page, "data.path")).not_to_have_value(str(tmp_path / "no-such-data.json"))
            expect(page.locator("#error-train-mesh")).to_be_hidden()
            page.click("#launch-button")
            _wait_text(page, "#run-status", "Running", 60)
            _wait_text(page, "#train-step", r"Step ([3-9]|\d\d+) of \d+", 400)
            page.click("#stop-button")
            _wait_text(page, "#run-status", "Stopped", 120)
            expect(page.locator("#stages")).to_contain_text("stopped")
            stopped_at = int(re.search(r"at step (\d+)", page.locator("#run-status").inner_text()).group(1))
            checkpoints = list(work.glob(".train.work-*/checkpoints/*"))
            assert checkpoints and not (work / "train").exists()

            # Launch again: convert and tokenize are up to date, training resumes from the checkpoint.
            page.click("#launch-button")
            _wait_text(page, "#run-status", "Running", 60)
            steps_seen: set[str] = set()
            curves_seen: set[str] = set()  # the loss plot's image, as it is redrawn
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                text = page.locator("#run-status").inner_text()
                if "Finished" in text or "Failed" in text:
                    break
                step = page.locator("#train-step").inner_text()
                if step.startswith("Step"):
                    steps_seen.add(step.split(",")[0])
                if page.locator("#loss-plot img").count():
                    curves_seen.add(page.locator("#loss-plot img").first.get_attribute("src"))
                page.wait_for_timeout(1000)
            status = page.locator("#run-status").inner_text()
            assert "Finished" in status, status + "\n" + page.locator("#log-tail textarea").input_value()[-3000:]
            expect(page.locator("#final-eval-loss textarea, #final-eval-loss input").first).not_to_have_value(
                "", timeout=10_000)

            # Both curves are drawn: pixels of the train and the eval colour in the plot as the browser shows it.
            expect(page.locator("#loss-plot img")).to_have_count(1)
            plot_png = page.locator("#loss-plot img").screenshot()
            eval_text = page.locator("#final-eval-loss").locator("input, textarea").first.input_value()
            hf_model = page.locator("#out-hf-model").locator("input, textarea").first.input_value()
            peft = page.locator("#out-peft-adapter").locator("input, textarea").first.input_value()
            stages_text = page.locator("#stages").inner_text()
            log_text = page.locator("#log-tail textarea").input_value()
            gate_text = page.locator("#gate").inner_text()

            # An instruction to the trained model, answered through jora generate.
            page.locator("#ask-prompt textarea").fill(QUESTION)
            page.locator("#ask-context textarea").fill(CONTEXT)
            page.click("#ask-button")
            expect(page.locator("#ask-answer textarea")).not_to_have_value("", timeout=180_000)
            answer = page.locator("#ask-answer textarea").input_value()
            page.screenshot(path=tmp_path / "gui.png", full_page=True)
            browser.close()
    finally:
        _stop(gui)

    # What the page showed is what the run wrote.
    facts = json.loads((work / "train" / "jora-manifest.json").read_text())["facts"]
    metrics = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert float(eval_text) == pytest.approx(facts["eval_loss"], abs=5e-5)
    assert facts["eval_loss"] == metrics[-1]["eval_loss"]
    assert Path(hf_model) == work / "hf-model" and (Path(hf_model) / "config.json").is_file()
    assert Path(peft) == work / "peft-adapter" and (Path(peft) / "adapter_config.json").is_file()
    for stage in progress.STAGES:
        state = "skipped" if stage in ("convert", "tokenize") else "ran"
        assert re.search(rf"^{stage}\s+{state}\s", stages_text, re.M), stages_text
    assert f"train: resuming from step {stopped_at}" in log_text
    # the gate's comparison, as lineage.json records it
    gate = json.loads((work / "lineage.json").read_text())["runs"][-1]["gate"]
    assert gate["decision"]["promote"] and gate["decision"]["against"] == "base model"
    assert "new adapter published" in gate_text and "base model" in gate_text, gate_text
    assert f"{gate['reports']['new']['exact_match']:.3f}" in gate_text, gate_text
    assert facts["resumed_from"] == stopped_at
    # Training was watched while it ran: several different steps appeared, and the count was right.
    settings = FinetuneSettings.model_validate(json.loads(json.dumps(
        __import__("yaml").safe_load((work / "gui-settings.yaml").read_text()))))
    total = progress.total_steps(work, settings)
    assert total == metrics[-1]["step"] == facts["steps"]
    assert len(steps_seen) >= 2 and all(s.endswith(f"of {total}") for s in steps_seen), steps_seen
    assert len(curves_seen) >= 2  # the loss curve was redrawn while training went on
    from PIL import Image

    from pipeline.gui.app import EVAL_COLOUR, TRAIN_COLOUR

    pixels = np.asarray(Image.open(io.BytesIO(plot_png)).convert("RGB"), dtype=np.int32)
    for colour in (TRAIN_COLOUR, EVAL_COLOUR):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=-1) < 60).sum() > 100, colour
    assert answer and not answer.startswith(("jora generate failed", "No trained")), answer
    # Nothing left the machine: every request the page made went to the local server.
    outside = [u for u in requests if not u.startswith((url, "data:", "blob:"))]
    assert not outside, outside[:5]


def _status(port: int, host_header: str, path: str = "/") -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host_header})
        return connection.getresponse().status
    finally:
        connection.close()


def _serve(tmp_path, *args: str, env_extra: dict | None = None):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "GRADIO_ANALYTICS_ENABLED": "False",
           **(env_extra or {})}
    log = tmp_path / "gui.log"
    with open(log, "w") as log_file:
        gui = subprocess.Popen([JORA, "gui", "--port", str(port), "--workdir", tmp_path, *args], stdout=log_file,
                               stderr=subprocess.STDOUT, env=env)
    return port, gui, log


def _stop(gui: subprocess.Popen) -> None:
    gui.send_signal(signal.SIGINT)
    try:
        gui.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gui.kill()
        gui.wait()


def test_gui_answers_only_its_own_host_names(tmp_path):
    """A page on another site that reaches the GUI through DNS rebinding sends its own Host name: refused,
    so it cannot press Stop or Launch; the names the GUI was started for are served."""
    port, gui, log = _serve(tmp_path, "--allow-host", "trainer.lan")
    try:
        _wait_up(f"http://127.0.0.1:{port}/", gui, log)
        for name in ("127.0.0.1", "localhost", "trainer.lan"):
            assert _status(port, f"{name}:{port}") == 200, name
        for name in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example"):
            assert _status(port, f"{name}:{port}") == 400, name
            assert _status(port, f"{name}:{port}", "/gradio_api/info") == 400, name
    finally:
        _stop(gui)


def test_gui_beyond_loopback_asks_for_its_token(tmp_path):
    port, gui, log = _serve(tmp_path, "--host", "0.0.0.0", env_extra={"JORA_GUI_TOKEN": "s3cret-token"})
    try:
        _wait_up(f"http://127.0.0.1:{port}/", gui, log)
        assert _status(port, f"127.0.0.1:{port}", "/gradio_api/info") == 401  # the API needs the login
        data = urllib.parse.urlencode({"username": "jora", "password": "wrong"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=data, timeout=10)
        data = urllib.parse.urlencode({"username": "jora", "password": "s3cret-token"}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=data, timeout=10) as response:
            assert response.status == 200
        assert _status(port, f"evil.example:{port}") == 400
    finally:
        _stop(gui)


def test_messages_from_files_stay_text_on_the_page():
    """A settings value quoted in an error must show as the characters it is, not as a link, an image
    (which the browser would fetch from elsewhere) or HTML."""
    import html

    from markdown_it import MarkdownIt

    from pipeline.gui.app import plain

    hostile = "path ![x](http://evil.example/a.png) <img src=x onerror=alert(1)> [l](http://e) **b** `c` a_b\\n|x|"
    rendered = MarkdownIt().render(plain(hostile))
    assert "<img" not in rendered and "<a " not in rendered and "<strong>" not in rendered
    assert html.unescape(rendered.strip().removeprefix("<p>").removesuffix("</p>")) == hostile


def test_a_gui_settings_yaml_the_gui_did_not_write_is_never_replaced(tmp_path):
    from jora_model.errors import JoraError
    from pipeline.gui.runs import write_config

    settings = FinetuneSettings.model_validate({"workdir": str(tmp_path / "work")})
    mine = tmp_path / "work" / "gui-settings.yaml"
    mine.parent.mkdir()
    mine.write_text("# my own notes\ntrain: {lr: 1.0}\n")
    with pytest.raises(JoraError, match="jora gui did not write"):
        write_config(settings)
    assert mine.read_text() == "# my own notes\ntrain: {lr: 1.0}\n"
    mine.unlink()
    written = write_config(settings)  # the GUI's own file is rewritten on every launch
    assert write_config(settings) == written and written.read_text().startswith("# written by `jora gui`")
    assert FinetuneSettings.model_validate(__import__("yaml").safe_load(written.read_text())) == settings
