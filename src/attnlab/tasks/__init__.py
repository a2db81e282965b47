"""Tasks as components: each ``conf/task/<name>.yaml`` names, by ``_target_``, its data module
(``task.data``) and its LightningModule (``task.module``), which adds the model head to the
backbone and owns the loss, metrics, a synthetic batch for benchmarks and per-example scoring
for ``attnlab analyze`` (:class:`~attnlab.tasks.base.TaskModule`)."""

from attnlab.tasks.base import TaskModule, fill_metric_states
from attnlab.tasks.classification import ClassificationTask
from attnlab.tasks.language_model import LanguageModelTask

__all__ = ["ClassificationTask", "LanguageModelTask", "TaskModule", "fill_metric_states"]
