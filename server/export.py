"""``iiotfl export RUN_DIR``: the run's final model as a signed int8 TorchScript file for devices.

1. Verify and decrypt ``RUN_DIR/model.ckpt`` (``server/artefacts.py``): the float32
   weights and the fleet's normalisation sums the ServerApp used.
2. Dynamic int8 quantisation (``torch.ao.quantization.quantize_dynamic``) of whatever
   Linear/LSTM/GRU layers the model has (RulCNN: its two Linear layers; the convolutions
   stay float32), then ``torch.jit.script``.
3. Write ``RUN_DIR/export/model-int8.ts.signed``: the TorchScript bytes in an artefact file,
   signed but not encrypted (a device needs only ``verify.pub``), and read it back with
   :func:`load_export`, which checks the signature before TorchScript sees a byte.
4. Measure on this CPU: TorchScript size of the float32 and the int8 model, latency per
   sample (batch 1, one thread, median), and the task's metrics of both on the server's
   test data normalised as the ServerApp did. ``RUN_DIR/export/export.json`` holds the
   figures; ``report.md`` is re-rendered with them (``server/report.py``).
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from iiotfl.security.artefacts import (
    Binding,
    Keys,
    ensure_keys,
    keys_dir,
    load_final,
    read_artefact,
    write_artefact,
)
from iiotfl.tasks import get_task

EXPORT_DIR = "export"
EXPORT_FILE = "model-int8.ts.signed"
QUANTISABLE = (nn.Linear, nn.LSTM, nn.GRU)


def quantise(model: nn.Module) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Dynamic int8 TorchScript of ``model`` and the names of the layers that were quantised."""
    model.eval()
    layers = sorted({type(m) for m in model.modules() if isinstance(m, QUANTISABLE)}, key=lambda t: t.__name__)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTISABLE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear/LSTM/GRU layer; dynamic int8 quantisation "
                         "would change nothing")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript and quantised tensors, still supported
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        quantised = torch.ao.quantization.quantize_dynamic(model, set(layers), dtype=torch.qint8)
        return torch.jit.script(quantised), names


def script_bytes(module: nn.Module | torch.jit.ScriptModule) -> bytes:
    """TorchScript serialisation of ``module`` (scripted first if it is not yet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def save_export(path: Path, module: torch.jit.ScriptModule, keys: Keys | None = None,
                binding: Binding = Binding()) -> int:
    """Write ``module`` signed and bound to ``binding`` (the run, round and model it was exported
    from) to ``path`` (atomically); returns the TorchScript size in bytes."""
    data = script_bytes(module)
    write_artefact(Path(path), data, "export", keys or ensure_keys(), encrypt=False, binding=binding)
    return len(data)


def load_export(path: str | Path, keys: Keys | None = None, *, run: str | None = None,
                newer_than: int | None = None) -> torch.jit.ScriptModule:
    """The exported model in ``path``; its signature is checked first (needs only ``verify.pub``).

    A device passes the run its models come from (``run``) and the round of the model it runs now
    (``newer_than``): another run's export, or one not newer (a rollback), is refused."""
    data, _ = read_artefact(Path(path), "export", keys or Keys(keys_dir()), run=run,
                            min_round=None if newer_than is None else newer_than + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data))


@torch.no_grad()
def latency_us(model: nn.Module, samples: torch.Tensor, repeats: int = 300) -> float:
    """Median time of one single-sample forward pass, in microseconds, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        for i in range(20):
            model(samples[i % len(samples)].unsqueeze(0))
        times = []
        for i in range(repeats):
            x = samples[i % len(samples)].unsqueeze(0)
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def export_run(run_dir: str | Path) -> dict[str, Any]:
    """Export the final model of ``run_dir``; writes the signed file and ``export/export.json``, returns the figures."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml" if (run_dir / "config.yaml").exists() else run_dir / ".hydra" / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; pass a run directory of `iiotfl run`")
    cfg = yaml.safe_load(cfg_path.read_text())
    checkpoint = load_final(run_dir)  # bound to this run and its final round
    task = get_task(cfg["task"], cfg["seed"])
    torch.set_num_threads(max(1, int(cfg["train"]["torch_threads"])))
    model = task.build_model()
    model.load_state_dict(checkpoint.model)
    model.eval()

    scripted, layers = quantise(model)
    path = run_dir / EXPORT_DIR / EXPORT_FILE
    int8_bytes = save_export(path, scripted, binding=checkpoint.binding)
    exported = load_export(path, run=checkpoint.binding.run)  # what a device would load: signature checked

    test = task.server_test_data(int(cfg["fleet"]["gateways"]))
    metrics: dict[str, dict[str, float]] = {}
    change = None
    if test is not None and checkpoint.norm_sums is not None:
        normaliser = task.normaliser(checkpoint.norm_sums)
        metrics = {"float32": task.evaluate(model, test, normaliser), "int8": task.evaluate(exported, test, normaliser)}
        x, _ = task.windows(test, normaliser)
        samples = torch.from_numpy(x[:300])
        change = float(np.max(np.abs(task.predict(exported, x) - task.predict(model, x))))
    else:  # no test data configured (or an old checkpoint): time on inputs of the model's shape
        # window / features: attributes of the windowed tasks only, not of Task (quality_control has neither)
        samples = torch.randn(300, task.window, len(task.features))  # type: ignore[attr-defined]
    figures: dict[str, Any] = {
        "file": f"{EXPORT_DIR}/{EXPORT_FILE}",
        "signed_file_bytes": path.stat().st_size,
        "quantised_layers": layers,
        "float32_bytes": len(script_bytes(model)),
        "int8_bytes": int8_bytes,
        "latency_us": {"float32": latency_us(model, samples), "int8": latency_us(exported, samples)},
        "latency_setup": f"batch 1, 1 thread, median of 300, {cpu_name()}, torch {torch.__version__}, "
                         f"quantized engine {torch.backends.quantized.engine}",
        "primary_metric": task.primary_metric,
        "metrics": metrics,
        "max_abs_prediction_change": change,
        "note": "" if metrics else "no server test data (task.data.test_path unset) or no normalisation sums in the "
                                   "checkpoint: metrics not measured",
    }
    (run_dir / EXPORT_DIR / "export.json").write_text(json.dumps(figures, indent=2))
    return figures

