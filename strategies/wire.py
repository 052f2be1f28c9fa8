"""Wire constants: the message types, record names and keys the ServerApp and the ClientApp exchange.

Defined once here and imported by both ends of every message (the ServerApp and its strategies,
the ClientApp), as Flower keeps its own in ``common/differential_privacy_constants.py``.
Below them, typed accessors (``as_int``, ``config_record``, ...) that read a record's value or a
message's record with the type these constants give it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# -- message types (besides Flower's train / evaluate) --------------------------------------
QUERY_FEATURE_STATS = "query.feature_stats"  # round 0: each gateway's feature sums
QUERY_HE_DECRYPT = "query.he_decrypt"        # strategy=he: one gateway decrypts a sum
QUERY_MASK_KEYS = "query.mask_keys"          # strategy=mask: once a run, a gateway's public run keys
QUERY_MASK_UNMASK = "query.mask_unmask"      # strategy=mask: a survivor's shares and dropped pairs' seeds

# -- records ----------------------------------------------------------------------------------
UPDATE = "update"          # the encoded update (codec)
STATS = "stats"            # the feature sums, in plaintext
STATS_HE = "stats-he"      # the encrypted feature sums (strategy=he)
HE_UPDATE = "he-update"    # the encrypted update (strategy=he)
MASK_UPDATE = "mask-update"  # the masked update (strategy=mask): WORDS, k-bit words packed into bytes
WORDS = "words"
MASK = "mask"              # a masked update's meta: binding, bits, sealed shares, commitment, signature
MASK_KEYS = "mask-keys"    # a key set-up reply: AGREE and SIGN public keys
UNMASK = "unmask"          # an unmask reply: opened shares and seeds
AGREE = "agree"            # X25519 public key(s)
SIGN = "sign"              # Ed25519 public key(s)
BITS = "bits"              # bits per masked word
SHARES = "shares"          # sealed Shamir shares, one per cohort member in cohort order (b"" for oneself)
COMMIT = "commit"          # SHA-256 of the self-mask seed
SIGNATURE = "signature"    # Ed25519 over the contribution (strategies/mask_fedavg.py: contribution_message)
SURVIVORS = "survivors"    # an unmask request: whose masked update the server holds (node ids as strings)
DROPPED = "dropped"        # ... and who of the cohort sent none
FROM = "from"              # an unmask request / reply: whose shares follow, in order
SEEDS = "seeds"            # an unmask reply: this round's pair seed with each of DROPPED, in order
UNOPENED = "unopened"      # an unmask reply: senders whose sealed share did not open
CERT = "cert"              # a key set-up reply: the gateway's certificate from the fleet's CA (DER) ...
PROOF = "proof"            # ... and its ECDSA signature over the run keys, run and node (masking.Identity)
HE = "he"                  # the meta record of a ciphertext: key-set fingerprint and digest
GATEWAY = "gateway"        # a statistics reply: partition, examples, the sums' shape
SUM = "sum"                # a decrypt request: the summed ciphertext
SLOTS = "slots"            # a decrypt reply: the plaintext slots
CT = "ct"                  # the array of a ciphertext record
CONTRIBUTORS = "contributors"  # a decrypt request: how many contributions the sum holds
DIGEST = "digest"          # SHA-256 of the ciphertext bytes
FINGERPRINT = "fingerprint"    # the key set's fingerprint
ROWS = "rows"              # the feature sums' shape
COLS = "cols"
PARTS = "parts"            # a decrypt request: the bound contributions, one ciphertext array per node id
REFUSED = "refused"        # a decrypt reply: contributions whose binding the gateway refused
NODES = "nodes"            # a decrypt request / refusal: node ids (as strings: they are uint64)
TAGS = "tags"              # a decrypt request: each contribution's binding tag, in the order of ``nodes``
REASON = "reason"          # a refusal: why, in one line
KIND = "kind"              # what a ciphertext holds: HE_KIND_UPDATE or HE_KIND_STATS
RUN_ID = "run-id"          # a ciphertext's binding: the run (as a string: uint64)
NODE_ID = "node-id"        # a ciphertext's binding: the gateway that made it (as a string: uint64)
TAG = "tag"                # a ciphertext's binding: HMAC-SHA256 under gateway-only key material
HE_KIND_UPDATE = "update"  # a model update (strategy=he)
HE_KIND_STATS = "stats"    # the round-0 feature statistics, first pass: counts and sums (strategy=he)
HE_KIND_CENTRED = "centred"  # ... second pass: squared deviations from the fleet's centre (tasks/moments.py)
NORM_CENTRE = "norm-centre"  # a statistics query, second pass (strategy=he): the fleet's centre, flattened
STATS_ROUND = 0            # the server-round the feature statistics are bound to

# -- server -> gateway: the train config ------------------------------------------------------
SERVER_ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
OPTIMIZER = "optimizer"      # train message: the local optimiser, adam | sgd (absent: adam)
MOMENTUM = "momentum"        # train message: sgd's momentum
PROXIMAL_MU = "proximal-mu"  # train message: FedProx's mu (Flower's FedProx key; absent: 0)
PERSONALISE_EPOCHS = "personalise-epochs"  # final evaluate message: fine-tune a copy on the plant's data first
PERSONAL = "personal-"       # final evaluate reply: prefix of the fine-tuned (personalised) model's metrics
CONTROL = "control"          # train message (strategy=scaffold): the server's control variate c, per parameter
CONTROL_DELTA = "control-delta"  # reply (strategy=scaffold): the gateway's c_i+ - c_i, per parameter
BATCH_SIZE = "batch-size"
NORM_SUMS = "norm-sums"                  # the fleet's feature sums, flattened
NORM_COLS = "norm-cols"                  # ... and their number of columns
SEEDED_START = "seeded-start"          # first round: build the task's seeded initial model, this digest
BASE_ROUND = "base-round"                # a delta downlink is against the model of this round
HE_RANGES = "he-ranges"                  # strategy=he / mask: per-tensor clipping ranges
HE_WEIGHT = "he-weight"                  # strategy=he / mask: this gateway's FedAvg weight
HE_FINGERPRINT = "he-fingerprint"        # strategy=he: the key set the server uses
HE_DP_CLIP = "he-dp-clip"                # distributed DP: clip the update to this L2 norm
HE_DP_SIGMA = "he-dp-sigma"              # distributed DP: this gateway's noise share (std)
SECAGG_WEIGHT_SCALE = "secagg-weight-scale"  # SecAgg+: example counts scaled to max_weight
MIN_AGGREGATE = "min-aggregate"          # a decrypt request: the fewest contributions allowed
MASK_NODES = "mask-nodes"                # strategy=mask: the round's cohort (node ids as strings) ...
MASK_AGREE = "mask-agree"                # ... their X25519 run keys and ...
MASK_SIGN = "mask-sign"                  # ... their Ed25519 run keys, in the same order
MASK_CERTS = "mask-certs"                # ... and, the first time, each one's certificate and proof (b"": sent
MASK_PROOFS = "mask-proofs"              # before); absent when no gateway has an identity

# -- gateway -> server: reply metrics ---------------------------------------------------------
NUM_EXAMPLES = "num-examples"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
OBJECTS_DOWN = "objects-down"
OBJECTS_UP = "objects-up"
T_PROC = "t-proc"        # when the ClientApp process started
T_START = "t-start"      # when the handler started
T_PULL = "t-pull"        # warm runtime: when the task's process asked the SuperNode for its message ...
T_PULLED = "t-pulled"    # ... and when it had it (objects and FAB); absent with Flower's own flwr-clientapp
T_END = "t-end"          # when the reply was ready
RESIDUAL_NORM = "residual-norm"
TRAIN_LOSS = "train_loss"
DP_SIGMA = "dp-sigma"
DP_CLIP = "dp-clip"
DP_DELTA = "dp-delta"
DP_BUDGET = "dp-budget"
DP_BUDGET_LEFT = "dp-budget-left"
DP_EPSILON = "dp-epsilon"
DP_STOPPED = "dp-stopped"
DP_Q = "dp-q"
DP_STEPS = "dp-steps"
DP_WEIGHT = "dp-weight"
DP_HISTORY_SIGMA = "dp-history-sigma"  # the device's DP-SGD history so far, steps summed per (sigma, q),
DP_HISTORY_Q = "dp-history-q"          # in every sample-level reply (a reply the server never got is covered
DP_HISTORY_STEPS = "dp-history-steps"  # by the next); padded with zero steps to fleet.rounds entries
SECAGG_SATURATED = "secagg-saturated"
HE_SATURATED = "he-saturated"


# -- typed access ------------------------------------------------------------------------------
# A record's values are typed as any value a record can hold, a RecordDict's as any record
# kind; these read one with the type the protocol above gives it. The values convert with
# int() / float() / str(), as the code did inline before.

_Record = TypeVar("_Record", ArrayRecord, ConfigRecord, MetricRecord)


class RecordKindError(TypeError):
    """A message or state record is of another kind than the protocol says (a malformed reply)."""


def as_int(value: Any) -> int:
    return int(value)


def as_float(value: Any) -> float:
    return float(value)


def as_str(value: Any) -> str:
    return str(value)


def as_ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def as_floats(value: Any) -> list[float]:
    return [float(v) for v in value]


def as_bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def as_bytes_list(value: Any) -> list[bytes]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of bytes, got {type(value).__name__}")
    return [as_bytes(v) for v in value]


def _record(content: RecordDict, key: str, kind: type[_Record]) -> _Record:
    record = content[key]
    if not isinstance(record, kind):
        raise RecordKindError(f"record {key!r} is a {type(record).__name__}, the protocol sends a {kind.__name__}")
    return record


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    """``content[key]``, which must be an ArrayRecord (KeyError if absent, RecordKindError if another kind)."""
    return _record(content, key, ArrayRecord)


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    """``content[key]``, which must be a ConfigRecord (KeyError if absent, RecordKindError if another kind)."""
    return _record(content, key, ConfigRecord)


def metric_record(content: RecordDict, key: str) -> MetricRecord:
    """``content[key]``, which must be a MetricRecord (KeyError if absent, RecordKindError if another kind)."""
    return _record(content, key, MetricRecord)
