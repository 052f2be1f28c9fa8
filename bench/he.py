"""Encrypted aggregation benchmark: one JSON line per method, same 1M-parameter update, this machine.

Methods: ``plaintext`` (float32 FedAvg as Flower aggregates it), ``ckks_nvflare``
(TenSEAL CKKS, N=8192, coeff moduli [60, 40, 40], scale 2^40: NVFLARE's HE configuration),
``iiotfl_he`` (strategies/he.py: BFV N=4096, int8 packed 4 per slot), ``secagg_plus``
(Flower's SecAgg+ client masking and server unmasking primitives, 3 neighbours), ``iiotfl_mask``
(strategies/masking.py: int8 steps in k-bit words, X25519 pairwise and Shamir-shared self masks,
the gateway's whole round: quantise, mask, pack, seal shares, sign; the server's: unpack, sum,
rebuild the self masks, unmask).

Figures per device and round for 1M parameters: bytes (and ÷ plaintext), encrypt
(device, one core), server aggregation per update, decrypt of the sum; for every method
also what a gateway moves in a whole round, both ways, key set-up amortised over
``--rounds`` (``round_bytes_over_plaintext``), set-up bytes per run, message exchanges per
round, the collusion threshold (gateways that, with the server, read one update) and the
dropout tolerance (of ``--devices``). Targets: iiotfl_he bytes ≤ 1.3 × plaintext, encrypt
≤ 0.3 s, aggregation ≤ 3 × plaintext; iiotfl_mask round bytes ≤ 1.0 × plaintext.

``--fleet``: also one round of plaintext / HE / SecAgg+ on a 10-gateway nb_iot fleet
(engine=sim; the simulated clock: compute + bytes over the link + round trips).

Usage: python bench/he.py [--params N] [--devices D] [--fleet]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iiotfl.strategies import he

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def plaintext(updates, counts):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [ArrayRecord({"w": Array(u)}) for u in updates]
    nbytes = records[0].count_bytes()
    contents = [RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": int(c)})})
                for r, c in zip(records, counts)]
    agg, _ = timed(lambda: aggregate_arrayrecords(contents, "num-examples"))
    return {"bytes": nbytes, "encrypt_s": 0.0, "aggregate_s_per_update": agg / len(updates), "decrypt_s": 0.0}


def ckks_nvflare(updates, counts):
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    w = counts / counts.sum()
    enc, vecs = timed(lambda: ts.ckks_vector(ctx, (updates[0] * w[0]).tolist()), repeat=1)
    nbytes = len(vecs.serialize())
    blobs = [vecs.serialize()] + [ts.ckks_vector(ctx, (u * wi).tolist()).serialize() for u, wi in zip(updates[1:3], w[1:3])]

    def aggregate():
        total = ts.ckks_vector_from(ctx, blobs[0])
        for b in blobs[1:]:
            total += ts.ckks_vector_from(ctx, b)
        return total

    agg, total = timed(aggregate, repeat=1)
    dec, _ = timed(lambda: total.decrypt(), repeat=1)
    return {"bytes": nbytes, "encrypt_s": enc, "aggregate_s_per_update": agg / len(blobs), "decrypt_s": dec}


def iiotfl_he(updates, counts):
    keys = he.KeySet.generate()
    rng = np.random.default_rng(0)
    weights = counts * len(counts) / counts.sum()
    ranges = np.full(updates[0].size, 4 * float(np.abs(updates[0]).max()))
    torch.set_num_threads(1)
    enc, (payload, _) = timed(lambda: he.encrypt_update(keys, updates[0], ranges, weights[0], rng))
    payloads = [payload] + [he.encrypt_update(keys, u, ranges, w, rng)[0] for u, w in zip(updates[1:], weights[1:])]
    agg, total = timed(lambda: keys.add(payloads))
    dec, slots = timed(lambda: keys.decrypt_slots(total), repeat=1)
    mean = he.decode_sum(slots, updates[0].size, ranges, weights.sum())
    exact = sum(w * u for w, u in zip(counts / counts.sum(), updates))
    return {"bytes": len(payload), "encrypt_s": enc, "aggregate_s_per_update": agg / len(payloads), "decrypt_s": dec,
            "max_error": float(np.abs(mean - exact).max()),
            "error_bound": float(he.error_bound(ranges[:1], len(updates), weights.sum())[0])}


def secagg_plus(updates, counts, neighbours: int = 3):
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    clip, qrange, mod = 8.0, 2**22, 2**32

    def mask(u):  # what secaggplus_mod does in stage 2: quantise, add private and pairwise masks
        q = quantize([u], clip, qrange)
        for seed in range(neighbours + 1):
            q = parameters_addition(q, pseudo_rand_gen(bytes([seed]) * 32, mod, [u.shape]))
        return parameters_mod(q, mod)

    enc, masked = timed(lambda: mask(updates[0]), repeat=1)
    nbytes = len(ndarray_to_bytes(masked[0]))
    vectors = [masked] + [mask(u) for u in updates[1:3]]

    def aggregate():
        total = vectors[0]
        for v in vectors[1:]:
            total = parameters_addition(total, v)
        return parameters_mod(total, mod)

    agg, total = timed(aggregate, repeat=1)
    dec, _ = timed(lambda: parameters_mod(parameters_addition(total, pseudo_rand_gen(b"\0" * 32, mod,
                                                                                    [updates[0].shape])), mod), 1)
    return {"bytes": nbytes, "encrypt_s": enc, "aggregate_s_per_update": agg / len(vectors),
            "decrypt_s": dec * len(updates), "note": "decrypt = unmask: one private-mask PRG per gateway"}


def iiotfl_mask(updates, counts, rounds: int = 8):
    """The gateways' and the server's own code (strategies/mask_fedavg.py): key set-up with identities
    from `iiotfl certs`, a round's masked updates, the unmask exchange; bytes as the records count them."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from iiotfl.configs import compose
    from iiotfl.security import certs
    from iiotfl.strategies import masking, wire
    from iiotfl.strategies.codecs import get_codec
    from iiotfl.strategies.mask_fedavg import (
        Cohort,
        Masked,
        MaskFedAvg,
        key_reply,
        masked_update,
        unmask_answer,
        unmask_reply,
        unmask_request,
    )

    n, size = len(updates), updates[0].size
    nodes = list(range(1, n + 1))
    cfg = compose(["strategy=mask", f"fleet.gateways={n}"])
    weights = dict(zip(nodes, counts * n / counts.sum()))
    ranges = [4 * float(np.abs(updates[0]).max())]
    view = {"w": np.zeros(size, np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        certs.create(tmp, gateways=n)
        contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
            "identity-cert": str(certs.gateway_crt(tmp, i)), "identity-key": str(certs.gateway_tls_key(tmp, i)),
            "identity-ca": str(Path(tmp) / certs.CA_CRT)}) for i, node in enumerate(nodes)}
        keys = {node: key_reply(ctx, 1)[wire.MASK_KEYS] for node, ctx in contexts.items()}  # the set-up, once a run
        cohort = Cohort(nodes, [wire.as_bytes(keys[m][wire.AGREE]) for m in nodes],
                        [wire.as_bytes(keys[m][wire.SIGN]) for m in nodes]).record()
        vouchers = {wire.MASK_CERTS: [keys[m][wire.CERT] for m in nodes],
                    wire.MASK_PROOFS: [keys[m][wire.PROOF] for m in nodes]}

        def config(node, server_round):  # what the train message adds to the model: ranges, weight, the cohort
            first = vouchers if server_round == 1 else {}  # peers' certificates: the first round only
            return ConfigRecord({wire.SERVER_ROUND: server_round, wire.HE_RANGES: ranges,
                                 wire.HE_WEIGHT: float(weights[node]), **cohort, **first})

        rng = np.random.default_rng(0)
        for node in nodes:  # round 1 (the peers' certificates checked); round 2 is timed
            masked_update(contexts[node], config(node, 1), updates[0], view, cfg, rng, 1)
        enc, _ = timed(lambda: masked_update(contexts[1], config(1, 2), updates[0], view, cfg, rng, 1), repeat=1)
        out = {node: masked_update(contexts[node], config(node, 3), u, view, cfg, rng, 1)[0]
               for node, u in zip(nodes, updates)}
    bits = masking.bits_for(n)
    up = sum(r.count_bytes() for r in out[1].values())
    strategy = MaskFedAvg(threshold=0.5, min_cohort=3, codec=get_codec(None), fraction_train=1.0,
                          min_available_nodes=1)
    strategy.members, strategy.weights = nodes, weights

    def aggregate():
        return [Masked(node, masking.unpack(r[wire.MASK_UPDATE][wire.WORDS].numpy(), size, bits),
                       wire.as_bytes_list(r[wire.MASK][wire.SHARES]), wire.as_bytes(r[wire.MASK][wire.COMMIT]))
                for node, r in out.items()]

    agg, parts = timed(aggregate, repeat=1)
    requests = {node: unmask_request(parts, nodes, node, 3, []) for node in nodes}
    answers = {node: unmask_reply(requests[node], contexts[node], cfg, 1) for node in nodes}
    t = masking.threshold_for(n, 0.5)
    dec, summed = timed(lambda: strategy._unmasked(parts, 3, size, [], {node: unmask_answer(a)
                                                                        for node, a in answers.items()}, t), repeat=1)
    mean = he.decode_digits(summed.slots, np.full(size, ranges[0]), sum(weights.values()))
    exact = sum(w * u for w, u in zip(counts / counts.sum(), updates))
    later = ConfigRecord(cohort).count_bytes()
    first = ConfigRecord({**cohort, **vouchers}).count_bytes()
    return {"bytes": up, "encrypt_s": enc, "aggregate_s_per_update": agg / n, "decrypt_s": dec,
            # a round beyond the model: the cohort in the train message, the unmask request; up: the answer
            "extra_down_per_round": later + requests[1]["config"].count_bytes(),
            "extra_up_per_round": answers[1][wire.UNMASK].count_bytes(),
            # once a run: the run keys with certificate and proof up, the peers' certificates down
            "setup_bytes_per_run": keys[1].count_bytes() + first - later,
            "max_error": float(np.abs(mean - exact).max()),
            "error_bound": float(he.error_bound(np.full(1, ranges[0]), n, sum(weights.values()))[0]), "bits": bits,
            "threshold": t, "rounds_amortised": rounds}


# what each method needs a round, and which coalitions and dropouts it survives, for D gateways
def properties(method: str, devices: int, row: dict) -> dict:
    t = row.get("threshold")
    return {
        "plaintext": {"exchanges_per_round": 1, "collusion_threshold": 0, "dropout_tolerance": devices - 1},
        "ckks_nvflare": {"exchanges_per_round": 1, "collusion_threshold": 1, "dropout_tolerance": devices - 1},
        # one gateway decrypts: it gets every ciphertext of the round (amortised over the fleet)
        "iiotfl_he": {"exchanges_per_round": 2, "collusion_threshold": 1, "dropout_tolerance": devices - 2},
        # Flower's defaults here: num_shares 1.0 (all), reconstruction_threshold 0.67
        "secagg_plus": {"exchanges_per_round": 4, "collusion_threshold": math.ceil(0.67 * devices),
                        "dropout_tolerance": devices - math.ceil(0.67 * devices)},
        "iiotfl_mask": {"exchanges_per_round": 2, "collusion_threshold": t,
                        "dropout_tolerance": devices - max((t or 0) + 1, 3)},
    }[method]


def round_bytes(method: str, row: dict, model_bytes: int, devices: int) -> float:
    """Bytes a gateway moves in a round, both ways, set-up amortised (the model goes down as float32 in all)."""
    up = row["bytes"]
    if method == "iiotfl_he":  # the decrypting gateway gets every ciphertext and returns the slots
        return model_bytes + up + (devices * up + up) / devices
    if method == "iiotfl_mask":
        return (model_bytes + up + row["extra_down_per_round"] + row["extra_up_per_round"]
                + row["setup_bytes_per_run"] / row["rounds_amortised"])
    return model_bytes + up


def fleet_round(strategy: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = subprocess.run([str(Path(sys.executable).parent / "iiotfl"), "run", "engine=sim", "fleet.gateways=10",
                               "fleet.rounds=1", "link=nb_iot", f"strategy={strategy}", f"hydra.run.dir={run_dir}"],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return float("nan")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return float(rows[1]["sim_round_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--fleet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, args.params).astype(np.float32) for _ in range(args.devices)]
    counts = rng.integers(100, 5000, args.devices).astype(float)
    base = None
    for name, fn in (("plaintext", plaintext), ("ckks_nvflare", ckks_nvflare), ("iiotfl_he", iiotfl_he),
                     ("secagg_plus", secagg_plus), ("iiotfl_mask", iiotfl_mask)):
        row = {"method": name, "params": args.params, **fn(updates, counts)}
        base = base or row
        row["bytes_over_plaintext"] = row["bytes"] / base["bytes"]
        row["round_bytes_over_plaintext"] = (round_bytes(name, row, base["bytes"], args.devices)
                                             / round_bytes("plaintext", base, base["bytes"], args.devices))
        row["aggregate_over_plaintext"] = row["aggregate_s_per_update"] / base["aggregate_s_per_update"]
        row["device_s_per_1m_params"] = row["encrypt_s"] * 1_000_000 / args.params
        row.update(properties(name, args.devices, row))
        if args.fleet:
            strategy = {"plaintext": "fedavg", "iiotfl_he": "he", "secagg_plus": "secagg",
                        "iiotfl_mask": "mask"}.get(name)
            if strategy:
                row["nb_iot_10_gateways_sim_round_s"] = fleet_round(strategy)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
