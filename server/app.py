"""The ServerApp: one federated run, from normalisation statistics to the final model.

1. Wait until the fleet's gateways are connected.
2. Ask every gateway for its per-condition feature sums (``query.feature_stats``,
   ``server/statistics.py``) and add them up: the fleet-wide normalisation, without any
   plant's own statistics (encrypted under ``strategy=he``).
3. Run the configured strategy (its registry entry in ``strategies/``) for ``fleet.rounds``
   rounds through a :class:`DeadlineGrid` (round deadline, first K replies, minimum
   replies). After every round the global model is scored on the held-out set and one line
   is appended to ``metrics.jsonl`` (``server/roundlog.py``) with the figures of every
   sampled gateway (what ``iiotfl run`` shows as progress), and one row per gateway to the
   privacy ledger.
4. Every connected gateway scores the final global model on its own held-out data (the
   ClientApp's ``evaluate``; ``fleet.evaluate_plants=false``: not asked): each plant's own figures
   and their spread (worst, median, best plant: ``server/plants.py``) go into metrics.json's
   ``gateway_evaluation`` and the report's "Per plant". With a server-side test set the run's
   metric stays the server's; without one (``task.server_test_data`` is None: a CSV source
   without ``task.data.test_path``) the gateways' mean weighted by held-out examples is the
   run's metric (:func:`gateway_mean`). Failed gateways are named (``events.jsonl``) and left
   out; the run goes on.
5. Write the final model and ``metrics.json`` into the output directory, which says which
   evaluation its metric comes from (:func:`headline`) and what each gateway class spent, estimated
   (``energy_per_class``, ``server/roundlog.py``); the launcher renders the report from
   them (``iiotfl report DIR`` does the same for any run). Every global model
   (``checkpoints/round-N.ckpt``, the final ``model.ckpt``) is written encrypted and signed
   (``security/artefacts.py``).

What the launcher decided reaches it as Flower run config (``configs.RunSettings``): the
output directory, a resumed run's last round, a provisioned HE key directory.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, replace
from logging import WARNING
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from iiotfl.compat.flower import prompt_object_pulls
from iiotfl.configs import RunSettings, from_run_config
from iiotfl.privacy.accounting import accounting_check
from iiotfl.privacy.ledger import Ledger
from iiotfl.privacy.ledger import load as load_ledger
from iiotfl.security.artefacts import FINAL_CHECKPOINT, load_checkpoint, model_fingerprint, save_checkpoint
from iiotfl.server import events
from iiotfl.server.checks import validate
from iiotfl.server.plants import plant_spread
from iiotfl.server.roundlog import RoundLog, energy_per_class
from iiotfl.server.rounds import DeadlineGrid
from iiotfl.server.statistics import federated_feature_sums, wait_for_nodes
from iiotfl.strategies import build_strategy, strategy_spec, wire
from iiotfl.strategies.client_dp import client_level, rounds_within_budget
from iiotfl.strategies.codecs import weights_digest
from iiotfl.strategies.spec import BuiltStrategy
from iiotfl.tasks import Task, get_task

app = ServerApp()
REPLY_OBJECT_RETRY_S = (0.05, 0.5)  # loopback to the SuperLink

# metrics.json "evaluation": where the run's metric comes from
SERVER, GATEWAYS, NONE = "server", "gateways", "none"
NO_TEST_SET = "no server-side test set (task.data.test_path is not set)"


@dataclass
class Run:
    """What one run of the ServerApp holds between its steps."""

    settings: RunSettings
    task: Task
    rounds: DeadlineGrid
    strategy: BuiltStrategy      # Flower's legacy strategy only for a spec with a runner (SecAgg+)
    nodes: list[int]
    sums: Any                    # the fleet's feature sums (the normalisation)
    examples: dict[int, int]     # node -> training examples it reported
    model: torch.nn.Module
    log: RoundLog
    ledger: Ledger
    server_test: bool = False    # the task has server-side test data (set by _evaluator)

    @property
    def cfg(self) -> dict[str, Any]:
        return self.settings.cfg

    @property
    def out(self) -> Path:
        return self.settings.output_dir

    @property
    def resume(self) -> int:
        return self.settings.resume_round


def _settings(context: Context) -> RunSettings:
    settings = from_run_config(context.run_config)
    if settings.defaults:  # plain `flwr run .`: nothing checked the composed defaults yet
        validate(settings.cfg)
    if not settings.run_uid:  # plain `flwr run .`: no launcher gave the run an id
        settings = replace(settings, run_uid=uuid.uuid4().hex)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(settings.cfg["train"]["torch_threads"]))
    return settings


def _prepare(grid: Grid, context: Context, settings: RunSettings) -> Run:
    """Connected gateways, the strategy, the fleet's statistics, the model to start from, the logs."""
    cfg, out, resume = settings.cfg, settings.output_dir, settings.resume_round
    fleet = cfg["fleet"]
    timeout = float(fleet["round_timeout"])
    nodes = wait_for_nodes(grid, int(fleet["min_gateways"] or fleet["gateways"]), timeout)
    rounds = DeadlineGrid(grid, deadline_s=timeout, min_replies=int(fleet["min_replies"]))
    # a gateway back from an outage mid-round is sent its message again; the secure modes' exchanges are not
    rounds.resend_offline = strategy_spec(cfg).uplink == "plaintext"
    rounds.resend_silent_s = fleet.get("resend_after_s") if rounds.resend_offline else None
    strategy = build_strategy(cfg, on_sampled=rounds.on_sampled, keys=settings.he_keys)
    keys = getattr(strategy, "keys", None)  # server.he: public material only
    sums, partitions, stats_bytes, examples = federated_feature_sums(
        rounds, nodes, timeout, keys, int(getattr(strategy, "min_aggregate", 2)),
        on_failure=lambda node, reason: events.gateway_failed(out, node, None, "feature statistics", reason))
    if hasattr(strategy, "counts"):
        strategy.counts.update(examples)
    task = get_task(cfg["task"], cfg["seed"])
    model = task.build_model()
    if resume:  # a run resumed after a SuperLink restart continues from its last checkpoint
        ckpt = load_checkpoint(out / "checkpoints" / f"round-{resume}.ckpt", run=settings.run_uid, at_round=resume,
                               model=model_fingerprint(model.state_dict()))
        model.load_state_dict(ckpt.model)
        if ckpt.norm_sums is not None:  # the normalisation the model was trained with
            sums = ckpt.norm_sums
    elif hasattr(strategy, "seeded_start"):  # a fresh run starts from the task's seeded model, which gateways build
        strategy.seeded_start = weights_digest({k: v.numpy() for k, v in model.state_dict().items()})
    simulated = cfg["engine"]["name"] == "sim"  # the simulated clock times the rounds
    log = RoundLog(out / "metrics.jsonl", cfg, rounds, simulated, keep_upto=resume or None)
    log.node_partition = partitions
    log.rejected = lambda: getattr(strategy, "rejected", {})
    log.version_info = lambda: getattr(strategy, "version_row", None)  # strategy=fedbuff: the version just made
    ledger = Ledger(out / "privacy_ledger.jsonl", cfg, keep_upto=resume or None)
    if not resume:
        ledger.record_statistics(partitions, stats_bytes, encrypted=keys is not None)
    return Run(settings, task, rounds, strategy, nodes, sums, examples, model, log, ledger)


def _evaluator(run: Run) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's evaluate_fn: score the global model, log the round, record the ledger, checkpoint."""
    normaliser = run.task.normaliser(run.sums)
    test = run.task.server_test_data(int(run.cfg["fleet"]["gateways"]))
    run.server_test = test is not None

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if run.resume:
            if server_round == 0:  # already scored: round `resume` of the first attempt
                return MetricRecord({})
            server_round += run.resume
        scores: dict[str, float] = {}
        if test is not None:
            run.model.load_state_dict(arrays.to_torch_state_dict())
            scores = run.task.evaluate(run.model, test, normaliser)
        spent = run.strategy.privacy_spent() if hasattr(run.strategy, "privacy_spent") else None
        privacy_row = {"epsilon": spent.epsilon, "delta": spent.delta} if spent is not None else {}
        if spent is not None and getattr(spent, "noise_multiplier", None) is not None:
            privacy_row["noise_multiplier"] = spent.noise_multiplier  # this round's, as accounted
        run.log.write(server_round, scores, privacy_row)
        for g in run.log.rows[-1].get("gateways", []):
            if g.get("status") in ("error", "rejected"):
                events.gateway_failed(run.out, g["node"], g["partition"], f"round {server_round}", g.get("reason", "?"))
        if server_round:
            run.ledger.record(run.log.rows[-1], privacy_row.get("epsilon"), privacy_row.get("delta"))
            save_checkpoint(run.out / "checkpoints" / f"round-{server_round}.ckpt", arrays.to_torch_state_dict(),
                            run.sums, server_round, run_dir=run.out, run_id=run.settings.run_uid)
        return MetricRecord(dict(scores))  # a copy, typed as the record's values

    return evaluate


def _rounds_to_run(run: Run) -> tuple[int, list[str]]:
    """How many rounds this run trains (a resumed run fewer, a client-level DP budget may stop it early)."""
    fleet = run.cfg["fleet"]
    num_rounds, notes = int(fleet["rounds"]) - run.resume, []
    if run.resume:
        notes.append(f"resumed after round {run.resume} from checkpoints/round-{run.resume}.ckpt (SuperLink restart)")
    if client_level(run.cfg):
        num_rounds = rounds_within_budget(run.cfg)
        if num_rounds < int(fleet["rounds"]):
            notes.append(f"client-level privacy budget epsilon={run.cfg['privacy']['budget']} allows {num_rounds} of "
                         f"{fleet['rounds']} rounds; the run ended there")
        if num_rounds == 0:
            raise ValueError(notes[-1] + "; raise privacy.budget or privacy.noise_multiplier")
    return num_rounds, notes


def _norm_config(run: Run) -> dict[str, ConfigRecordValues]:
    """The fleet's normalisation as a gateway reads it (train and evaluate messages)."""
    return {wire.NORM_SUMS: [float(v) for v in run.sums.ravel()], wire.NORM_COLS: int(run.sums.shape[1])}


def _train(run: Run, grid: Grid, context: Context, num_rounds: int) -> tuple[ArrayRecord, dict]:
    """Run the strategy's rounds; the final global model and the gateways' own evaluation."""
    evaluate = _evaluator(run)
    norm = _norm_config(run)
    train = run.cfg["train"]
    train_config: dict[str, ConfigRecordValues] = {
        wire.LOCAL_EPOCHS: int(train["local_epochs"]), wire.BATCH_SIZE: int(train["batch_size"]),
        "lr": float(train["lr"]), wire.OPTIMIZER: str(train.get("optimizer") or "adam"),
        wire.MOMENTUM: float(train.get("momentum") or 0.0), **norm}
    spec = strategy_spec(run.cfg)
    if spec.runner is not None:  # a strategy with a workflow of its own (SecAgg+)
        return spec.runner(run.rounds, context, run.cfg, run.model, train_config, evaluate, num_rounds,
                           run.strategy, run.examples)
    strategy = cast(Strategy, run.strategy)  # a legacy strategy comes with a runner, which ran above
    result = strategy.start(
        grid=run.rounds,
        initial_arrays=ArrayRecord(run.model.state_dict()),
        num_rounds=num_rounds,
        timeout=float(run.cfg["fleet"]["round_timeout"]),
        train_config=ConfigRecord(train_config),
        evaluate_config=ConfigRecord(norm),
        evaluate_fn=evaluate,
    )
    return result.arrays, {str(k): dict(v) for k, v in result.evaluate_metrics_clientapp.items()}


def gateway_mean(replies: Mapping[int, Mapping[str, Any]]) -> tuple[dict[str, float], list[int], dict[int, str]]:
    """The gateways' evaluation metrics averaged, each weighted by the gateway's ``num-examples`` (as Flower's
    FedAvg averages ``evaluate`` replies). Per metric only the gateways with a finite value count. Returns
    (the means, with ``num-examples`` their total; the gateways counted; node -> why one was left out)."""
    weights: dict[int, float] = {}
    left_out: dict[int, str] = {}
    for node, metrics in replies.items():
        n = metrics.get(wire.NUM_EXAMPLES)
        if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n > 0:
            weights[node] = float(n)
        else:
            left_out[node] = f"its evaluation reply has no positive {wire.NUM_EXAMPLES} ({n!r})"
    means: dict[str, float] = {}
    keys = dict.fromkeys(k for node in weights for k in replies[node] if k != wire.NUM_EXAMPLES)
    for key in keys:
        pairs = [(float(replies[node][key]), w) for node, w in weights.items()
                 if isinstance(replies[node].get(key), (int, float)) and not isinstance(replies[node][key], bool)
                 and math.isfinite(replies[node][key])]
        if pairs:
            means[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    if weights:
        means[wire.NUM_EXAMPLES] = sum(weights.values())
    return means, sorted(weights), left_out


def _evaluate_on_gateways(run: Run, final: ArrayRecord, final_round: int) -> dict[str, Any]:
    """Every connected gateway scores ``final`` on its own held-out data (the ClientApp's ``evaluate``, within
    ``fleet.round_timeout``). metrics.json's ``gateway_evaluation``: who was asked, who counted, the weighted
    means (:func:`gateway_mean`), each gateway's figures, their spread in the task's primary metric (worst,
    median and best plant, :func:`plant_spread`; None when no gateway gave it) and why the others gave none
    (also in events.jsonl)."""
    partition = run.log.node_partition
    timeout = float(run.cfg["fleet"]["round_timeout"])
    failed: dict[int, str] = {}
    replies: dict[int, dict[str, Any]] = {}
    nodes: list[int] = []
    try:
        nodes = sorted(set(run.rounds.get_node_ids()))
        failed.update({n: "no longer connected" for n in run.nodes if n not in nodes})
        config = ConfigRecord({**_norm_config(run), wire.SERVER_ROUND: final_round})
        if run.cfg["fleet"].get("personalise_epochs"):  # each gateway also fine-tunes a copy on its own data
            config[wire.PERSONALISE_EPOCHS] = int(run.cfg["fleet"]["personalise_epochs"])
        messages = [Message(content=RecordDict({"arrays": final, "config": config}), dst_node_id=n,
                            message_type=MessageType.EVALUATE) for n in nodes]
        run.rounds.send_and_receive(messages, timeout=timeout)
        trace = run.rounds.trace
        replies = {n: m for n, m in trace.metrics.items() if n not in trace.errors}
        failed.update({n: trace.reasons.get(n, "error") for n in trace.errors})
        failed.update({n: f"no reply within fleet.round_timeout ({timeout:g} s)" for n in trace.late})
    except Exception as err:  # noqa: BLE001 - the run's model is saved; its report says why there is no metric
        log(WARNING, "final evaluation on the gateways failed: %s: %s", type(err).__name__, err)
        failed.update({n: f"{type(err).__name__}: {err}" for n in nodes or run.nodes if n not in replies})
    means, counted, left_out = gateway_mean(replies)
    failed.update(left_out)
    for node, reason in sorted(failed.items()):
        log(WARNING, "gateway %d: no evaluation of the final model: %s", node, reason)
        events.gateway_failed(run.out, node, partition.get(node), "final evaluation", reason)
    per_gateway = sorted(({"node": n, "partition": partition.get(n), **replies[n]} for n in counted),
                         key=lambda g: (g["partition"] is None, g["partition"] or 0, g["node"]))
    return {
        "round": final_round,
        "asked": len(nodes),  # the gateways connected at the end, each sent the final model
        "gateways": len(counted),
        "metrics": means,
        "per_gateway": per_gateway,
        "spread": plant_spread(per_gateway, run.task.primary_metric, bool(run.task.higher_is_better)),
        # fleet.personalise_epochs: the same for each plant's fine-tuned model (None without it)
        "spread_personal": plant_spread(per_gateway, wire.PERSONAL + run.task.primary_metric,
                                        bool(run.task.higher_is_better)),
        "failed": [{"node": n, "partition": partition.get(n), "reason": why} for n, why in sorted(failed.items())],
    }


def _who(node: Any, partition: Any) -> str:
    return f"gateway {partition}" if partition is not None else f"gateway (node {node})"


def headline(primary: str, rounds: list[dict[str, Any]], server_test: bool,
             gateway_eval: Mapping[str, Any] | None) -> dict[str, Any]:
    """Which evaluation the run's metric comes from: ``evaluation`` ("server": the server's held-out test set,
    scored every round; "gateways": the final model on the gateways' own held-out data, weighted mean;
    "none"), ``final_metric`` (the primary metric's final value, or None), ``final_metrics`` (all of that
    evaluation's final figures) and, without a metric, ``evaluation_note`` (why)."""
    scored = [r["server"] for r in rounds if (r.get("server") or {}).get(primary) is not None]
    if server_test and scored:
        return {"evaluation": SERVER, "final_metric": scored[-1][primary], "final_metrics": dict(scored[-1])}
    means = dict((gateway_eval or {}).get("metrics") or {})
    if gateway_eval is not None and means.get(primary) is not None:
        return {"evaluation": GATEWAYS, "final_metric": means[primary], "final_metrics": means}
    if server_test:
        why = f"the server's test set gave no {primary}"
    elif gateway_eval is None:
        why = f"{NO_TEST_SET}, and the gateways were not asked to evaluate the final model"
    elif not gateway_eval.get("asked"):
        why = f"{NO_TEST_SET}, and no gateway was connected to evaluate the final model"
    else:
        failed = "; ".join(f"{_who(f.get('node'), f.get('partition'))}: {f.get('reason')}"
                           for f in gateway_eval.get("failed") or [])
        why = (f"{NO_TEST_SET}, and none of the {gateway_eval['asked']} gateway(s) asked returned a {primary} for "
               "the final model" + (f" ({failed})" if failed else ""))
    return {"evaluation": NONE, "final_metric": None, "final_metrics": {}, "evaluation_note": why}


def evaluate_plants(cfg: Mapping[str, Any]) -> bool:
    """``fleet.evaluate_plants``: whether every gateway scores the final model on its own held-out data (a config
    written before the key existed: yes)."""
    return (cfg.get("fleet") or {}).get("evaluate_plants", True) is not False


def _evaluation(run: Run, final: ArrayRecord, final_round: int) -> dict[str, Any]:
    """metrics.json's evaluation fields: the run's metric (the server's own, else the gateways' weighted mean) and,
    unless ``fleet.evaluate_plants`` is false, each plant's own evaluation of the final model (with or without a
    server-side test set)."""
    gateway_eval = None
    aggregated = any(r.get("aggregated") for r in run.log.rows[1:])
    if aggregated and evaluate_plants(run.cfg):
        gateway_eval = _evaluate_on_gateways(run, final, final_round)
    # with a server-side test set the run's metric is the server's alone; the plants' figures come beside it
    fields = headline(run.task.primary_metric, run.log.rows, run.server_test,
                      None if run.server_test else gateway_eval)
    if not run.server_test and not aggregated:
        fields["evaluation_note"] = f"{NO_TEST_SET}, and no gateway update was aggregated in any round"
    elif not run.server_test and gateway_eval is None:
        fields["evaluation_note"] = (f"{NO_TEST_SET}, and fleet.evaluate_plants=false: the gateways were not asked to "
                                     "evaluate the final model")
    if gateway_eval is not None:
        fields["gateway_evaluation"] = gateway_eval
        run.ledger.record_evaluation(gateway_eval["per_gateway"])  # what left each plant for it
    return fields


def _finish(run: Run, final: ArrayRecord, client_eval: dict, num_rounds: int, notes: list[str],
            evaluation: Mapping[str, Any] | None = None) -> None:
    """The final model and ``metrics.json``; a run that aggregated nothing or whose ε fails its check fails."""
    # encrypted and signed, keys outside the run directory (security/artefacts.py)
    save_checkpoint(run.out / FINAL_CHECKPOINT, final.to_torch_state_dict(), run.sums, num_rounds + run.resume,
                    run_id=run.settings.run_uid)
    summary: dict[str, Any] = {
        "run_uid": run.settings.run_uid,  # model.ckpt is bound to it and to final_round
        "final_round": num_rounds + run.resume,
        "task": run.task.name,
        "primary_metric": run.task.primary_metric,
        "higher_is_better": bool(run.task.higher_is_better),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "model_bytes": final.count_bytes(),
        "gateways_connected": len(run.nodes),
        "rounds": run.log.rows,
        "client_evaluation": client_eval,
        **(evaluation or {}),  # evaluation, final_metric, final_metrics, gateway_evaluation, evaluation_note
        "energy_per_class": energy_per_class(run.log.rows),  # estimated, from the profiles (server/roundlog.py)
        "notes": notes,
        "privacy": accounting_check(run.cfg, load_ledger(run.out / "privacy_ledger.jsonl"), run.log.rows),
    }
    (run.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if num_rounds and not any(r.get("aggregated") for r in run.log.rows[1:]):
        raise RuntimeError("no gateway update was aggregated in any round; see the SuperNode/ClientApp logs")
    failed = [c for c in summary["privacy"].get("checks", []) if not c["ok"]]
    if failed:
        raise RuntimeError(f"privacy accounting check FAILED: reported epsilon and dp-accounting disagree by more "
                           f"than 2% for {failed}; see report.md")


@app.main()
def main(grid: Grid, context: Context) -> None:
    # a reply's objects reach the SuperLink just after its metadata: ask again soon, not after 1-10 s
    prompt_object_pulls(*REPLY_OBJECT_RETRY_S)
    settings = _settings(context)
    try:
        run = _prepare(grid, context, settings)
        num_rounds, notes = _rounds_to_run(run)
        final, client_eval = _train(run, grid, context, num_rounds)
        evaluation = _evaluation(run, final, num_rounds + run.resume)
        _finish(run, final, client_eval, num_rounds, notes, evaluation)
    except Exception as err:  # `iiotfl run` shows it (server/events.py); Flower logs the traceback
        events.record(settings.output_dir, "error", f"{type(err).__name__}: {err}")
        raise
