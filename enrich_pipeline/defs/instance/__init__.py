"""The Dagster instance of this code location: its configuration (``dagster.yaml``, copied into
``DAGSTER_HOME`` by ``enrich-dagster``), the run coordinator and run launcher it names, and what
``enrich-dagster`` changes in it (``admin``)."""

from pathlib import Path

# Ships with the package, so an installed code location has it too.
INSTANCE_YAML = Path(__file__).with_name("dagster.yaml")
