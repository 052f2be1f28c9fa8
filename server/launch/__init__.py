"""Launchers: run the app on a local Flower deployment, Flower's simulation engine, or a remote SuperLink.

``launch(cfg, run_dir)`` (``run.py``) brings up the engine ``engine.name`` names (``engines.py``:
``fleet`` = :class:`Deployment`, ``deployment.py``; ``sim`` = :class:`SimDeployment`, ``sim.py``;
``remote`` = :class:`RemoteDeployment`, ``remote.py``), submits the run with ``flwr run`` and the
composed config, follows it to its end and writes ``launch.json`` and the report. The SuperLink's
command line, ports and ``flwr`` connection are in ``superlink.py``; resuming after a SuperLink
restart in ``resume.py``; the progress bar in ``progress.py``. ``cleanup()`` removes what killed
runs left. Processes are started, tagged and stopped by ``clients/processes.py``.
"""

from iiotfl.server.launch.deployment import BIN, Deployment, cleanup
from iiotfl.server.launch.engines import ENGINES, check_data_files, engine_class, validate, validate_engine
from iiotfl.server.launch.progress import Progress
from iiotfl.server.launch.remote import RemoteDeployment
from iiotfl.server.launch.resume import last_checkpoint, resume_refusal
from iiotfl.server.launch.run import launch, provision_keys
from iiotfl.server.launch.sim import SimDeployment
from iiotfl.server.launch.superlink import APP_DIR, CONNECTION, LaunchError, free_port, wait_port

__all__ = [
    "APP_DIR", "BIN", "CONNECTION", "Deployment", "ENGINES", "LaunchError", "Progress", "RemoteDeployment",
    "SimDeployment", "check_data_files", "cleanup", "engine_class", "free_port", "last_checkpoint", "launch",
    "provision_keys", "resume_refusal", "validate", "validate_engine", "wait_port",
]
