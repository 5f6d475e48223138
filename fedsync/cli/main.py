"""The `fedsync` command: parse arguments, call one function, print. Errors become one line and a status."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedsync.base import defaults
from fedsync.base.errors import EXIT_CODES, FedsyncError, ShareError, Stopped, stopped_by
from fedsync.cli import reading
from fedsync.cli.options import (
    BaseModelOpt,
    DataRootOpt,
    KeyOpt,
    LogJsonOpt,
    ShareOpt,
    SyncthingKeyOpt,
    SyncthingOpt,
    WatchOpt,
    check_coordinator_key,
    check_device,
    check_watch,
)
from fedsync.storage.share import Share

EXIT_HELP = "\n\n".join(f"{code}: {' '.join(text.split())}" for code, text in EXIT_CODES.items())
app = typer.Typer(
    name="fedsync",
    help="Federated training across machines you already own, through one shared folder "
         "(NFS/SMB mount or Syncthing). The coordinator and the workers only read and write files in it.\n\n"
         "Exit statuses:\n\n" + EXIT_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        from fedsync import __version__
        from fedsync.storage.markers import FORMAT_VERSION

        typer.echo(f"fedsync {__version__} (share format {FORMAT_VERSION})")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print fedsync's version and the share format it reads and writes, and exit.")] = False) -> None:
    pass


@app.command(short_help="Start or continue the run in a share and drive it round by round.")
def coordinator(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    rounds: Annotated[int, typer.Option(help="The run's total number of rounds, not rounds to add: a run continued "
                                             "with a larger N runs the rounds up to N.",
                                             metavar="N")] = defaults.ROUNDS,
    config: Annotated[str, typer.Option(help="A built-in config (digits, cifar10) or a YAML file; keys it "
                                             "leaves out come from configs/digits.yaml.",
                                             metavar="NAME|FILE")] = defaults.CONFIG,
    set_: Annotated[list[str], typer.Option("--set", help="Override one config key, KEY=VALUE (repeatable), "
                                                          "e.g. --set quorum=0.5 --set local_epochs=1.",
                                                          metavar="KEY=VALUE")] = [],
    preset: Annotated[str | None, typer.Option(
        help="A named recipe: fedavg (local epochs, plain mean; the default), fedsgd (one local step per round, "
             "averaged gradients), diloco (100 local steps, then an outer Nesterov step, lr 0.7, momentum 0.9). "
             "Keys given with --set or in the config file win over the preset's.", metavar="NAME")] = None,
    watch: WatchOpt = defaults.WATCH,
    data_root: DataRootOpt = None,
    base_model: BaseModelOpt = None,
    syncthing: SyncthingOpt = None,
    syncthing_key: SyncthingKeyOpt = None,
    key: KeyOpt = None,
    device: Annotated[str, typer.Option(help="Where the coordinator evaluates each round's model, beside the next "
                                             "round: auto | cpu | cuda | cuda:N | mps. auto picks as for workers; an "
                                             "explicit device that cannot run fails at once.",
                                             callback=check_device, metavar="DEVICE")] = defaults.DEVICE,
    log_json: LogJsonOpt = False,
) -> None:
    """Start a run in SHARE, or continue the one there, and drive it round by round. It signs every assignment with
    its key; only the key that started a run continues it.

    Example: fedsync coordinator --rounds 20 --share /mnt/fed --set min_workers=3
    Over a slow link: fedsync coordinator --rounds 20 --preset diloco --set compression=int8
    """
    from fedsync.base.logs import make_log
    from fedsync.coordinator import CoordinatorOptions, run_coordinator
    from fedsync.run.config import load_config, on_this_machine, parse_overrides

    cfg = on_this_machine(load_config(config, {**({"preset": preset} if preset else {}), **parse_overrides(set_)}),
                          base_model)
    final = run_coordinator(CoordinatorOptions(share=share, config=cfg, rounds=rounds, watch=check_watch(watch),
                                               data_root=data_root, syncthing=syncthing, syncthing_key=syncthing_key,
                                               key=key, device=device, log=make_log("coordinator", log_json)))
    typer.echo(f"final test accuracy {final.test_accuracy:.4f} after {final.round} rounds: "
               f"{share.where(Share.final_model)}")


@app.command(short_help="Train for the run in a share, each round this worker is assigned.")
def worker(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    name: Annotated[str | None, typer.Option(help="This worker's name in the share (default: the host name): 1-64 "
                                                  "letters, digits, '.', '_' or '-', and not one YAML reads as a "
                                                  "number, bool, date or null (1e5, yes, 012).",
                                                  metavar="NAME")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps. auto picks the first CUDA GPU "
                                             "this torch build can drive, then MPS, then the CPU (saying why it "
                                             "passed over a GPU); an explicit device that cannot train fails at "
                                             "once with `fedsync doctor`'s diagnosis.",
                                             callback=check_device, metavar="DEVICE")] = defaults.DEVICE,
    watch: WatchOpt = defaults.WATCH,
    data_root: DataRootOpt = None,
    base_model: BaseModelOpt = None,
    quantize: Annotated[str | None, typer.Option(
        help="causal_lm: 4bit holds this machine's copy of the base in 4 bits (NF4, QLoRA, bitsandbytes: pip install "
             "'fedsync[qlora]'), a quarter of bf16's memory; CUDA GPUs only, refused elsewhere. Default: the base is "
             "held in the precision this worker trains in (bf16 or fp16 on a GPU, fp32 on the CPU). The adapters "
             "are the same either way.", metavar="4bit")] = None,
    data_memory: Annotated[float | None, typer.Option(
        "--data-memory", help="MiB of its own decoded images (imagefolder) this worker keeps in memory; a larger "
                              "folder is streamed from disk batch by batch every pass. Default: a quarter of the "
                              "memory this machine has free.", metavar="MB")] = None,
    wait_for_run: Annotated[float | None, typer.Option(help="Give up if no run appears in the share within "
                                                            "this many seconds (default: wait forever).",
                                                            metavar="SECONDS")] = None,
    syncthing: SyncthingOpt = None,
    syncthing_key: SyncthingKeyOpt = None,
    key: KeyOpt = None,
    coordinator_key: Annotated[str | None, typer.Option(
        "--coordinator-key", help="The coordinator's public key (ed25519:..., printed when the coordinator starts). "
                                  "Default: the key in the run's fedsync.yaml, pinned on this machine the first "
                                  "time it sees the run; a changed key then stops the worker.",
        callback=check_coordinator_key, metavar="KEY")] = None,
    serve: Annotated[bool, typer.Option(
        "--serve", help="Also run inference jobs (`fedsync infer`) on this machine: between training rounds (rounds "
                        "come first), and after the run ends, until stopped with Ctrl-C or SIGTERM.")] = False,
    capture: Annotated[str, typer.Option(help="auto | off. auto captures the training step in CUDA graphs "
                                              "(torch.compile, mode reduce-overhead) on CUDA GPUs of compute "
                                              "capability 7.0 and newer: compiled once per process before "
                                              "registering, then about 3x the eager speed at batch 128. Elsewhere, "
                                              "or with off, the step runs eagerly; the worker says which and "
                                              "why.", metavar="MODE")] = defaults.CAPTURE,
    log_json: LogJsonOpt = False,
) -> None:
    """Train for the run in SHARE: register, then take each round assigned to this worker until the run ends. It
    publishes its public key, trains only on assignments the coordinator signed, and signs its updates.

    Example: fedsync worker --share /mnt/fed --device cuda
    """
    import socket

    from fedsync.learning.capture import CAPTURE_SETTINGS
    from fedsync.storage.names import check_worker_name
    from fedsync.worker import WorkerOptions, run_worker

    try:
        name = check_worker_name(name or socket.gethostname())
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--name") from None
    if data_memory is not None and data_memory < 0:
        raise typer.BadParameter("must not be negative (0 streams every folder)", param_hint="--data-memory")
    if capture not in CAPTURE_SETTINGS:
        raise typer.BadParameter(f"{capture!r} is not one of {', '.join(CAPTURE_SETTINGS)}", param_hint="--capture")
    run_worker(WorkerOptions(share=share, name=name, device=device, watch=check_watch(watch),
                             data_root=data_root, base_model=base_model, quantize=quantize,
                             wait_for_run=wait_for_run,
                             syncthing=syncthing,
                             syncthing_key=syncthing_key, key=key, coordinator_key=coordinator_key,
                             capture=capture, log_json=log_json, serve=serve,
                             memory_budget=None if data_memory is None else int(data_memory * 2**20)))


@app.command(short_help="Predict inputs, or continue prompts, with the run's model on serving workers.")
def infer(
    inputs: Annotated[Path, typer.Option(
        "--inputs", help="A safetensors file with a float tensor x shaped (N, *the model's input) and optionally "
                         "integer ids (N), or a folder of image files (any depth; the task's transform is applied on "
                         "the workers). causal_lm: a JSON lines file of prompts, one {\"prompt\": TEXT} or "
                         "{\"messages\": [{role, content}, ...]} per line, each with an optional id. Read chunk by "
                         "chunk, never whole.", metavar="FILE|DIR")],
    out: Annotated[Path, typer.Option(
        "--out", help="The CSV to write: index, id, class, probability, and why an input could not be predicted; "
                      "the full logits go beside it (OUT with .safetensors). causal_lm: a JSON lines file, one "
                      "object per prompt: index, id, generation, tokens, prompt_tokens_dropped, problem.",
        metavar="FILE.csv|FILE.jsonl")],
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    model: Annotated[str, typer.Option(
        help="final (the run's final model), N (closed round N's model) or a model file written by `fedsync "
             "export`.", metavar="final|N|FILE")] = defaults.INFER_MODEL,
    name: Annotated[str | None, typer.Option(
        help="The job's name in the share (jobs/NAME). Default: the inputs' name and a hash of inputs, model and "
             "chunk size, so the same command continues the same job.", metavar="JOB")] = None,
    chunk_rows: Annotated[int | None, typer.Option(
        "--chunk-rows", min=1, help="Inputs per chunk, the unit a worker takes. Default: about 4 MiB of inputs, at "
                                    "least 64 chunks when there are enough inputs; prompts: 32.", metavar="N")] = None,
    base_model: BaseModelOpt = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", min=1, max=65536, help="causal_lm: tokens to generate at most per prompt (it stops "
                                                   "earlier at the end-of-text token). Default: 128.",
        metavar="N")] = None,
    temperature: Annotated[float | None, typer.Option(
        min=0.0, help="causal_lm: 0 (the default) takes the most likely token each step, the same text on every "
                      "worker; above 0 samples, seeded per chunk (--seed).", metavar="T")] = None,
    top_p: Annotated[float | None, typer.Option(
        "--top-p", min=0.0, max=1.0, help="causal_lm, sampling: draw from the smallest set of "
                                                          "tokens holding this much probability. Default: 1.",
        metavar="P")] = None,
    seed: Annotated[int | None, typer.Option(
        help="causal_lm, sampling: chunk c samples from SEED + c on whichever worker runs it. Default: 0.",
        metavar="SEED")] = None,
    watch: WatchOpt = defaults.WATCH,
    log_json: LogJsonOpt = False,
) -> None:
    """Submit an inference job to SHARE and drive it to the end: the workers started with `--serve` run its chunks
    (fast machines take more; a worker that stops heartbeating loses its chunks to the others), and the predictions
    are merged in the inputs' order into OUT. Stopped and started again with the same arguments, it continues the
    job. For causal_lm the workers continue each prompt with the run's adapters on their own base model, and this
    machine needs the base too (--base-model), as `fedsync eval` and `export` do.

    Example: fedsync infer --share /mnt/fed --inputs test.safetensors --out preds.csv
    """
    from fedsync.base.logs import make_log
    from fedsync.infer import InferOptions, run_infer
    from fedsync.storage.markers import Generation, MarkerError
    from fedsync.storage.names import check_job_name

    if name is not None:
        try:
            check_job_name(name)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--name") from None
    if out.suffix == ".safetensors":
        raise typer.BadParameter("is the CSV; the logits are written beside it, as OUT with .safetensors",
                                 param_hint="--out")
    asked = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                               ("seed", seed)) if v is not None}
    try:
        generation = Generation(**asked) if asked else None
    except MarkerError as e:
        raise typer.BadParameter(str(e)) from None
    written = run_infer(InferOptions(share=share, inputs=inputs, out=out, model=model, name=name,
                                     chunk_rows=chunk_rows, watch=check_watch(watch), generation=generation,
                                     base_model=base_model, log=make_log("infer", log_json)))
    if written.beside is None:
        failed = f"; {written.failed} could not be continued (see their problem)" if written.failed else ""
        typer.echo(f"continued {written.rows} prompts: {written.out}{failed}")
    else:
        failed = f"; {written.failed} could not be predicted (see the problem column)" if written.failed else ""
        typer.echo(f"predicted {written.rows} inputs: {written.out}, logits in {written.beside}{failed}")


@app.command(short_help="Approve a worker's key so that its updates count.")
def trust(
    name: Annotated[str, typer.Argument(help="The worker's name, as `fedsync status` lists it.", metavar="NAME")],
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    fingerprint: Annotated[str | None, typer.Option(
        help="Approve only if the worker's key has this fingerprint (compare it with what the worker printed when "
             "it started).", metavar="FINGERPRINT")] = None,
    revoke: Annotated[bool, typer.Option(
        "--revoke", help="Withdraw the worker's key instead: it gets no more work and its updates are rejected "
                         "(untrusted_key) until its key is approved again.")] = False,
    key: KeyOpt = None,
) -> None:
    """Approve the key worker NAME registered with: its updates count from now on (needed with trust: explicit, and
    under trust: tofu after a worker's key changed); or, with --revoke, withdraw it. Run it on the coordinator's
    machine: it signs trust.yaml with the coordinator's key.

    Example: fedsync trust gtx1080-box --share /mnt/fed --fingerprint 3f2a-9c1b-0d4e-77aa
    """
    from fedsync.run.trust import approve_registered, revoke_worker

    if revoke:
        if fingerprint is not None:
            raise typer.BadParameter("approves a key; --revoke withdraws one: give one of the two",
                                     param_hint="--fingerprint")
        typer.echo(f"revoked {name}: key {revoke_worker(share, name, key)} gets no work and its updates are rejected "
                   "from the coordinator's next look at the share")
        return
    approved = approve_registered(share, name, key, fingerprint)
    typer.echo(f"approved {name}: key {approved}; its updates count from the coordinator's next look at the share")


app.command(short_help="Show where the run in a share stands.")(reading.status)
app.command(short_help="Re-check every marker and hash of the run in a share.")(reading.verify)
app.command(short_help="The run's rounds as a table, and its curves as a PNG.")(reading.results)
app.command("eval", short_help="Evaluate a round's model on this machine's test data for the task.")(reading.eval_)
app.command(short_help="Write a round's model to a safetensors file that says what it is.")(reading.export)


@app.command(short_help="Check what this machine can train on, and how to fix a GPU it cannot.")
def doctor() -> None:
    """Check what this machine can train on: Python, torch and its CUDA build, each GPU's compute capability
    against the architectures the build carries kernels for, a tiny real training step on every device, bf16
    and fp16, Apple MPS. Prints the exact command that fixes a GPU this build cannot drive; exit status 7 then.

    Example: fedsync doctor
    """
    from fedsync.learning.device import DeviceFacts
    from fedsync.learning.doctor import report

    text, code = report(DeviceFacts.probe())
    typer.echo(text)
    if code:
        raise typer.Exit(code)


@app.command(short_help="Run a coordinator and local workers on a local share, then report.")
def demo(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    workers: Annotated[int, typer.Option(help="Local worker processes to start.", min=1, max=16,
                                         metavar="N")] = defaults.DEMO_WORKERS,
    rounds: Annotated[int, typer.Option(help="Rounds to run.", min=1, metavar="N")] = defaults.DEMO_ROUNDS,
    config: Annotated[str, typer.Option(help="Built-in config or YAML file.", metavar="NAME|FILE")] = defaults.CONFIG,
) -> None:
    """Run a coordinator and WORKERS local workers as separate processes on SHARE, then report.

    A previous demo run in SHARE is replaced; a run started by `fedsync coordinator` is never touched.

    Example: fedsync demo --workers 3 --rounds 20
    """
    from fedsync.base.logs import make_log
    from fedsync.cli.demo import run_demo

    result = run_demo(share, workers, rounds, config, make_log("demo"))
    typer.echo(f"demo finished: {result.final.round} rounds, {workers} workers, final test accuracy "
               f"{result.final.test_accuracy:.4f}, run wall time {result.seconds:.1f} s")
    typer.echo(f"browse the run in {share.where()}/ (metrics.csv, 0001/summary.yaml, …) or `fedsync status --share "
               f"{share.where()}`")


_stops: list[KeyboardInterrupt] = []  # what stopped this process (typer swallows it), for its last line


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (kill, systemd, a container's stop) and Ctrl-C stop every command alike: a worker says it left, the
    coordinator releases its lease with why, a submitter marks its job stopped."""
    _stops.append(Stopped() if signum == signal.SIGTERM else KeyboardInterrupt())
    raise _stops[-1]


# typer carries its own copy of click: its usage errors are that copy's ClickException, found through BadParameter.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Every way a command ends is one line on stderr and an exit status (`fedsync --help` lists them)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    try:
        code = app(standalone_mode=False)  # usage errors and stops come back here, to be said in one line
    except CLICK_ERROR as e:  # bad usage: an unknown option, a malformed value, a missing argument
        if type(e).__name__ == "NoArgsIsHelpError":  # `fedsync` alone: its help
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f"fedsync {ctx.info_name}" if ctx is not None and ctx.parent is not None else "fedsync"
        print(f"{where}: error: {e.format_message()} (`{where} --help` explains)", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("fedsync: aborted", file=sys.stderr)
        sys.exit(1)
    except FedsyncError as e:
        print(f"fedsync: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # the share (a mount, an object store) refused or could not be reached
        print(f"fedsync: error: {e}", file=sys.stderr)
        sys.exit(ShareError.exit_code)
    if code == 130 and _stops:  # typer turns the interruption into this status
        print(f"fedsync: stopped by {stopped_by(_stops[0])}: what it wrote is in the share; the same command continues "
              "from there", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
