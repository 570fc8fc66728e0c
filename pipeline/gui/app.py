"""The Gradio page of `jora gui`: the settings form, Demo / Launch / Stop, live progress, the outputs
and a box to ask the trained model.

Nothing leaves the machine: analytics are off before gradio is imported, the page is never shared,
the theme uses the fonts Gradio ships (no font CDN), and the server binds 127.0.0.1 unless told
otherwise. The page's process never imports JAX: runs, generation and the device count happen in
child processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jora_model.errors import JoraError
from pipeline.gui import checks, progress
from pipeline.gui.progress import plain
from pipeline.hosts import LOOPBACK, allowed_hosts
from pipeline.gui.form import FormField, form_fields, from_form, grouped, to_form
from pipeline.gui.runs import OFFLINE, DeploymentRun, LocalRun, Run, check_deployment, prefect_server
from stages.children import popen_tied

STATE_MARKS = {"ran": "ran", "skipped": "skipped (up to date)", "running": "**running**", "failed": "**failed**",
               "stopped": "**stopped** (resumes)", "waiting": "waiting", "off": "off (by the settings)",
               "kept": "kept as published (the gate held the new adapter back)"}
CSS = """
#run-status { font-size: 1.1em; }
.jora-error, .jora-error * { color: #b91c1c !important; font-weight: 600; }
"""


class Controller:
    """The page's one run at a time (a local GUI has one user); every session sees the same run."""

    def __init__(self, base: Path):
        self.base = base  # where relative paths in the form start, and where Demo builds its files
        # In the page's order (group by group): the order of the widgets' values in every event.
        self.groups = grouped(form_fields())
        self.fields: list[FormField] = [field for _, members in self.groups for field in members]
        self.run: Run | None = None
        self.clock = progress.StepClock()
        self._lock = threading.Lock()

    # -- the form ------------------------------------------------------------------------------
    def demo_values(self) -> list[Any]:
        from pipeline.demo import prepare_demo

        return to_form(prepare_demo(self.base / "jora-demo"), self.fields)

    def problems(self, values: list[Any], deployment: str) -> dict[str, str]:
        """Every problem with the form, by field name ("deployment" for the run-with box)."""
        settings, errors = from_form(self.fields, values, self.base)
        if settings is not None:
            errors.update(checks.check_settings(settings))
        if deployment.strip():
            problem = check_deployment(deployment.strip())
            if problem:
                errors["deployment"] = problem
        return errors

    def launch(self, values: list[Any], deployment: str) -> str:
        with self._lock:
            if self.run is not None and self.run.active:
                raise JoraError("a run is in progress; stop it or wait for it to finish")
            settings, errors = from_form(self.fields, values, self.base)
            if settings is None:  # the validator ran first; this is a second line of defence
                raise JoraError("; ".join(f"{k}: {v}" for k, v in errors.items()))
            self.clock = progress.StepClock()
            self.run = DeploymentRun(settings, deployment.strip()) if deployment.strip() else LocalRun(settings)
        return f"**Launched** ({self.run.where})"

    def stop(self) -> str:
        if self.run is None or not self.run.active:
            return "Nothing is running."
        self.run.stop()
        return "**Stopping**: training stops after the step in flight and keeps a checkpoint."

    # -- progress ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        run = self.run
        if run is None:
            return {"status": "Idle: fill the form (or press **Demo**) and press **Launch**."}
        view = run.view()
        gate, kept_back = progress.gate_summary(run.work) if view.status == "succeeded" else ("", False)
        states = progress.stage_states(view.finished, view.status, run.settings, kept_back)
        rows = [f"| {stage} | {STATE_MARKS[state]} | `{progress.OUTPUTS[stage]}/` |"
                for stage, state in states.items()]
        metrics = progress.train_metrics(run.work, states["train"])
        train = [r for r in metrics if "loss" in r]
        total = progress.total_steps(run.work, run.settings)
        step_text = "Training has not started."
        if train:
            step = train[-1]["step"]
            eta = self.clock.eta(step, total) if states["train"] == "running" else 0.0
            step_text = (f"**Step {step} of {total or '?'}**, loss {train[-1]['loss']:.4f}, "
                         f"{train[-1].get('tokens_per_s', 0):.0f} tokens/s"
                         + (f", {progress.format_eta(eta)}" if states["train"] == "running" else ""))
        evals = [r for r in metrics if "eval_loss" in r]
        eval_text = (" · ".join(f"step {r['step']}: {r['eval_loss']:.4f}" for r in evals[-6:])
                     if evals else "no evaluation yet")
        minutes, seconds = divmod(int(view.seconds), 60)
        status = {"running": f"**Running** for {minutes} min {seconds:02d} s ({view.where})",
                  "succeeded": f"**Finished** in {minutes} min {seconds:02d} s",
                  "failed": f"**Failed**: {plain(view.error) if view.error else 'see the log'}",
                  "stopped": f"**Stopped**: "
                             f"{plain(view.error) if view.error else 'the next launch resumes from the checkpoint'}"}[view.status]
        result = {"status": status, "stages": f"Work directory `{run.work}`\n\n| stage | state | output |\n|---|---|---|\n"
                  + "\n".join(rows),
                  "step": step_text, "evals": eval_text, "log": "\n".join(reversed(view.log[-200:])),
                  "metrics": metrics, "run_status": view.status, "gate": gate}
        if view.status == "succeeded":
            out = progress.outputs(run.work)
            result.update(hf_model=str(out.hf_model or ""), peft_adapter=str(out.peft_adapter or ""),
                          adapter=str(out.adapter or ""),
                          eval_loss=f"{out.eval_loss:.4f}" if out.eval_loss is not None else "no held-out data",
                          again=f"The same run from a terminal: `jora run --config {run.work / 'gui-settings.yaml'}`")
        return result

    # -- asking the trained model ----------------------------------------------------------------
    def ask(self, workdir: str, prompt: str, context: str, max_new_tokens: float) -> str:
        """`jora generate` on the work directory's base model and adapter, in a child process."""
        if not prompt.strip():
            return "Type an instruction first."
        work = (self.base / workdir.strip()).resolve() if workdir.strip() else self.base
        out = progress.outputs(work)
        if out.store is None or out.adapter is None:
            return f"No trained adapter in {work} yet: launch a run first."
        command = [sys.executable, "-m", "pipeline.cli", "generate", "--model", str(out.store), "--adapter",
                   str(out.adapter), "--prompt", prompt, "--input", context,
                   "--max-new-tokens", str(int(max_new_tokens or 64))]
        child = popen_tied(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **OFFLINE})
        try:
            out, err = child.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return "jora generate took over 10 minutes and was stopped"
        if child.returncode != 0:
            lines = err.strip().splitlines()
            return "jora generate failed: " + (lines[-1] if lines else f"exit status {child.returncode}")
        return out.strip()


def _widget(gr, field: FormField, label: str):
    common = {"label": label, "info": field.help or None, "elem_id": "field-" + field.name.replace(".", "-")}
    if field.kind == "bool":
        return gr.Checkbox(value=field.default, **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=field.default, **common)
    if field.kind == "multi":
        return gr.CheckboxGroup(choices=list(field.choices), value=field.default, **common)
    if field.kind in ("int", "float"):
        return gr.Number(value=field.default, precision=0 if field.kind == "int" else None, **common)
    placeholder = "optional" if field.optional else None
    return gr.Textbox(value=field.default, placeholder=placeholder, max_lines=1, **common)


def _error_box(gr, name: str):
    return gr.Markdown(visible=False, elem_id="error-" + name.replace(".", "-"), elem_classes=["jora-error"])


TRAIN_COLOUR, EVAL_COLOUR = "#1f77b4", "#ff7f0e"


def _loss_figure(metrics: list[dict[str, Any]]):
    """The loss curves as a matplotlib figure (drawn on the server: Gradio 6's interactive plot keeps the
    series of its first table, so an eval curve that starts at step 10 would never get a colour), or None
    before the first step."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if not train:
        return None
    figure = Figure(figsize=(7, 3), dpi=100, layout="tight")
    axes = figure.add_subplot()
    axes.plot(*zip(*train), color=TRAIN_COLOUR, label="train loss")
    if evals:
        axes.plot(*zip(*evals), color=EVAL_COLOUR, marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def build_app(base: Path):
    """The page, not yet served."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio as gr

    import jax

    # The page's process plans memory from shapes only (jora_model.training.memory_plan traces abstractly, which
    # still starts a JAX backend): on the CPU, so it never takes accelerator memory a run needs.
    jax.config.update("jax_platforms", "cpu")
    controller = Controller(base)
    # Ask a child process for the devices now, in the background, so the first Launch does not wait.
    threading.Thread(target=lambda: _quietly(checks.this_machine), daemon=True).start()
    with gr.Blocks(title="jora: LoRA fine-tuning") as page:
        gr.Markdown("# jora: LoRA fine-tuning of Llama\nConvert → tokenize → train → merge → export. "
                    "Stages whose inputs did not change are skipped. Paths are on this machine "
                    f"(relative ones start at `{base}`).")
        with gr.Row():
            buttons = SimpleNamespace(
                demo=gr.Button("Demo", elem_id="demo-button", variant="secondary"),
                launch=gr.Button("Launch", elem_id="launch-button", variant="primary"),
                stop=gr.Button("Stop", elem_id="stop-button", variant="stop"))
        buttons.note = gr.Markdown(elem_id="launch-note")  # what the last Launch or Stop press did
        status = gr.Markdown("Idle: fill the form (or press **Demo**) and press **Launch**.", elem_id="run-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                form = _form_column(gr, controller)
            with gr.Column(scale=6):
                shown = _progress_column(gr, status)
        _wire_events(gr, controller, buttons, form, shown)
    return page


def _form_column(gr, controller: Controller) -> SimpleNamespace:
    """One widget per setting, group by group, each with a hidden error line under it; and the box
    naming a Prefect deployment to run through."""
    form = SimpleNamespace(inputs=[], errors=[])
    for title, members in controller.groups:
        with gr.Accordion(title, open=title not in ("Export",)):
            for field in members:
                label = field.name.split(".", 1)[-1] if "." in field.name else field.name
                form.inputs.append(_widget(gr, field, label))
                form.errors.append(_error_box(gr, field.name))
            if title == "Work directory":
                form.deployment = gr.Textbox(
                    label="Prefect deployment", max_lines=1, elem_id="field-deployment",
                    placeholder="finetune/NAME" if prefect_server() else "no Prefect server configured",
                    interactive=bool(prefect_server()),
                    info="empty: run here; FLOW/NAME: run through that deployment on "
                         f"{prefect_server() or 'the server in PREFECT_API_URL'}")
                form.deployment_error = _error_box(gr, "deployment")
    return form


def _progress_column(gr, status) -> SimpleNamespace:
    """The run's stages, loss curve, log, outputs, and the box to ask the trained model (with the status
    line above the columns, which the timer updates with them)."""
    shown = SimpleNamespace(status=status)
    shown.stages = gr.Markdown(elem_id="stages")
    shown.step = gr.Markdown("Training has not started.", elem_id="train-step")
    shown.plot = gr.Plot(label="Loss", elem_id="loss-plot")
    shown.evals = gr.Markdown("no evaluation yet", elem_id="eval-losses")
    shown.log = gr.Textbox(label="Log (newest first)", lines=12, max_lines=12, autoscroll=False,
                           interactive=False, elem_id="log-tail")
    with gr.Group():
        shown.eval_loss = gr.Textbox(label="Final eval loss", interactive=False, elem_id="final-eval-loss")
        shown.hf_model = gr.Textbox(label="Hugging Face model", interactive=False, elem_id="out-hf-model")
        shown.peft_adapter = gr.Textbox(label="PEFT adapter", interactive=False, elem_id="out-peft-adapter")
        shown.adapter = gr.Textbox(label="jora adapter (for jora generate --adapter)", interactive=False,
                                   elem_id="out-adapter")
    shown.gate = gr.Markdown(elem_id="gate")
    shown.again = gr.Markdown(elem_id="run-again")
    with gr.Accordion("Try a prompt on the trained model (jora generate)", open=True):
        shown.prompt = gr.Textbox(label="Instruction", lines=2, elem_id="ask-prompt")
        shown.context = gr.Textbox(label="Retrieved context (optional)", lines=2, elem_id="ask-context")
        shown.max_new = gr.Number(label="max new tokens", value=64, precision=0, minimum=1)
        shown.ask = gr.Button("Ask", elem_id="ask-button")
        shown.answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="ask-answer")
    return shown


def _wire_events(gr, controller: Controller, buttons: SimpleNamespace, form: SimpleNamespace,
                 shown: SimpleNamespace) -> None:
    seen = gr.State("")  # which metrics the plot shows (count and newest record): redraw on change only
    timer = gr.Timer(1.0)
    error_boxes = [*form.errors, form.deployment_error]
    names = [f.name for f in controller.fields] + ["deployment"]

    def on_demo():
        return [*controller.demo_values(), *(gr.update(value="", visible=False) for _ in error_boxes)]

    def on_launch(*values):
        # Checked here rather than with Gradio's validator=: its messages do not show on fields that an
        # earlier event (Demo) filled, in Gradio 6.
        try:
            problems = controller.problems(list(values[:-1]), values[-1] or "")
        except Exception as exc:  # a check that broke must not let a launch through unchecked
            problems = {"workdir": f"could not check the settings ({type(exc).__name__}: {exc})"}
        marks = [gr.update(value=f"⚠ {plain(problems[name])}", visible=True) if name in problems
                 else gr.update(value="", visible=False) for name in names]
        if problems:
            return [f"**Not launched**: fix the {len(problems)} setting(s) marked ⚠ "
                    f"({', '.join(problems)}).", *marks]
        try:
            return [controller.launch(list(values[:-1]), values[-1] or ""), *marks]
        except JoraError as exc:
            return [f"**Not launched**: {plain(exc)}", *marks]

    def on_tick(seen_key: str):
        snap = controller.snapshot()
        metrics = snap.get("metrics", [])
        key = repr((len(metrics), metrics[-1] if metrics else None))
        plot_update = _loss_figure(metrics) if key != seen_key else gr.skip()
        done = snap.get("run_status") == "succeeded"
        return (snap["status"], snap.get("stages", ""), snap.get("step", "Training has not started."),
                snap.get("evals", "no evaluation yet"), snap.get("log", ""), plot_update, key,
                snap.get("eval_loss", "") if done else "", snap.get("hf_model", "") if done else "",
                snap.get("peft_adapter", "") if done else "", snap.get("adapter", "") if done else "",
                snap.get("gate", ""), snap.get("again", ""))

    buttons.demo.click(on_demo, outputs=[*form.inputs, *error_boxes])
    buttons.launch.click(on_launch, inputs=[*form.inputs, form.deployment], outputs=[buttons.note, *error_boxes])
    buttons.stop.click(controller.stop, outputs=buttons.note)
    shown.ask.click(controller.ask, inputs=[form.inputs[0], shown.prompt, shown.context, shown.max_new],
                    outputs=shown.answer)
    timer.tick(on_tick, inputs=seen, outputs=[shown.status, shown.stages, shown.step, shown.evals, shown.log,
                                              shown.plot, seen, shown.eval_loss, shown.hf_model, shown.peft_adapter,
                                              shown.adapter, shown.gate, shown.again], show_progress="hidden",
               concurrency_limit=1)  # one at a time: a late older tick must not overwrite a newer one


def _quietly(fn, fallback=None):
    try:
        return fn()
    except Exception as exc:  # shown on the page by the caller's fallback; the log keeps the reason
        print(f"jora gui: {type(exc).__name__}: {exc}", file=sys.stderr)
        return fallback


def serve(host: str = "127.0.0.1", port: int = 7860, base: Path | None = None, extra_hosts: tuple[str, ...] = (),
          token: str | None = None) -> None:
    """Serve the page until interrupted (never shared: no tunnel, no public link). Beyond loopback the
    page asks for `token` (user "jora"): anyone on the network could otherwise launch runs."""
    import gradio as gr
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    page = build_app((base or Path.cwd()).resolve())
    guard = Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host, extra_hosts))
    page.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=False,
        footer_links=[], theme=gr.themes.Default(), css=CSS, app_kwargs={"middleware": [guard]},
        auth=None if host in LOOPBACK else ("jora", token))
