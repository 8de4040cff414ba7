"""flaxlm.eval: measuring models — task kinds, metrics, the `flaxlm eval` command.

The lm-evaluation-harness adapter is `flaxlm.eval.harness.FlaxlmLM` (imported
on its own: it imports lm_eval).
"""

from flaxlm.eval.metrics import Metric
from flaxlm.eval.task import EvalError, Settings, Task, TaskResult
from flaxlm.eval.tasks import KINDS, evaluate, make_task, markdown_table

__all__ = ["EvalError", "KINDS", "Metric", "Settings", "Task", "TaskResult", "evaluate",
           "make_task", "markdown_table"]
