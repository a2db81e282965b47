"""Tasks as components: each ``conf/task/<name>.yaml`` names, by ``_target_``, its data module
(``task.data``) and its LightningModule (``task.module``), which adds the model head to the
backbone and owns the loss, metrics, a synthetic batch for benchmarks and per-example scoring
for ``attnlab analyze``."""

from attnlab.tasks.base import (
    ClassificationTask,
    LanguageModelTask,
    TaskModule,
    fill_metric_states,
)

__all__ = ["ClassificationTask", "LanguageModelTask", "TaskModule", "fill_metric_states"]
