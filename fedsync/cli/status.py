"""`fedsync status` in text: the record of fedsync/run/inspecting/status.py, formatted for a person."""

from __future__ import annotations

from typing import Any


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['run_id']} ({st['task']}/{st['model']}) in {st['share']}",
             f"{_where(st['round'], st['rounds'])}: {st['state']}"]
    if st["assigned"]:
        lines.append(f"  assigned: {', '.join(st['assigned'])}; submitted: {', '.join(st['submitted']) or 'none'}")
    for x in st["rejected_open_round"]:
        lines.append(f"  rejected so far: {x['worker']} ({x['reason']}): {x['detail']}")
    if st["tensors_removed_through"] is not None:
        lines.append(f"  keep_rounds {st['keep_rounds']}: the tensors of rounds 1..{st['tensors_removed_through']} "
                     "are removed (their markers and summaries stay)")
    last = st["last_closed"]
    if last:
        quality = (f"test accuracy {last['test_accuracy']:.4f}, test loss {last['test_loss']:.4f}"
                   if last["test_accuracy"] is not None else "its evaluation is pending (or skipped by eval_every)")
        lines.append(f"last closed round {last['round']} ({last['closed_because']}, {last['seconds']} s): "
                     f"{quality}, train loss {last['train_loss']:.4f}, {len(last['accepted'])} accepted, "
                     f"{len(last['rejected'])} rejected, {len(last['missing'])} missing")
        for r in last["rejected"]:
            lines.append(f"  rejected {r['worker']}: {r['reason']} ({r['detail']})")
        if last.get("privacy"):
            p = last["privacy"]
            lines.append(f"  differential privacy: epsilon {p['epsilon']:.3f} spent at delta {p['delta']:g} "
                         f"({p['noise']} noise, multiplier {p['noise_multiplier']:.4g}, clip {p['clip']:.4g})")
    if st.get("dp") and not (last and last.get("privacy")):
        lines.append("differential privacy: no round has spent any budget yet (epsilon 0)")
    if st["final"]:
        lines.append(f"finished after round {st['final']['round']}: test accuracy "
                     f"{st['final']['test_accuracy']:.4f}" + (f", epsilon {st['final']['epsilon']:.3f}"
                                                               if st["final"].get("epsilon") is not None else ""))
        if st["final"].get("stopped_because"):
            lines.append(f"  ended before its last round: {st['final']['stopped_because']}")
    c = st["coordinator"]
    if c:
        lines.append(f"coordinator {c['owner']}: {c['state']}, lease refreshed {c['last_refresh_s']} s ago "
                     "(file time, as seen from here)")
    lines.append(f"coordinator key {st['coordinator_key']}")
    if st.get("secure_aggregation"):
        lines.append("updates are masked (secure aggregation): the coordinator reads only each round's sum")
    elif st.get("sealed_to"):
        lines.append(f"updates sealed to {st['sealed_to']} (only the coordinator reads them)")
    else:
        lines.append("updates are plain: everyone who reads the share reads them (confidential_updates: false)")
    if st.get("trust_problem"):
        lines.append(f"  WARNING: {st['trust_problem']}")
    for j in st["jobs"]:
        if "rows" not in j:
            lines.append(f"job {j['name']}: {j['state']}")
            continue
        by = ", ".join(f"{w} {n}" for w, n in j["by_worker"].items()) or "none yet"
        lines.append(f"job {j['name']}: {j['state']}, {j['chunks_done']}/{j['chunks']} chunks ({j['rows_done']}/"
                     f"{j['rows']} {j['inputs']} inputs), model {j['model']}; chunks by worker: {by}; plan refreshed "
                     f"{j['plan_refreshed_s']} s ago")
        if j["problems"]:
            lines.append(f"  {len(j['problems'])} output(s) not taken, last: {j['problems'][-1]['worker']} chunk "
                         f"{j['problems'][-1]['chunk']} ({j['problems'][-1]['reason']})")
    lines.append(f"workers ({len(st['workers'])}):")
    for w in st["workers"]:
        if "problem" in w:
            lines.append(f"  {w['name']}: {w['problem']}")
            continue
        cap = f", sm {w['cuda_capability']}" if w["cuda_capability"] else ""
        speed = f", {w['tokens_per_s']:.0f} tokens/s" if w["tokens_per_s"] else \
            f", {w['samples_per_s']:.0f} samples/s" if w["samples_per_s"] else ""
        if w["training_step"] != "eager":
            compiled = f" (compiled in {w['compile_s']:.0f} s)" if w["compile_s"] is not None else ""
            speed += f", {w['training_step']}{compiled}"
        if w["serves"]:
            speed += f", serves jobs at {w['infer_samples_per_s'] or 0:.0f} inputs/s"
        lines.append(f"  {w['name']}: {w['state']}, {w['device']} ({w['device_name']}{cap}, {w['precision']}{speed}), "
                     f"torch {w['torch']}, heartbeat {w['last_heartbeat_s']} s ago (file time, as seen from here)")
        own = f"; trains on {w['own_samples']} examples of its own" if w["own_samples"] is not None else ""
        lines.append(f"    key {w['key'] or 'none'}: {w['trust']}{own}")
        if w["device_fallback"]:
            lines.append(f"    WARNING: on the CPU although a GPU is present: {w['device_fallback']}")
    return "\n".join(lines)


def _where(current: int | None, rounds: int | None) -> str:
    """"round 3 of 20"; without a known total, "round 3"; before the first round, how many are to come."""
    if current is None:
        return f"no round opened yet (of {rounds})" if rounds else "no round opened yet"
    return f"round {current} of {rounds}" if rounds else f"round {current}"
