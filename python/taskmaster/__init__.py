"""taskmaster for Python: submit work to a taskmaster master (Client, or taskmaster.aio.Client for
asyncio) and run handlers for it (Worker).

    from taskmaster import Client, Worker

The master address and token default to $TASKMASTER_ADDR and $TASKMASTER_TOKEN, as taskctl's.
"""

from ._client_common import JobStatus, Result, Stats, TaskInfo, WorkerInfo
from ._conn import TLS
from .client import Client, Job
from .errors import TaskmasterError
from .worker import PermanentError, TaskContext, Worker

__all__ = ["Client", "Job", "Result", "JobStatus", "TaskInfo", "Stats", "WorkerInfo", "TLS",
           "TaskmasterError", "Worker", "TaskContext", "PermanentError"]
__version__ = "0.11.0"
