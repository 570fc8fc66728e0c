"""The `jora` command: one click group over the stage commands.

Bad input (a `JoraError`) prints one line and exits with status 2; `--debug` shows the traceback.
SIGTERM prints "stopped by SIGTERM; finished outputs are intact" and exits with status 143, unless it
lands in training, which stops after the step and ends as bad input does (pipeline/launch.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import click

from jora_model.data.templates import NAMES as TEMPLATES
from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.training.bench import BenchSettings
from pipeline.launch import Stopped, stop_on_sigterm
from stages.convert import convert_command
from stages.evaluate import evaluate_command
from stages.options import option_for, settings_options
from stages.tokenize import tokenize_command
from stages.export import export_adapter_command, export_command
from stages.merge import ALLOW_OTHER_BASE, merge_command
from stages.train import train_command
from pipeline.plan import plan_command


class JoraGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except JoraError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted; finished outputs are intact", err=True)
            ctx.exit(130)
        except Stopped as exc:  # SIGTERM (pipeline/launch.py)
            if ctx.params.get("debug"):
                raise
            click.echo(f"{exc}; finished outputs are intact", err=True)
            ctx.exit(exc.exit_status)


def _log_to_stderr(level: int) -> None:
    """Stage progress ("skipped", "wrote ...") goes to stderr, one plain line each. `level` is the
    console's: the logger stays at INFO, so that a flow's log (Prefect's API handler) keeps every line
    under -q too."""
    logger = logging.getLogger("jora")
    for handler in [h for h in logger.handlers if getattr(h, "_jora_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    handler._jora_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@click.group(cls=JoraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks for bad input too.")
@click.option("--quiet", "-q", is_flag=True, help="only warnings and errors.")
def cli(debug: bool, quiet: bool) -> None:
    """jora: LoRA fine-tuning of Llama models in JAX, as a pipeline of cached stages."""
    _log_to_stderr(logging.WARNING if quiet else logging.INFO)
    if quiet:  # Prefect's console handlers too (read when Prefect is first imported); its API gets all
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # JAX logs a warning for every accelerator plugin it probes and does not find; not news to a user.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


cli.add_command(convert_command)
cli.add_command(tokenize_command)
cli.add_command(train_command)
cli.add_command(merge_command)
cli.add_command(export_command)
cli.add_command(export_adapter_command)
cli.add_command(evaluate_command)
cli.add_command(plan_command)


def _overrides(values: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JoraError(f"--set wants KEY=VALUE (e.g. train.lr=2e-4), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


@cli.command("run")
@click.option("--demo", is_flag=True, help="the bundled sample data and a tiny random Llama (no downloads).")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="a settings YAML (see pipeline/finetune.example.yaml).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="where every stage writes its output [demo: the current directory; config: its workdir].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a setting, e.g. train.lr=2e-4.")
@click.option("--family", type=click.Choice(["llama2", "llama3"]), default=None,
              help="with --demo: the tiny model's family (llama3: tiktoken tokenizer, scaled rotary) [llama2].")
def run_command(demo: bool, config: Path | None, workdir: Path | None, overrides: tuple[str, ...],
                family: str | None) -> None:
    """Run the finetune flow: convert, tokenize, train, merge, export; up-to-date stages are skipped."""
    if demo == (config is not None):
        raise JoraError("give exactly one of --demo or --config FILE")
    if family is not None and not demo:
        raise JoraError("--family chooses the demo's model; with --config the checkpoint decides")
    # Everything that can be checked is checked, and the work directory locked, before Prefect's
    # temporary server starts (it takes 10-30 s): a bad setting or a busy directory fails at once.
    from pipeline.flow import RunLock, finetune, preflight, reserved_work_directory

    if demo:
        from pipeline.demo import answer_line, run_demo

        work = (workdir or Path(".")).resolve()
        with RunLock.reserved(work), _prefect_for_this_run():
            result = run_demo(work, family or "llama2", _overrides(overrides))
        _echo_stages(result.stages)
        click.echo(f"Hugging Face model: {result.hf_model}")
        click.echo(f"LoRA adapter:       {result.adapter}")
        click.echo(f"PEFT adapter:       {result.peft_adapter}")
        click.echo(f"Q: {result.question}\n{answer_line(result.answer)}")
        click.echo(result.scores.line())
        _echo_gate(result.gate)
        return
    from pipeline.settings import load_settings

    settings = load_settings(config, _overrides(overrides))
    if workdir is not None:
        settings = settings.model_copy(update={"workdir": str(workdir.resolve())})
    preflight(settings)
    with reserved_work_directory(settings), _prefect_for_this_run():
        result = finetune(settings)
    _echo_stages(result["stages"])
    _echo_gate(result["gate"])


def _echo_stages(stages: dict) -> None:
    """The run's summary on stdout: each stage once, then how training ended (its manifest's facts, so a
    skipped train stage reports the losses of the run that made the adapter)."""
    for name, stage in stages.items():
        click.echo(f"{name:18s} {'skipped (up to date)' if stage['skipped'] else 'ran':22s} {stage['path']}")
    train = stages.get("train", {})
    if train.get("final_loss") is not None:
        eval_loss = train.get("eval_loss")
        click.echo(f"Training: {train.get('steps')} steps, final loss {train['final_loss']:.4f}, "
                   + (f"eval loss {eval_loss:.4f}" if eval_loss is not None else "no eval loss"))


def _echo_gate(gate: dict | None) -> None:
    """The gate's decision, last: on a scheduled retrain, the line a team reads in the morning."""
    if gate is None:
        return
    decision = gate["decision"]
    kept = "" if decision["promote"] else "; merged/, hf-model/ and peft-adapter/ are as they were"
    click.echo(f"Gate: {decision['reason']}{kept}")


@contextlib.contextmanager
def _prefect_for_this_run():
    """Prefect's temporary server started now, tied to this process (it dies with it, pipeline/deploy.py),
    and Prefect's console quiet about a JoraError, which JoraGroup prints as the one line."""
    from pipeline.deploy import start_temporary_server
    from pipeline.flow import errors_reported_by_caller

    start_temporary_server()
    with errors_reported_by_caller():
        yield


@cli.command("deploy")
@click.option("--name", required=True, help="deployment name: run it with prefect deployment run 'finetune/NAME'.")
@click.option("--cron", default=None, help='schedule, e.g. "0 3 * * *" (03:00 every day).')
@click.option("--config", "config", type=click.Path(path_type=Path), default=None, help="a settings YAML.")
@click.option("--demo", is_flag=True, help="deploy the bundled demo.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="override the work directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a setting.")
def deploy_command(name: str, cron: str | None, config: Path | None, demo: bool, workdir: Path | None,
                   overrides: tuple[str, ...]) -> None:
    """Serve the finetune flow as a deployment (with a cron schedule) until interrupted."""
    from pipeline.deploy import serve

    if demo == (config is not None):
        raise JoraError("give exactly one of --demo or --config FILE")
    if demo:
        from pipeline.demo import prepare_demo

        settings = prepare_demo(workdir or Path("."))
    else:
        from pipeline.settings import load_settings

        settings = load_settings(config, _overrides(overrides))
        if workdir is not None:
            settings = settings.model_copy(update={"workdir": str(workdir.resolve())})
    serve(name, cron, settings)


@cli.command("server")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=4200, show_default=True)
@click.option("--ui/--no-ui", default=True, show_default=True)
def server_command(host: str, port: int, ui: bool) -> None:
    """Start a local Prefect server (telemetry off); point clients at it with
    PREFECT_API_URL=http://HOST:PORT/api."""
    from pipeline.deploy import start_server
    from pipeline.hosts import port_free

    port_free(host, port)
    sys.exit(start_server(host, port, ui))


@cli.command("gui")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              help="where relative paths in the form start and Demo builds its files [default: here].")
@click.option("--allow-host", "extra_hosts", multiple=True, metavar="NAME",
              help="another host name the page may be reached by (beyond loopback, the machine's own are allowed).")
def gui_command(host: str, port: int, workdir: Path, extra_hosts: tuple[str, ...]) -> None:
    """A local web page to configure, launch and watch a fine-tune (pip install 'jora[gui]').

    Bound beyond loopback (--host 0.0.0.0), the page asks for user "jora" and an access token:
    $JORA_GUI_TOKEN, or one made up and printed here."""
    try:
        import gradio  # noqa: F401  (the page imports it when it starts serving; missing, say so now)

        from pipeline.gui.app import LOOPBACK, serve
    except ModuleNotFoundError as exc:
        raise JoraError(f"the GUI needs {exc.name}: pip install 'jora[gui]'") from None
    from pipeline.hosts import port_free

    port_free(host, port)
    token = None
    if host not in LOOPBACK:
        import secrets

        token = os.environ.get("JORA_GUI_TOKEN") or secrets.token_urlsafe(18)
        if "JORA_GUI_TOKEN" not in os.environ:
            click.echo(f"jora gui: log in as user jora with the access token {token}")
    serve(host, port, workdir, extra_hosts, token)


@cli.command("generate")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="parameter store.")
@click.option("--adapter", type=click.Path(path_type=Path), default=None, help="a trained adapter.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
@click.option("--prompt", default=None, help="an instruction, answered with the training template.")
@click.option("--input", "context", default="", help="retrieved context for --prompt.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Alpaca JSON / JSON Lines of requests.")
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="records of --data to answer.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenized", type=click.Path(path_type=Path), default=None,
              help="the tokenize output the adapter was trained on: prompt with its template and system prompt.")
@click.option("--template", type=click.Choice(TEMPLATES), default=None,
              help="prompt template [default: the one --tokenized recorded, else alpaca].")
@click.option("--system", default=None, help="system prompt [default: the one --tokenized recorded, else none].")
def generate_command(model, adapter, allow_other_base, prompt, context, data, limit, max_new_tokens, temperature,
                     top_p, seed, tokenized, template, system) -> None:
    """Generate answers from --model (with --adapter) for --prompt or the records of --data."""
    from jora_model import JoraError, load_model
    from jora_model.data.alpaca import check_record, read_records
    from jora_model.data.templates import load_template, shards_template
    from jora_model.model.generate import Generator, SamplingSettings, generate_text
    from jora_model.data.tokenizer import load_tokenizer

    if (prompt is None) == (data is None):
        raise JoraError("give exactly one of --prompt or --data")
    if adapter is not None:  # same shapes, other weights would load and answer, silently wrong
        from jora_model.formats.adapter import check_base
        from stages.base import upstream_key

        check_base(adapter, model, upstream_key(model, "parameter store"), allow_other_base)
    requests = [{"instruction": prompt, "input": context}] if prompt is not None else read_records(data)[:limit]
    for i, record in enumerate(requests):
        problem = check_record({"output": "", **record}) if isinstance(record, dict) else "not an object"
        if problem:
            raise JoraError(f"record {i}: {problem}", data)
    tokenizer = load_tokenizer(model)
    template = (shards_template(tokenized, tokenizer, template, system) if tokenized is not None
                else load_template(template or "alpaca", tokenizer, system))
    loaded = load_model(model, dtype="float32", adapter=adapter)
    generator = Generator(loaded)
    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
    for record in requests:
        answer = generate_text(loaded, tokenizer, record["instruction"], record.get("input") or "", settings,
                               generator, template)
        if data is not None:
            click.echo(f"### Instruction: {record['instruction']}")
        click.echo(answer)


@cli.command("bench")
@settings_options(BenchSettings, "settings", exclude=("lora",))
@option_for(LoraSettings, "r", dest="lora_r")
@option_for(LoraSettings, "targets")
def bench_command(settings, lora_r, targets) -> None:
    """Time LoRA train steps on random weights of a preset's shape; print one JSON line."""
    import dataclasses
    import json

    from jora_model.training.bench import run_bench

    lora = LoraSettings(r=lora_r, alpha=lora_r, targets=targets)
    click.echo(json.dumps(run_bench(dataclasses.replace(settings, lora=lora))))


def main() -> None:
    stop_on_sigterm()  # here, not in the group: `python -m pipeline.cli` (the GUI's runs) gets it too
    try:
        status = cli.main(prog_name="jora", standalone_mode=False)
    except click.UsageError as exc:
        # click's own form is three lines (usage, a hint, the error); ours is the one line every bad
        # input gets, naming the command whose --help says more
        command = exc.ctx.command_path if exc.ctx else "jora"
        click.echo(f"error: {command}: {exc.format_message()} (see {command} --help)", err=True)
        status = exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        status = exc.exit_code
    except click.Abort:  # Ctrl-C at one of click's own prompts
        click.echo("interrupted; finished outputs are intact", err=True)
        status = 130
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
