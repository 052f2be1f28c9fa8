"""The ServerApp: one federated run, from normalisation statistics to the final model.

1. Wait until the fleet's gateways are connected.
2. Ask every gateway for its per-condition feature sums (``query.feature_stats``) and
   add them up: the fleet-wide normalisation, without any plant's own statistics.
3. Run the configured strategy (FedAvg with the update codec, ``strategies/``) for
   ``fleet.rounds`` rounds through a :class:`DeadlineGrid` (round deadline, first K
   replies, minimum replies). After every round the global model is scored on the
   held-out set and one line is appended to ``metrics.jsonl`` with the figures of
   every sampled gateway (this is what ``iiotfl run`` shows as progress).
4. Write the final model, ``metrics.json`` and the report into the output directory. Every
   global model (``checkpoints/round-N.ckpt``, the final ``model.ckpt``) is written
   encrypted and signed (``server/artefacts.py``).
"""

from __future__ import annotations

import json
import time
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from iiotfl.configs import from_run_config
from iiotfl.links.profiles import gateway_profiles, link_time, transfer_time
from iiotfl.privacy.accounting import accounting_check
from iiotfl.privacy.ledger import Ledger, keep_rounds
from iiotfl.privacy.ledger import load as load_ledger
from iiotfl.security.artefacts import FINAL_CHECKPOINT, save_checkpoint
from iiotfl.links.shaping import veth_counters
from iiotfl.strategies.client_dp import rounds_within_budget
from iiotfl.links.outages import Outages
from iiotfl.server.report import write_report
from iiotfl.server.rounds import DeadlineGrid
from iiotfl.strategies import build_strategy
from iiotfl.tasks import get_task

app = ServerApp()


class RoundLog:
    """Collects per-round figures and appends them to ``metrics.jsonl`` as they happen.

    Per gateway and round: application bytes (Flower message payload, both ways), wire
    bytes (its veth counters, on a shaped fleet), and the round time split into compute
    (the ClientApp's handler), transfer (bytes over the link rates plus round trips,
    ``clients/profiles.py``) and waiting (the rest: Flower's polling, process start-up,
    queueing behind other gateways, outages). ``bound_s`` = compute + transfer;
    ``sim_s`` is the simulated clock (bound + Flower's overhead + outage waiting).
    """

    def __init__(self, path: Path, cfg: dict[str, Any], grid: DeadlineGrid, engine: str,
                 keep_upto: int | None = None) -> None:
        self.path = path
        kept = keep_rounds(path, keep_upto)  # a resumed run keeps its completed rounds
        self.start = time.time()
        self.last = self.start
        self.grid = grid
        self.engine = engine
        self.clients: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = kept
        self.profiles = {p.index: p for p in gateway_profiles(cfg)}
        self.node_partition: dict[int, int] = {}
        links = _read_json(path.parent / "links.json")
        self.devs = {int(g["index"]): g["host_dev"] for g in links.get("gateways", []) if g.get("host_dev")}
        self.counters = self.read_counters()
        # engine=sim: a simulated clock that also knows the outage schedule
        self.outages = Outages(cfg, [])
        self.deadline = float(cfg["fleet"]["round_timeout"])
        self.sim_clock = 0.0

    def read_counters(self) -> dict[int, dict[str, int]]:
        return {i: c for i, dev in self.devs.items() if (c := veth_counters(dev)) is not None}

    def _gateways(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        trace = self.grid.train_trace
        now_counters = self.read_counters()
        self.clients = [trace.metrics[n] for n in trace.replied if n in trace.metrics]
        rows = []
        for node, pushed in trace.sent.items():
            part = self.node_partition.get(node)
            c = trace.metrics.get(node)
            prof = self.profiles.get(part) if part is not None else None
            row: dict[str, Any] = {"partition": part, "node": node, "class": prof.label if prof else None}
            if c is not None:
                row["metrics"] = {k: v for k, v in c.items() if k.startswith("dp-")}
            if c is not None and c.get("dp-stopped"):
                row.update(status="budget-spent", bytes_up=0, epsilon=c.get("dp-epsilon"))
            elif node in trace.replied and c is not None and prof is not None:
                measured = trace.replied[node] - pushed
                compute = float(c["t-end"] - c["t-start"])
                objects = (c.get("objects-down"), c.get("objects-up"))
                transfer = transfer_time(prof.link, c["bytes-down"], c["bytes-up"], *objects)
                share = 1.0 if self.engine == "sim" else None
                wait_outage = 0.0
                if self.engine == "sim":
                    back = self.outages.up_again(part, self.sim_clock, len(self.rows))
                    wait_outage = back - self.sim_clock
                row.update(
                    status="aggregated", bytes_down=c["bytes-down"], bytes_up=c["bytes-up"],
                    round_s=measured, compute_s=compute, transfer_s=transfer,
                    wait_s=max(0.0, measured - compute - transfer),
                    # of the waiting: before the ClientApp process existed (Flower's pull interval,
                    # the downlink), its start-up (interpreter, imports), after the reply left
                    before_process_s=float(c["t-proc"]) - pushed if "t-proc" in c else None,
                    startup_s=float(c["t-start"] - c["t-proc"]) if "t-proc" in c else None,
                    after_reply_s=trace.replied[node] - float(c["t-end"]),
                    bound_s=compute + transfer,
                    sim_s=link_time(prof.link, prof.device, compute, c["bytes-down"], c["bytes-up"],
                                    outage_wait_s=wait_outage, measured_on_share=share,
                                    objects_down=objects[0], objects_up=objects[1]),
                    train_loss=c.get("train_loss"),
                )
            else:
                row["status"] = ("late" if node in trace.late else "extra" if node in trace.extra
                                 else "error" if node in trace.errors else "unknown")
            if part in now_counters and part in self.counters:
                row["wire_up"] = now_counters[part]["up"] - self.counters[part]["up"]
                row["wire_down"] = now_counters[part]["down"] - self.counters[part]["down"]
            rows.append(row)
        self.counters = now_counters
        aggregated = [r for r in rows if r.get("status") == "aggregated"]
        if self.engine == "sim":
            # on the simulated clock a gateway past the deadline would have been late
            for r in aggregated:
                if r["sim_s"] > self.deadline:  # would have missed the deadline (outage, slow link)
                    r["sim_late"], r["sim_s"] = True, self.deadline
        sim_round = min(self.deadline, max((r["sim_s"] for r in aggregated), default=0.0))
        if self.engine == "sim":
            self.sim_clock += sim_round
        summary = {
            "sampled": len(trace.sent),
            "aggregated": len(aggregated),
            "late": sorted(r["partition"] for r in rows if r["status"] == "late" and r["partition"] is not None),
            "skipped": trace.below_minimum,
            "train_s": trace.ended - trace.started,
            "sim_round_s": sim_round,
            "bound_round_s": max((r["bound_s"] for r in aggregated), default=0.0),
            "sim_late": sorted(r["partition"] for r in aggregated if r.get("sim_late")),
        }
        return sorted(rows, key=lambda r: (r["partition"] is None, r["partition"])), summary

    def write(self, server_round: int, evaluation: dict[str, float], privacy: dict[str, float] | None = None) -> None:
        now = time.time()
        gateways, summary = self._gateways() if server_round else ([], {})
        device_eps = [g["metrics"]["dp-epsilon"] for g in gateways if "dp-epsilon" in g.get("metrics", {})]
        if device_eps:
            privacy = {**(privacy or {}), "device_epsilon_max": max(device_eps)}
        row = {
            "round": server_round,
            "time": now - self.start,
            "round_time": now - self.last if server_round else 0.0,
            "server": evaluation,
            "privacy": privacy or {},
            **summary,
            "clients": self.clients,
            "gateways": gateways,
        }
        self.last = now
        self.clients = []
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.time() > deadline:
            return nodes
        time.sleep(0.5)


def federated_feature_sums(grid: Grid, nodes: list[int], timeout: float, keys=None, min_aggregate: int = 2):
    """Fleet-wide per-condition (count, sum, sum of squares), node -> partition, bytes, examples.

    With ``keys`` (strategy=he) every gateway sends its statistics encrypted; the server
    adds the ciphertexts and one gateway decrypts the sum: no plant's own statistics are
    ever seen (the same path as the model updates, ``strategies/he_fedavg.py``)."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.feature_stats")
        for n in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=timeout) if r.has_content()]
    if not replies:
        raise RuntimeError("no gateway answered the feature-statistics query; check the SuperNode logs")
    gateways = {r.metadata.src_node_id: r.content["gateway"] for r in replies}
    partitions = {n: int(g["partition"]) for n, g in gateways.items()}
    examples = {n: int(g["num-examples"]) for n, g in gateways.items()}
    if keys is None:
        nbytes = {r.metadata.src_node_id: r.content["stats"].count_bytes() for r in replies}
        return sum(r.content["stats"].to_numpy_ndarrays()[0] for r in replies), partitions, nbytes, examples
    from iiotfl.strategies import he
    from iiotfl.strategies.he_fedavg import decrypt_sum, verified_payload

    shape = {(int(g["rows"]), int(g["cols"])) for g in gateways.values()}
    if len(shape) != 1:
        raise RuntimeError(f"gateways disagree on the statistics' shape {sorted(shape)}; they run different tasks")
    rows, cols = shape.pop()
    payloads, senders = [], []
    for r in replies:
        try:
            payload = verified_payload(r.content["stats-he"], r.content["he"], keys.fingerprint)
        except he.HEError as err:
            log(WARNING, "gateway %d: statistics left out: %s", r.metadata.src_node_id, err)
            continue
        payloads.append(payload)
        senders.append(r.metadata.src_node_id)
    if len(senders) < max(2, min_aggregate):
        raise RuntimeError(f"only {len(senders)} gateway(s) sent valid encrypted statistics; secure aggregation "
                           f"needs at least {max(2, min_aggregate)}")
    slots = decrypt_sum(grid, keys.add(payloads), senders, 0, keys, min_aggregate)
    if slots is None:
        raise RuntimeError("no gateway decrypted the fleet's statistics; see the SuperNode logs")
    sums = he.from_limbs(slots, rows * cols, len(senders)).reshape(rows, cols)
    nbytes = {n: len(p) for n, p in zip(senders, payloads)}
    return sums, {n: partitions[n] for n in senders}, nbytes, {n: examples[n] for n in senders}


def run_secagg(grid: Grid, rounds: DeadlineGrid, context: Context, cfg: dict[str, Any], model: torch.nn.Module,
               train_config: dict[str, Any], evaluate, num_rounds: int, strategy) -> tuple[ArrayRecord, dict]:
    """strategy=secagg: Flower's DefaultWorkflow with SecAggPlusWorkflow as its fit step."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    from iiotfl.strategies.secagg import to_parameters, workflow

    names = list(model.state_dict().keys())
    final: dict[str, ArrayRecord] = {}

    def as_record(ndarrays) -> ArrayRecord:
        return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in zip(names, ndarrays)})

    def evaluate_fn(server_round: int, ndarrays, config):  # noqa: ARG001
        final["arrays"] = as_record(ndarrays)
        scores = dict(evaluate(server_round, final["arrays"]))
        return float(next(iter(scores.values()), 0.0)), scores

    strategy.evaluate_fn = evaluate_fn
    strategy.train_config = dict(train_config)
    strategy.initial_parameters = to_parameters(v.detach().numpy() for v in model.state_dict().values())
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds,
                                                                round_timeout=float(cfg["fleet"]["round_timeout"])),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow(cfg))(rounds, legacy)
    return final["arrays"], {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = from_run_config(context.run_config)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg["train"]["torch_threads"]))
    fleet = cfg["fleet"]
    task = get_task(cfg["task"], cfg["seed"])
    timeout = float(fleet["round_timeout"])

    # a run resumed after a SuperLink restart (server/fleet.py) continues from its last checkpoint
    resume = int(cfg.get("_resume_round") or 0)
    nodes = wait_for_nodes(grid, int(fleet["min_gateways"] or fleet["gateways"]), timeout)
    rounds = DeadlineGrid(grid, deadline_s=timeout, min_replies=int(fleet.get("min_replies") or 1))
    strategy = build_strategy(cfg, on_sampled=rounds.on_sampled)
    keys = getattr(strategy, "keys", None)  # server.he: public material only
    sums, partitions, stats_bytes, examples = federated_feature_sums(
        rounds, nodes, timeout, keys, int(cfg["strategy"].get("min_aggregate") or 2))
    if hasattr(strategy, "counts"):
        strategy.counts.update(examples)
    model = task.build_model()
    if resume:
        from iiotfl.security.artefacts import load_checkpoint

        ckpt = load_checkpoint(out / "checkpoints" / f"round-{resume}.ckpt")
        model.load_state_dict(ckpt.model)
        if ckpt.norm_sums is not None:  # the normalisation the model was trained with
            sums = ckpt.norm_sums
    normaliser = task.normaliser(sums)
    test = task.server_test_data(int(fleet["gateways"]))
    log = RoundLog(out / "metrics.jsonl", cfg, rounds, cfg["engine"]["name"], keep_upto=resume or None)
    log.node_partition = partitions

    privacy = (cfg.get("privacy") or {}).get("name", "none")
    ledger = Ledger(out / "privacy_ledger.jsonl", cfg, keep_upto=resume or None)
    if not resume:
        ledger.record_statistics(partitions, stats_bytes, encrypted=keys is not None)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if resume:
            if server_round == 0:  # already scored: round `resume` of the first attempt
                return MetricRecord({})
            server_round += resume
        scores: dict[str, float] = {}
        if test is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
            scores = task.evaluate(model, test, normaliser)
        spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
        privacy_row = {"epsilon": spent.epsilon, "delta": spent.delta} if spent is not None else {}
        if spent is not None and getattr(spent, "noise_multiplier", None) is not None:
            privacy_row["noise_multiplier"] = spent.noise_multiplier  # this round's, as accounted
        log.write(server_round, scores, privacy_row)
        if server_round:
            ledger.record(log.rows[-1], privacy_row.get("epsilon"), privacy_row.get("delta"))
            save_checkpoint(out / "checkpoints" / f"round-{server_round}.ckpt", arrays.to_torch_state_dict(), sums,
                            server_round, run_dir=out)
        return MetricRecord(scores)

    num_rounds, notes = int(fleet["rounds"]) - resume, []
    if resume:
        notes.append(f"resumed after round {resume} from checkpoints/round-{resume}.ckpt (SuperLink restart)")
    if privacy == "client":
        num_rounds = rounds_within_budget(cfg)
        if num_rounds < int(fleet["rounds"]):
            notes.append(f"client-level privacy budget epsilon={cfg['privacy']['budget']} allows {num_rounds} of "
                         f"{fleet['rounds']} rounds; the run ended there")
        if num_rounds == 0:
            raise ValueError(notes[-1] + "; raise privacy.budget or privacy.noise_multiplier")
    norm = {"norm-sums": [float(v) for v in sums.ravel()], "norm-cols": int(sums.shape[1])}
    train_config = {
        "local-epochs": int(cfg["train"]["local_epochs"]),
        "batch-size": int(cfg["train"]["batch_size"]),
        "lr": float(cfg["train"]["lr"]),
        **norm,
    }
    if cfg["strategy"]["name"] == "secagg":
        # SecAgg+ multiplies each weight by num-examples / max_weight before quantising, so
        # a small ratio costs precision: scale the largest gateway's count up to max_weight
        train_config["secagg-weight-scale"] = float(cfg["strategy"]["max_weight"]) / max(max(examples.values(), default=1), 1)
        final, client_eval = run_secagg(grid, rounds, context, cfg, model, train_config, evaluate, num_rounds,
                                        strategy)
    else:
        result = strategy.start(
            grid=rounds,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=ConfigRecord(train_config),
            evaluate_config=ConfigRecord(norm),
            evaluate_fn=evaluate,
        )
        final, client_eval = result.arrays, {str(k): dict(v) for k, v in result.evaluate_metrics_clientapp.items()}
    # encrypted and signed, keys outside the run directory (server/artefacts.py)
    save_checkpoint(out / FINAL_CHECKPOINT, final.to_torch_state_dict(), sums, num_rounds + resume)
    summary = {
        "task": task.name,
        "primary_metric": task.primary_metric,
        "higher_is_better": bool(task.higher_is_better),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": final.count_bytes(),
        "gateways_connected": len(nodes),
        "rounds": log.rows,
        "client_evaluation": client_eval,
        "notes": notes,
        "privacy": accounting_check(cfg, load_ledger(out / "privacy_ledger.jsonl"), log.rows),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_report(out)
    if num_rounds and not any(r.get("aggregated") for r in log.rows[1:]):
        raise RuntimeError("no gateway update was aggregated in any round; see the SuperNode/ClientApp logs")
    failed = [c for c in summary["privacy"].get("checks", []) if not c["ok"]]
    if failed:
        raise RuntimeError(f"privacy accounting check FAILED: reported epsilon and dp-accounting disagree by more "
                           f"than 2% for {failed}; see report.md")
