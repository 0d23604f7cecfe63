"""The ``advorch`` command.

    advorch serve | db upgrade                    run the service (server side)
    advorch login | logout | whoami               keep the user's token for the CLI
    advorch submit | jobs | status | cancel |     the user's commands: REST calls to the
      logs | results | tradeoff | checkpoint      service, through service.client
    advorch users ... | audit                     admins: accounts, tokens, the audit trail

One Typer app; each command is a small function. The user's commands find the service and
the token as service.client says (the environment, the file `advorch login` writes, the
server's own token file), and print an API error as one line, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from service.client import (
    AdvorchClient,
    ApiError,
    CliConfig,
    read_cli_config,
    service_url,
    write_cli_config,
)
from service.settings import get_settings
from workers.spec import ARCH_PATH

app = typer.Typer(
    help="advorch: adversarial training jobs (PGD-AT, TRADES) on Ray, over REST.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="The service's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
users_app = typer.Typer(help="Admins: users and their tokens.", no_args_is_help=True)
app.add_typer(users_app, name="users")
models_app = typer.Typer(help="Model files to evaluate (evaluate jobs).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.command()
def serve() -> None:
    """Run the API, the dispatcher, the reconciler and a local Ray head (or ADVORCH_RAY_ADDRESS's).

    It upgrades the database first. Ctrl-C or SIGTERM stops all it started.
    """
    # Imported here: the API and Ray are slow imports that other commands do not need.
    settings = get_settings()
    # Before the service's modules import prometheus_client: /metrics sums every process's.
    from service.api_workers import prepare_prometheus_dir

    prepare_prometheus_dir(settings)
    from service.db import DatabaseUnusable
    from service.serve import serve as run_service
    from service.storage import StorageMisconfigured

    try:
        run_service(settings)
    except (DatabaseUnusable, StorageMisconfigured) as err:
        _fail(str(err))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database to the newest schema (advorch serve does this on start)."""
    from service.db import DatabaseUnusable, upgrade_database

    settings = get_settings()
    try:
        upgrade_database(settings.resolved_database_url, settings.db_connect_timeout_s)
    except DatabaseUnusable as err:
        _fail(str(err))
    typer.echo(f"database at {settings.resolved_database_url} is up to date")


# --- the user's commands: they talk to the service over REST, as any client does ---

FINISHED = {"succeeded", "failed", "cancelled"}
POLL_INTERVAL_S = 2.0
console = Console()


def _client() -> AdvorchClient:
    return AdvorchClient.from_settings(get_settings())


def _fail(message: str) -> NoReturn:
    """One clear line on stderr and a non-zero exit: never a traceback."""
    # soft_wrap: one line even when stderr is no terminal (rich would wrap it at 80 columns).
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('training.')}={v}" for k, v in config.items()) or "-"


def _parse_override(text: str) -> tuple[str, Any]:
    """``training.beta=3`` -> ("training.beta", 3): the value is read as YAML, as in a spec."""
    path, eq, value = text.partition("=")
    if not eq or not path:
        raise typer.BadParameter(f"{text!r}: expected FIELD=VALUE, e.g. training.beta=3")
    return path.strip(), yaml.safe_load(value)


def _set_dotted(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise typer.BadParameter(f"--set {path}: {key} is not a section of the spec")
    node[leaf] = value


@app.command()
def submit(
    spec_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A job spec (YAML).")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set training.beta=3 (repeatable)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the job with a live progress display.")
    ] = False,
) -> None:
    """Submit a job spec; with --wait, follow it until it ends (exit 1 unless it succeeded)."""
    spec = yaml.safe_load(spec_file.read_text())
    if not isinstance(spec, dict):
        _fail(f"{spec_file}: a spec is a YAML mapping")
    for override in set_ or []:
        _set_dotted(spec, *_parse_override(override))
    with _client() as client:
        job = client.submit(spec)
        console.print(
            f"submitted job [bold]{job['id']}[/bold] ({job['name']}, {job['num_trials']} trials)"
        )
        if wait:
            _follow(client, job["id"])


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs of this status.")] = None,
    owner: Annotated[str | None, typer.Option(help="Admins: only this user's jobs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """The most recent jobs, newest first: yours (an admin's: everyone's)."""
    with _client() as client:
        page = client.list_jobs(status=status, owner=owner, limit=limit)
    table = Table("id", "name", "owner", "status", "trials", "best robust", "created")
    table.columns[0].no_wrap = True  # whole, to copy into the other commands
    for job in page["items"]:
        progress = job["progress"]
        table.add_row(
            job["id"],
            job["name"],
            job["owner"],
            job["status"],
            f"{progress['trials_done']}/{progress['trials_total']}",
            _best_robust_text(job),
            job["created_at"][5:16].replace("T", " "),
        )
    console.print(table)
    console.print(f"{len(page['items'])} of {page['total']} jobs")


@app.command()
def status(
    job_id: str,
    watch: Annotated[bool, typer.Option(help="Keep watching until the job ends.")] = False,
) -> None:
    """A job's status, progress and best trial."""
    with _client() as client:
        if watch:
            _follow(client, job_id)
            return
        console.print(_progress_view(client, job_id)[0])


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job; it is stopped on Ray."""
    with _client() as client:
        job = client.cancel(job_id)
    console.print(f"job {job['id']} is {job['status']}")


@app.command()
def logs(job_id: str) -> None:
    """The job's Ray Job log (its driver's output: the Tune progress and any error)."""
    with _client() as client:
        typer.echo(client.logs(job_id), nl=False)


def _best_robust_text(job: dict[str, Any]) -> str:
    """The best trial's robust accuracy on the job's robust axis, naming the attack: AutoAttack's
    where the job runs it, as the trade-off has it ("52.0% AutoAttack (standard)", "84.7%
    PGD-20"); "-" before a trial succeeded."""
    best, axis = job["best_trial"], job["robust_axis"]
    return "-" if best is None else f"{_pct(best[axis['metric']])} {axis['attack']}"


def _robust_title(job: dict[str, Any]) -> str:
    """Which robust accuracy the numbers are, for a heading."""
    evaluation = job["spec"]["evaluation"]
    pgd = f"PGD-{evaluation['attack_steps']}"
    attacks = f"{pgd} and AutoAttack (standard)" if evaluation["autoattack"] else pgd
    return f"robust accuracy is {attacks} at epsilon {evaluation['epsilon']:.4f} on the test split"


def _autoattack_text(autoattack: dict[str, Any] | None) -> str:
    """AutoAttack's accuracy after each attack so far (and its flag), in one cell."""
    if not autoattack:
        return "-"
    steps = [f"{name} {_pct(acc)}" for name, acc in autoattack["after_attack"].items()]
    text = " > ".join(steps) + f" ({autoattack['seconds']:.0f} s)"
    if not autoattack.get("done"):
        text += " running"
    if autoattack.get("unreliable"):
        text += " [potentially unreliable]"
    return text


@app.command()
def results(
    job_id: str,
    format: Annotated[
        str, typer.Option("--format", help="table, or robustbench (its model_info fields, JSON).")
    ] = "table",
) -> None:
    """Every trial: config, status, test accuracies (clean, PGD, AutoAttack when run) and the
    validation score it was chosen by; the best (by validation) is marked, and repeats of a
    configuration are summed up as mean ± std."""
    if format not in ("table", "robustbench"):
        _fail(f"--format: {format!r} is not one of table, robustbench")
    with _client() as client:
        job = client.job(job_id)
        trials = client.trials(job_id)
        tradeoff = client.tradeoff(job_id)
    if format == "robustbench":
        typer.echo(json.dumps(_robustbench_entries(job, trials), indent=2))
        return
    best = (job["best_trial"] or {}).get("key")
    with_autoattack = job["spec"]["evaluation"]["autoattack"]
    headers = ["trial", "config", "status", "clean", "PGD"]
    headers += ["AutoAttack", "after each attack"] if with_autoattack else []
    table = Table(*headers, "val robust", "best epoch", "")
    for trial in trials:
        row = [
            trial["key"],
            _config_text(trial["config"]),
            trial["status"],
            _pct(trial["clean_acc"]),
            _pct(trial["robust_acc"]),
        ]
        if with_autoattack:
            row += [_pct(trial["autoattack_acc"]), _autoattack_text(trial["autoattack"])]
        # The EMA of the weights (training.ema): every number of the trial is of the average.
        ema = " (EMA)" if trial.get("weights") == "ema" else ""
        row += [_pct(trial["val_robust_acc"]), f"{trial['best_epoch'] or '-'}{ema}"]
        table.add_row(*row, "★ best" if trial["key"] == best else "")
    console.print(f"{job['name']} ({job['status']}): {_robust_title(job)}")
    console.print(table)
    if best:
        console.print(f"★ chosen by {job['best_trial']['chosen_by']} at its best epoch")
    if any(trial.get("weights") == "ema" for trial in trials):
        console.print("(EMA): validation, best epoch, checkpoint and test are of the EMA weights")
    for trial in trials:
        if trial["status"] != "succeeded" and trial["reason"]:
            console.print(f"{trial['key']} {trial['status']}: {trial['reason']}", highlight=False)
    repeated = [point for point in tradeoff["points"] if len(point["trials"]) > 1]
    if repeated:
        summary = Table("config", "repeats", "clean", tradeoff["robust_axis"]["attack"])
        for point in repeated:
            summary.add_row(
                _config_text(point["config"]),
                str(len(point["trials"])),
                _mean_std(point["clean_acc"], point["clean_acc_std"]),
                _mean_std(point["robust_acc"], point["robust_acc_std"]),
            )
        console.print("Repeats (each with its own seed), mean ± std:")
        console.print(summary)


def _mean_std(mean: float, std: float | None) -> str:
    return _pct(mean) if std is None else f"{_pct(mean)} ± {100 * std:.1f}"


def _robustbench_entries(job: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each succeeded trial as RobustBench's model_info fields; venue and link are the
    user's to fill."""
    spec = job["spec"]
    return [
        {
            "trial": trial["key"],
            "config": trial["config"],
            "name": f"{job['name']} {trial['key']}",
            "authors": "",
            "venue": "",
            "link": "",
            "architecture": _architecture(job, trial),
            "dataset": spec["dataset"]["name"],
            "threat_model": "Linf",
            "eps": f"{spec['evaluation']['epsilon']:.6g}",
            "clean_acc": f"{100 * trial['clean_acc']:.2f}",
            "autoattack_acc": (
                f"{100 * trial['autoattack_acc']:.2f}"
                if trial["autoattack_acc"] is not None
                else None
            ),
            "additional_data": False,
            "number_forward_passes": 1,
            "unreliable": bool((trial["autoattack"] or {}).get("unreliable", False)),
        }
        for trial in trials
        if trial["status"] == "succeeded"
    ]


def _architecture(job: dict[str, Any], trial: dict[str, Any]) -> str:
    """The architecture a trial's numbers are of: a training job's spec names it; an evaluate
    job's spec holds only the default, and its worker reports the model it attacked in the
    trial's config ("unknown" where it did not)."""
    if job["spec"]["kind"] == "evaluate":
        return str(trial["config"].get(ARCH_PATH, "unknown"))
    return str(job["spec"]["model"]["arch"])


@app.command()
def tradeoff(
    job_id: str,
    plot: Annotated[Path | None, typer.Option(help="Write a scatter plot (PNG) here.")] = None,
) -> None:
    """Clean vs robust accuracy of every configuration (repeats as mean ± std), the Pareto
    front; the robust axis is AutoAttack's where the job ran it."""
    with _client() as client:
        result = client.tradeoff(job_id)
        job_name = client.job(job_id)["name"]
    axis = result["robust_axis"]
    table = Table("trials", "config", "clean acc", f"{axis['attack']} acc", "Pareto front")
    for point in result["points"]:
        table.add_row(
            ", ".join(point["trials"]),
            _config_text(point["config"]),
            _mean_std(point["clean_acc"], point["clean_acc_std"]),
            _mean_std(point["robust_acc"], point["robust_acc_std"]),
            "yes" if point["on_front"] else "",
        )
    console.print(f"robust axis: {axis['attack']} at epsilon {axis['epsilon']:.4f}")
    console.print(table)
    if plot is not None:
        from service.plots import plot_tradeoff

        plot_tradeoff(result, plot, title=job_name)
        console.print(f"plot written to {plot}")


@app.command()
def curve(
    job_id: str,
    plot: Annotated[Path | None, typer.Option(help="Write the curve (PNG) here.")] = None,
) -> None:
    """An evaluate job's robustness curve: clean, PGD and AutoAttack accuracy at each epsilon."""
    with _client() as client:
        curves = client.curve(job_id)
        job = client.job(job_id)
    if not curves:
        _fail(f"job {job_id} has no robustness curve (yet): only evaluate jobs have one")
    (evaluation,) = curves
    table = Table("epsilon", "clean", "PGD", "AutoAttack", "after each attack")
    for point in evaluation["points"]:
        table.add_row(
            f"{point['epsilon']:.4f}",
            _pct(point["clean_acc"]),
            _pct(point["robust_acc"]),
            _pct(point["autoattack_acc"]),
            _autoattack_text(point["autoattack"]),
        )
    console.print(f"{job['name']} ({evaluation['status']})")
    console.print(table)
    if plot is not None:
        from service.plots import plot_curve

        plot_curve(evaluation["points"], plot, title=job["name"])
        console.print(f"plot written to {plot}")


@app.command()
def checkpoint(
    job_id: str,
    trial_key: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write it.")] = Path(
        "best.pt"
    ),
) -> None:
    """Download a trial's best checkpoint (load it with workers.models.load_checkpoint); a
    broken transfer leaves no file behind."""
    with _client() as client:
        client.download_checkpoint(job_id, trial_key, output)
    console.print(f"checkpoint of {job_id}/{trial_key} written to {output}")


@models_app.command("upload")
def models_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The model file.")],
) -> None:
    """Upload a model to evaluate: an advorch checkpoint, or a torch.export program (.pt2).
    Prints its id alone on the last line, for `source: {model: ID}` in an evaluate job."""
    with _client() as client:
        model = client.upload_model(path)
    console.print(f"uploaded {model['filename']} ({model['format']}, {model['bytes']} bytes)")
    typer.echo(model["id"])


@models_app.command("list")
def models_list() -> None:
    """Your uploaded models, newest first."""
    with _client() as client:
        uploaded = client.models()
    table = Table("id", "file", "format", "bytes", "uploaded")
    table.columns[0].no_wrap = True
    for model in uploaded:
        table.add_row(
            model["id"],
            model["filename"],
            model["format"],
            str(model["bytes"]),
            model["created_at"][:16].replace("T", " "),
        )
    console.print(table)


# --- who is calling ---


@app.command()
def login(
    url: Annotated[
        str | None,
        typer.Option(
            help="The service's URL [default: ADVORCH_PUBLIC_URL, the last login's, or "
            "http://ADVORCH_HOST:ADVORCH_PORT]."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="The token; better left out, to be asked for without echo."),
    ] = None,
) -> None:
    """Check a token with the service and keep it, with the URL, in the CLI's config file
    (mode 0600), for every later command."""
    settings = get_settings()
    path = settings.resolved_config_file
    try:
        previous = read_cli_config(path)
    except ApiError:  # a damaged file: this login replaces it
        previous = CliConfig()
    url = url or service_url(settings, previous)
    if token is None:
        token = str(typer.prompt("API token", hide_input=True)).strip()
    with AdvorchClient(url, token) as client:
        me = client.me()
    write_cli_config(path, CliConfig(url=url, token=token))
    console.print(f"logged in to {url} as {_user_text(me)}; the token is kept in {path}")


@app.command()
def logout() -> None:
    """Forget the token `advorch login` kept."""
    path = get_settings().resolved_config_file
    path.unlink(missing_ok=True)
    console.print(f"removed {path}")


@app.command()
def whoami() -> None:
    """The user your token belongs to, and your limits."""
    with _client() as client:
        me = client.me()
    limits = me["limits"]
    console.print(
        f"{_user_text(me)} (token {me['token_id']}); at most {limits['max_active_jobs']} "
        f"queued or running jobs, {limits['max_trials_per_job']} trials per job"
    )


def _user_text(user: dict[str, Any]) -> str:
    return user["name"] + (" (admin)" if user["admin"] else "")


# --- admins: users, tokens and the audit trail ---


@users_app.command("add")
def users_add(
    name: str, admin: Annotated[bool, typer.Option(help="Make the user an admin.")] = False
) -> None:
    """Create a user; the last line of the output is their token alone (shown this once)."""
    with _client() as client:
        created = client.create_user(name, admin=admin)
    console.print(f"created user {_user_text(created['user'])}; their token, shown this once:")
    typer.echo(created["token"]["token"])


@users_app.command("list")
def users_list() -> None:
    """Every user: admin or not, disabled or not, their live tokens and their limits."""
    with _client() as client:
        all_users = client.list_users()
    table = Table("name", "admin", "created", "disabled", "tokens", "max jobs", "max trials/job")
    for user in all_users:
        limits, overrides = user["limits"], user["limit_overrides"]
        live_tokens = [t["id"] for t in user["tokens"] if t["revoked_at"] is None]
        table.add_row(
            user["name"],
            "yes" if user["admin"] else "",
            user["created_at"][:16].replace("T", " "),
            (user["disabled_at"] or "")[:16].replace("T", " "),
            ", ".join(live_tokens) or "-",
            _limit_text(limits, overrides, "max_active_jobs"),
            _limit_text(limits, overrides, "max_trials_per_job"),
        )
    console.print(table)
    console.print("*: the user's own limit, set by an admin (`advorch users limits`)")


def _limit_text(limits: dict[str, int], overrides: dict[str, int | None], name: str) -> str:
    return f"{limits[name]}{'*' if overrides[name] is not None else ''}"


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Disable a user: their tokens stop working at once; their jobs and results stay."""
    with _client() as client:
        client.disable_user(name)
    console.print(f"user {name} is disabled")


@users_app.command("token")
def users_token(name: str) -> None:
    """Issue another token to a user; the last line of the output is the token alone."""
    with _client() as client:
        issued = client.issue_token(name)
    console.print(f"a new token for {name}, id {issued['id']}, shown this once:")
    typer.echo(issued["token"])


@users_app.command("revoke")
def users_revoke(name: str, token_id: str) -> None:
    """Revoke one of a user's tokens (its id is in `advorch users list`); it stops at once."""
    with _client() as client:
        client.revoke_token(name, token_id)
    console.print(f"token {token_id} of {name} is revoked")


def _limit_option(text: str | None) -> int | None:
    if text is None or text == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a whole number, or 'default'") from None


@users_app.command("limits")
def users_limits(
    name: str,
    max_active_jobs: Annotated[
        str | None, typer.Option(help="Queued plus running jobs at once; 'default': the server's.")
    ] = None,
    max_trials_per_job: Annotated[
        str | None, typer.Option(help="Trials per job; 'default': the server's.")
    ] = None,
) -> None:
    """Give a user limits of their own (the options given change; 'default' clears one)."""
    overrides = {
        limit: _limit_option(value)
        for limit, value in [
            ("max_active_jobs", max_active_jobs),
            ("max_trials_per_job", max_trials_per_job),
        ]
        if value is not None
    }
    with _client() as client:
        user = client.set_limits(name, overrides)
    limits = user["limits"]
    console.print(
        f"{name}: at most {limits['max_active_jobs']} queued or running jobs, "
        f"{limits['max_trials_per_job']} trials per job"
    )


@app.command()
def audit(
    actor: Annotated[str | None, typer.Option(help="Only this user's (or job's) doing.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. job.cancel.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 50,
) -> None:
    """Admins: the audit trail, newest first: who did what, and when."""
    with _client() as client:
        page = client.audit(actor=actor, action=action, limit=limit)
    table = Table("when", "who", "action", "target", "detail")
    for event in page["items"]:
        who = event["actor"] if event["actor_kind"] == "user" else f"worker of {event['actor']}"
        table.add_row(
            event["created_at"][:19].replace("T", " "),
            who,
            event["action"],
            event["target"],
            event["detail"],
        )
    console.print(table)
    console.print(f"{len(page['items'])} of {page['total']} events")


def _progress_view(client: AdvorchClient, job_id: str) -> tuple[Table, str]:
    """A table of the job's progress: each trial's epoch and accuracy, AutoAttack's progress
    (a line per finished attack) while it runs, and the job's status."""
    job = client.job(job_id)
    trials = client.trials(job_id)
    progress, best, axis = job["progress"], job["best_trial"], job["robust_axis"]
    evaluate_job = job["spec"]["kind"] == "evaluate"
    epochs = job["spec"]["training"]["epochs"]
    title = (
        f"{job['name']} ({job['status']})  "
        f"trials {progress['trials_done']}/{progress['trials_total']} done"
        + (f"  best robust {_best_robust_text(job)} ({best['key']})" if best else "")
    )
    table = Table("trial", "config", "status", "epoch", "clean acc", "robust acc", title=title)
    table.caption = (
        "running: the last epoch's validation accuracy (robust: PGD); "
        f"done: test accuracy (robust: {axis['attack']})"
    )
    attack_lines = []
    for trial in trials:
        if trial["status"] == "running" and not evaluate_job:
            history = client.metrics(job_id, trial["key"])
            last = history[-1] if history else {}
            epoch = f"{last['epoch']}/{epochs}" if last else "-"
            clean, robust = last.get("val_clean_acc"), last.get("val_robust_acc")
        else:
            best_epoch = trial["best_epoch"]
            epoch = f"best {best_epoch}" if best_epoch else "-"
            clean, robust = trial["clean_acc"], trial[axis["metric"]]
        table.add_row(
            trial["key"],
            _config_text(trial["config"]),
            trial["status"],
            epoch,
            _pct(clean),
            _pct(robust),
        )
        autoattack = trial["autoattack"] or {}
        for attack, accuracy in (autoattack.get("after_attack") or {}).items():
            attack_lines.append(f"{trial['key']}: AutoAttack after {attack}: {_pct(accuracy)}")
    if evaluate_job:
        for point in client.curve(job_id)[0]["points"] if trials else []:
            for attack, accuracy in ((point["autoattack"] or {}).get("after_attack") or {}).items():
                attack_lines.append(
                    f"epsilon {point['epsilon']:.4f}: AutoAttack after {attack}: {_pct(accuracy)}"
                )
    if attack_lines:
        table.caption = "\n".join([table.caption, *attack_lines])
    if job["error"]:
        table.caption = f"error: {job['error']}"
    return table, job["status"]


def _follow(client: AdvorchClient, job_id: str) -> None:
    """Redraw the progress until the job ends; exit 1 unless it succeeded."""
    with Live(console=console, auto_refresh=False) as live:
        while True:
            view, job_status = _progress_view(client, job_id)
            live.update(view, refresh=True)
            if job_status in FINISHED:
                break
            time.sleep(POLL_INTERVAL_S)
    if job_status != "succeeded":
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except ApiError as err:  # raised inside a command: one line, no traceback
        Console(stderr=True).print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(1)
