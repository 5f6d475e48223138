"""Every GPU figure the docs promise, in one command, for the minutes a GPU machine is lent: `fedsync doctor`; the
worker's training loop against a bare loop, eagerly and captured in CUDA graphs against the bare CUDA-graph
ceiling, at batch 128 (benchmarks/worker_throughput.py); a round's time against its slowest worker's training with
the evaluation beside the next round (benchmarks/round_pipeline.py); the language-model task's tokens per second
and memory beside a bare PEFT loop, its base in the GPU's precision and in 4 bits (benchmarks/lora.py); the
tests whose GPU path runs only where a GPU is; and, last, the coordinator's intake and robust rules on all of the
machine's cores (benchmarks/aggregate.py over 16 ResNet-18 updates: a GPU machine is the many-core one a session
gets). Each step runs as its own process with a time limit, and one Markdown table comes out, the device named,
ready for docs/BENCHMARKS.md (also written to --out).

Without a usable CUDA GPU it says so and runs the same steps on the CPU with small sizes: CI runs it that way
(.ci/run, after the tests), so the script is known to work before a GPU is lent.

Usage: python benchmarks/gpu_check.py [--out gpu_check.md] [--budget 480]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedsync.learning.device import DeviceFacts, choose_device, describe  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    keep: str         # the lines of its output that are figures (a regular expression)
    seconds: float    # its time limit
    needs_llm: bool = False


def steps(gpu: bool) -> list[Step]:
    """What runs: full sizes on a GPU (about 6 minutes on an H100, the intake's 1 more), the smallest that exercise
    every path on a CPU."""
    python, device = sys.executable, "cuda" if gpu else "cpu"
    bench = str(ROOT / "benchmarks")
    out = [
        Step("fedsync doctor", [python, "-m", "fedsync", "doctor"], r"GPU|CPU|MPS|step|bf16|fp16", 60),
        Step("worker training loop, resnet18_cifar, batch 128",
             [python, f"{bench}/worker_throughput.py", "--device", device,
              *([] if gpu else ["--steps", "1", "--batch", "16"])], r"samples/s", 150 if gpu else 120),
        Step("a round against its slowest worker's training",
             [python, f"{bench}/round_pipeline.py", "--device", device,
              *(["--train-per-batch", "10000", "--test", "10000"] if gpu else ["--train-per-batch", "20",
                                                                               "--test", "100"])],
             r"round \d|last update|rounds,", 180 if gpu else 240),
        Step("language model (LoRA), fedsync's loop against bare PEFT",
             [python, f"{bench}/lora.py", "--device", device,
              *(["--model", "qwen0.5b", "--length", "512", "--steps", "20"] if gpu else ["--steps", "2"])],
             r"training,|as a worker holds", 150 if gpu else 120, needs_llm=True),
    ]
    if gpu:
        out.append(Step("language model, base in 4 bits (QLoRA)",
                        [python, f"{bench}/lora.py", "--device", device, "--model", "qwen0.5b", "--length", "512",
                         "--steps", "20", "--quantize", "4bit"], r"training,", 150, needs_llm=True))
    out.append(Step("the tests with a GPU path (device, capture)",
                    [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py"),
                     str(ROOT / "tests" / "test_capture.py")], r"passed|failed|error", 180))
    out.append(Step("the intake and the robust rules on every core (ResNet-18 updates)",
                    [python, f"{bench}/aggregate.py", "16" if gpu else "4"],
                    r"^aggregate:|streaming FedAvg \(|rule alone|sealed updates \(|peak extra RSS:",
                    120 if gpu else 60))
    return out


@dataclass(frozen=True)
class Ran:
    step: Step
    code: int | None  # None: stopped at its time limit, or not run
    seconds: float
    figures: list[str]
    tail: str
    skipped: str | None = None  # why it did not run

    @property
    def result(self) -> str:
        if self.skipped is not None:
            return "skipped"
        return "ok" if self.code == 0 else "time limit" if self.code is None else f"exit {self.code}"

    @property
    def failed(self) -> bool:
        """Not run to its end, for any reason but the language-model libraries being absent."""
        return self.code != 0 and self.skipped != NO_LLM


NO_LLM = "transformers and peft are not installed (pip install 'fedsync[llm]')"


def run(step: Step, left: float) -> Ran:
    """The step as a process, within its own limit and what is left of the budget."""
    if step.needs_llm and not _has_llm():
        return Ran(step, None, 0.0, [NO_LLM], "", skipped=NO_LLM)
    limit = min(step.seconds, left)
    if limit < 10:
        return Ran(step, None, 0.0, ["the time budget is spent"], "", skipped="budget")
    started = time.perf_counter()
    try:
        done = subprocess.run(step.command, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code = None
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\nstopped at its time limit of {limit:.0f} s"
    figures = [line.strip() for line in output.splitlines() if re.search(step.keep, line)]
    return Ran(step, code, time.perf_counter() - started, figures, "\n".join(output.splitlines()[-15:]))


def _has_llm() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def table(device: str, ran: list[Ran]) -> str:
    """One Markdown table: each step, how long it took, whether it passed, its figures."""
    lines = [f"GPU check on {device}, {time.strftime('%Y-%m-%d')} (`python benchmarks/gpu_check.py`)", "",
             "| step | seconds | result | figures |", "|---|---|---|---|"]
    for r in ran:
        figures = "<br>".join(" ".join(f.replace("|", "/").split()) for f in r.figures) or "(none)"
        lines.append(f"| {r.step.name} | {r.seconds:.0f} | {r.result} | {figures} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all the steps together")
    args = parser.parse_args()
    facts = DeviceFacts.probe()
    choice = choose_device("auto", facts)
    gpu = choice.device.startswith("cuda")
    name, capability = describe(choice.device, facts)
    device = f"{name} (compute capability {capability})" if gpu else "the CPU"
    if not gpu:
        print(f"no CUDA GPU this torch build can drive{': ' + choice.fallback if choice.fallback else ''}; running "
              "the same steps on the CPU with small sizes (figures of the script, not of a GPU)")
    started, ran = time.perf_counter(), []
    for step in steps(gpu):
        print(f"== {step.name}: {' '.join(step.command[1:])}", flush=True)
        ran.append(run(step, args.budget - (time.perf_counter() - started)))
        print(ran[-1].tail, flush=True)
    text = table(device, ran)
    args.out.write_text(text)
    print(f"\n{text}\nwritten to {args.out} in {time.perf_counter() - started:.0f} s")
    if any(r.failed for r in ran):  # a step that failed, stopped at its limit or found no time left
        raise SystemExit(1)


if __name__ == "__main__":
    main()
