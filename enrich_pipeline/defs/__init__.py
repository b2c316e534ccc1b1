"""The Dagster layer: definitions, resources (the deployment's, the run's state and its
heartbeat), partitions, IO managers, ops, assets, checks, sensors, and the instance (``instance/``:
its ``dagster.yaml``, the run coordinator and the run launcher it names).

Dagster warns once per process about features we use knowingly (every run worker, code server
and daemon thread loads the definitions, so one warning becomes dozens in the server log):
``owners`` on sensors and jobs is a beta parameter Dagster itself passes, and partitioned asset
checks are a preview feature (README, "Dagster").
"""

import warnings

from dagster import BetaWarning, PreviewWarning

warnings.filterwarnings("ignore", category=BetaWarning, message=r".*`owners`")
warnings.filterwarnings(
    "ignore", category=PreviewWarning, message=r".*partitions_def on an AssetCheckSpec"
)
