"""In-memory IO managers: one hands each chunk to its one consumer and forgets it; the job's
default one keeps what no step reads for the run only.

Dagster's ``mem_io_manager`` keeps every step output until the run ends, so a run's memory grows
with its rows (each chunk's images, then its vectors, held long after they were written). Every
chunk output in the enrichment graph is read by exactly one downstream step, so it is dropped
when that step loads it: memory stays flat in the number of rows.
"""

from dagster import InputContext, IOManager, OutputContext, io_manager

# Chunks hold downscaled images and vectors between ops: handed over in memory (not pickled to
# disk) and forgotten once consumed. The job runs in process, so this is correct.
CHUNK_IO = "chunk_io_manager"


class HandOffIOManager(IOManager):
    def __init__(self) -> None:
        self._values: dict[tuple, object] = {}

    @staticmethod
    def _key(context: OutputContext) -> tuple:
        return tuple(context.get_identifier())

    def handle_output(self, context: OutputContext, obj: object) -> None:
        self._values[self._key(context)] = obj

    def load_input(self, context: InputContext) -> object:
        upstream = context.upstream_output
        assert upstream is not None
        return self._values.pop(self._key(upstream))


@io_manager(description="In-memory hand-off of chunk outputs to their single consumer.")
def handoff_io_manager(_) -> HandOffIOManager:
    return HandOffIOManager()


@io_manager(
    description="In memory, for the run only: the outputs it handles (the batch jobs' results, "
    "shown as metadata) are read by no step, so nothing is written under DAGSTER_HOME and "
    "nothing outlives the run. No configuration."
)
def run_memory_io_manager(_) -> HandOffIOManager:
    # Defined so that Dagster does not add its default (fs_io_manager: a pickle per output under
    # DAGSTER_HOME/storage, kept forever, and an undescribed ``base_dir`` on the launchpad).
    return HandOffIOManager()
