"""What the worker and the coordinator of a secure-aggregation round both read the same way (docs/PROTOCOL.md
section 5.16): the coordinator's rosters, the round's graph and encoding as roster 1 fixes them, and the masked
input's file."""

from __future__ import annotations

from fedsync.aggregation.privacy.noise import HEADROOM_SIGMAS
from fedsync.aggregation.privacy.settings import DPSettings
from fedsync.aggregation.secagg.encoding import Encoding
from fedsync.aggregation.secagg.graph import build
from fedsync.aggregation.secagg.rounds import Round
from fedsync.storage import names
from fedsync.storage.markers import Assignment
from fedsync.storage.secagg_files import SecaggRoster, roster_message
from fedsync.storage.share import Share
from fedsync.storage.signing import verify

SLICE = 1 << 20  # words masked at a time: 4 MiB
MASKED = "masked"  # the one tensor of a masked input file
ENCODING = "secagg"  # what its marker's `encoding` says


def read_roster(share: Share, run_id: str, r: int, step: int, coordinator_key: str) -> SecaggRoster | None:
    """Roster `step` of round r when it is there, whole, and the coordinator's; else None (not yet, or not its)."""
    try:
        roster = share.read_record(SecaggRoster, names.secagg_roster(r, step))
    except Exception:  # noqa: BLE001 - absent, not synced whole yet, or not a roster: not one to act on
        return None
    if roster.run_id != run_id or roster.round != r or roster.step != step or \
            not verify(coordinator_key, roster_message(roster), roster.signature):
        return None
    return roster


def round_of(roster: SecaggRoster, a: Assignment) -> Round:
    """The round as roster 1 fixes it: the graph over the workers it names, from the assigned model's hash."""
    return Round(roster.run_id, roster.round, build(roster.workers, a.model.blake3))


def publics(roster: SecaggRoster) -> tuple[dict[str, str], dict[str, str]]:
    """Each named worker's envelope key and mask key, as roster 1 lists them."""
    pairs = {w: roster.keys[w].split(" ") for w in roster.workers}
    return {w: p[0] for w, p in pairs.items()}, {w: p[1] for w, p in pairs.items()}


def encoding(roster: SecaggRoster, dp: DPSettings | None) -> Encoding:
    """The round's integer encoding; with distributed dp noise, room in the sum for ten of the noise's standard
    deviations (noise_multiplier x clip)."""
    distributed = dp is not None and dp.noise == "distributed"
    headroom = HEADROOM_SIGMAS * dp.noise_multiplier * roster.clip if distributed else 0.0  # type: ignore[union-attr]
    return Encoding(roster.clip, roster.max_weight, len(roster.workers), headroom)
