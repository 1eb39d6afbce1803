"""The worker SDK: write ``def processor(task_handler: TaskHandler) -> Output`` and name it ``module:function``.

``TaskHandler`` mirrors the official ``armonik.worker.TaskHandler``: ``payload``, ``data_dependencies``,
``expected_results``, ``send_results``, ``create_results_metadata``, ``create_results``, ``submit_tasks``.
"""

from ..common import Output, TaskDefinition, TaskOptions
from .taskhandler import TaskHandler

__all__ = ["TaskHandler", "Output", "TaskDefinition", "TaskOptions"]
