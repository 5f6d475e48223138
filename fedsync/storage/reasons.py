"""Why an update was not counted: one code per reason, each with the fix a person can apply."""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    MARKER_UNREADABLE = "marker_unreadable"
    MARKER_INVALID = "marker_invalid"
    FORMAT_MISMATCH = "format_mismatch"
    WRONG_ROUND = "wrong_round"
    WRONG_WORKER = "wrong_worker"
    WRONG_BASE = "wrong_base"
    BAD_PATH = "bad_path"
    NOT_ASSIGNED = "not_assigned"
    UNTRUSTED_KEY = "untrusted_key"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    BAD_SAMPLES = "bad_samples"
    MISSING_FILE = "missing_file"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    NOT_SAFETENSORS = "not_safetensors"
    MISSING_TENSOR = "missing_tensor"
    EXTRA_TENSOR = "extra_tensor"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    BAD_ENCODING = "bad_encoding"
    NOT_SEALED = "not_sealed"
    UNDECRYPTABLE = "undecryptable"
    NORM_OUTLIER = "norm_outlier"
    INVALID_STATE = "invalid_state"
    OFF_DIRECTION = "off_direction"
    DIVERGED = "diverged"
    SPOILS_AGGREGATE = "spoils_aggregate"
    DUPLICATE = "duplicate"
    SECURE_STEP = "secure_step"
    IO_ERROR = "io_error"

    @property
    def help(self) -> str:
        return HELP[self]

    @property
    def syncing(self) -> bool:
        """True when the bytes may simply not have arrived yet (the usual reason to wait, not worth a line)."""
        return self in (Reason.MARKER_UNREADABLE, Reason.MARKER_INVALID, Reason.MISSING_FILE, Reason.SIZE_MISMATCH,
                        Reason.HASH_MISMATCH, Reason.IO_ERROR)

    @property
    def waits(self) -> bool:
        """True when the bytes may not have arrived yet, or the marker may not be its worker's own (decided before
        its signature is checked): a later change may still bring the real update, so it is rejected only at the
        close. A forger writing under a worker's name must not shut that worker out of the round."""
        return self in (Reason.MARKER_UNREADABLE, Reason.MARKER_INVALID, Reason.FORMAT_MISMATCH, Reason.BAD_PATH,
                        Reason.WRONG_ROUND, Reason.WRONG_WORKER, Reason.WRONG_BASE, Reason.UNTRUSTED_KEY,
                        Reason.UNSIGNED, Reason.BAD_SIGNATURE, Reason.MISSING_FILE, Reason.SIZE_MISMATCH,
                        Reason.HASH_MISMATCH, Reason.IO_ERROR)


HELP: dict[Reason, str] = {
    Reason.MARKER_UNREADABLE: "the update's YAML marker is not valid YAML, uses aliases, or is over 1 MiB",
    Reason.MARKER_INVALID: "the marker lacks a field or a field has the wrong type; compare with PROTOCOL.md",
    Reason.FORMAT_MISMATCH: "the worker writes another share format version; run the same fedsync version",
    Reason.WRONG_ROUND: "the marker names another round than the folder it is in",
    Reason.WRONG_WORKER: "the marker's worker field differs from its file name",
    Reason.WRONG_BASE: "the update was trained from another global model than this round's",
    Reason.BAD_PATH: "the marker names a file other than updates/<worker>.safetensors ('..', absolute), or a "
                     "file of the update is a symbolic link",
    Reason.NOT_ASSIGNED: "the worker was not assigned work in this round (unknown, or joined after it opened)",
    Reason.UNTRUSTED_KEY: "the worker's key is not the one trusted for its name (changed since it was pinned, or "
                          "not approved under trust: explicit); `fedsync trust NAME` approves its current key",
    Reason.UNSIGNED: "the marker carries no signature (an older or hand-made worker)",
    Reason.BAD_SIGNATURE: "the marker's signature does not verify with the worker's trusted key: forged, replayed, "
                          "renamed, or edited after signing",
    Reason.BAD_SAMPLES: "the sample count is below 1 or claims more than the worker could train on: the rows of its "
                        "shard (less those held out for federated evaluation), local_steps x batch_size, or the "
                        "examples it registered",
    Reason.MISSING_FILE: "the tensor file the marker names never arrived before the deadline",
    Reason.SIZE_MISMATCH: "the tensor file's size differs from the marker's (truncated or not synced)",
    Reason.HASH_MISMATCH: "the tensor file's BLAKE3 hash differs from the marker's (corrupt or not synced)",
    Reason.NOT_SAFETENSORS: "the tensor file is not a safetensors file (bad header, pickle, random bytes)",
    Reason.MISSING_TENSOR: "a tensor of the global model is absent from the update",
    Reason.EXTRA_TENSOR: "the update holds a tensor the global model does not have",
    Reason.WRONG_SHAPE: "a tensor's shape differs from the global model's",
    Reason.WRONG_DTYPE: "a tensor's dtype differs from the global model's",
    Reason.NON_FINITE: "the update holds NaN or infinite values",
    Reason.BAD_ENCODING: "the marker names an encoding this coordinator does not know, or an int8 update's scales are "
                         "negative, not finite, or come after their values (PROTOCOL.md section 5.13)",
    Reason.NOT_SEALED: "the run keeps updates confidential (confidential_updates: true) but the marker says its "
                       "tensor file is not sealed to the coordinator (encryption: none): an old or hand-made worker "
                       "left its update readable by everyone who reads the share",
    Reason.UNDECRYPTABLE: "the sealed tensor file has the marker's hash but does not open with the coordinator's key "
                          "(sealed to another key, not an age file, or altered before it was hashed)",
    Reason.NORM_OUTLIER: "the update is far larger than the round's others or than the model itself (screening: "
                         "screen_factor, screen_max_ratio); a diverging worker: lower lr",
    Reason.INVALID_STATE: "the update would give the worker's own model a state honest training cannot reach: a "
                          "negative BatchNorm variance, or a batch count that shrank or grew by more than one a step",
    Reason.OFF_DIRECTION: "the update, over twice the round's median norm, points away from the round's consensus "
                          "(the coordinate-wise median of the accepted updates) while the others agree with it "
                          "(screen_direction): a flipped or poisoned update",
    Reason.DIVERGED: "the worker's local training diverged (non-finite loss or values) and it uploaded nothing; "
                     "lower lr",
    Reason.SPOILS_AGGREGATE: "with this update (the largest) the new global model would not be finite or not valid "
                             "(a negative BatchNorm variance or batch count)",
    Reason.DUPLICATE: "the worker's files changed after its update was decided; the first decision stands, unless "
                      "its accepted tensor file itself changed before the close: then it no longer counts",
    Reason.SECURE_STEP: "secure aggregation: the worker's file for a step of the round (its keys, envelopes, masked "
                        "input or revealed shares) is missing at the step's deadline, not signed with its trusted key, "
                        "or does not hold what the step needs (PROTOCOL.md section 5.16)",
    Reason.IO_ERROR: "the file could not be read at the deadline (permissions, vanished, share unmounted)",
}


class Unusable(Exception):
    """A tensor file that cannot be counted, with the reason code recorded in summary.yaml."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
