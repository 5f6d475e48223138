"""The commands that read a run without driving it: status, verify, results, eval and export. Each parses, calls one
function, prints; fedsync/cli/main.py registers them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedsync.base import defaults
from fedsync.cli.options import BaseModelOpt, DataRootOpt, ShareOpt, check_device


def status(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep watching: a live view on a terminal, redrawn as the "
                                                        "share changes (else every second); Ctrl-C ends it.")] = False,
) -> None:
    """Show where the run in SHARE stands: round and time left to its deadline, updates accepted against the quorum,
    each worker's state, device, speed, heartbeat and bytes sent, rejections with their reasons, the last accuracy.

    Example: fedsync status --share /mnt/fed --watch
    """
    from fedsync.cli.status import format_status
    from fedsync.run.inspecting.status import collect_status

    if watch:
        if as_json:
            raise typer.BadParameter("--watch draws for people; --json prints one snapshot for scripts",
                                     param_hint="--watch")
        from fedsync.cli.watch import watch as watch_share

        collect_status(share)  # a share without a run fails here, in one line, before the view starts
        watch_share(share)
        return
    st = collect_status(share)
    typer.echo(json.dumps(st, indent=2) if as_json else format_status(st))


def verify(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    key: Annotated[Path | None, typer.Option(
        help="The coordinator's age identity (coordinator.age beside its signing key): also open every accepted "
             "sealed update and check its plaintext. Without it sealed updates are checked by their hash.",
        metavar="KEY.age")] = None,
) -> None:
    """Re-check every marker and hash of the run in SHARE: global models, accepted updates, aggregates, the
    final model. Errors (exit status 8) are damage to what the run relies on; hints are harmless leftovers.

    Example: fedsync verify --share /mnt/fed --key ~/.config/fedsync/keys/coordinator.age
    """
    from dataclasses import asdict

    from fedsync.run.inspecting.checks import verify as verify_share
    from fedsync.storage.keys import load_sealing_identity

    absent = "give the coordinator's age identity (coordinator.age, beside coordinator.pem)"
    opener = load_sealing_identity(key, create=False, absent=absent)[0] if key is not None else None
    report = verify_share(share, opener)
    if as_json:
        typer.echo(json.dumps({"checked": report.checked, "pruned": report.pruned,
                               "findings": [asdict(f) for f in report.findings]}, indent=2))
    else:
        for f in report.findings:
            typer.echo(f"{f.level}: {f.path}: {f.problem}\n  fix: {f.fix}")
        pruned = (f"; {report.pruned} tensor file(s) of rounds 1..{report.pruned_through} removed by keep_rounds, "
                  "as the run asks") if report.pruned else ""
        typer.echo(f"checked {report.checked} files: {len(report.errors)} error(s), "
                   f"{len(report.findings) - len(report.errors)} hint(s){pruned}")
    if report.errors:
        raise typer.Exit(8)


def results(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    plot: Annotated[Path | None, typer.Option(help="Also draw test accuracy and loss per round and each worker's "
                                                   "training time per round into this PNG file.",
                                              metavar="FILE.png")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per round.")] = False,
) -> None:
    """Per closed round: test accuracy and loss (once evaluated), the workers' training loss, accepted and rejected
    updates, seconds, megabytes moved down (the global model to each worker) and up (the accepted updates), and
    each accepted worker's training time. The coordinator writes the same into report.md and report.png at the
    share's root after every round.

    Example: fedsync results --share /mnt/fed --plot run.png
    """
    from dataclasses import asdict

    from fedsync.run.coordinating.report import format_table, plot_png, read_rows
    from fedsync.storage.local import atomic_write
    from fedsync.storage.manifest import read_manifest

    manifest = read_manifest(share)
    rows = read_rows(share)
    typer.echo(json.dumps([asdict(r) for r in rows], indent=2) if as_json else format_table(rows))
    if plot is not None:
        atomic_write(plot, plot_png(rows, f"fedsync run {manifest.run_id}"))
        if not as_json:
            typer.echo(f"plotted {len(rows)} round(s) into {plot}")


RoundOpt = Annotated[int | None, typer.Option(
    "--round", help="A closed round: its aggregate, the model it produced. Default: the newest closed round (the "
                    "final model once the run finished).", metavar="N")]


def eval_(
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    round_: RoundOpt = None,
    data_root: DataRootOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps: auto picks the best this machine "
                                             "has.", callback=check_device, metavar="DEVICE")] = defaults.DEVICE,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    base_model: BaseModelOpt = None,
) -> None:
    """Evaluate round N's model (verified against its summary) on the task's test data on this machine: the same
    examples the coordinator evaluates on (its eval_samples), so it reproduces the run's test accuracy.

    Example: fedsync eval --share /mnt/fed --round 12
    """
    from dataclasses import asdict

    from fedsync.base.logs import make_log
    from fedsync.run.trained import evaluate_round

    scored = evaluate_round(share, round_, data_root, device, make_log("eval"), base_model)
    if as_json:
        typer.echo(json.dumps(asdict(scored), indent=2))
        return
    recorded = "" if scored.recorded_accuracy is None else f" (the run recorded {scored.recorded_accuracy:.4f})"
    typer.echo(f"round {scored.round}: test accuracy {scored.test_accuracy:.4f}{recorded}, test loss "
               f"{scored.test_loss:.4f} on {scored.samples} examples, {scored.device}, {scored.seconds:.2f} s")


def export(
    out: Annotated[Path, typer.Argument(help="The file to write (OUT.safetensors), outside the share; for causal_lm "
                                             "the folder to write the adapter into.", metavar="OUT")],
    share: ShareOpt = defaults.SHARE,  # type: ignore[assignment]
    round_: RoundOpt = None,
    base_model: BaseModelOpt = None,
) -> None:
    """Write round N's model (verified against its summary) to OUT as safetensors, with the task, its version and
    layout, the model's name, the round, its test accuracy, the run and its config in the file's metadata (keys
    fedsync.*). README.md, "Using the trained model", shows the lines that load it for inference. For causal_lm,
    OUT is a folder in PEFT's own layout (README, "Your language model"), with the same metadata in fedsync.json.

    Example: fedsync export model.safetensors --share /mnt/fed
    """
    from fedsync.run.trained import export_round

    meta = export_round(share, round_, out, base_model)
    accuracy = meta["fedsync.test_accuracy"] or "not evaluated"
    typer.echo(f"wrote {out}: {meta['fedsync.task']}/{meta['fedsync.model']}, round {meta['fedsync.round']}, test "
               f"accuracy {accuracy}")
