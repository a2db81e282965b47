"""Read run configs written before tasks became components (attnlab <= 0.x checkpoints).

Older ``attnlab_config`` records name the task by ``task.kind`` and keep the head options in
``model`` (``pooling``, ``tie_embeddings``); :func:`upgrade_run_config` rewrites such a record to
today's layout so ``evaluate``, ``generate``, ``analyze`` and ``resume`` keep working on
finished runs. It is the only place the old kinds are named.
"""

from __future__ import annotations

from typing import Any

#: ``task.kind`` of an old record -> (task.module._target_, head options moved from ``model``)
OLD_TASK_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classification": ("attnlab.tasks.ClassificationTask", ("pooling",)),
    "lm": ("attnlab.tasks.LanguageModelTask", ("tie_embeddings",)),
}
OLD_OPTIM_TARGET = "attnlab.optim.build_optimizer"


def upgrade_run_config(run: dict[str, Any]) -> dict[str, Any]:
    """Return ``run`` (a plain dict) in today's layout; a current record is returned unchanged.

    Raises:
        ValueError: an old record whose ``task.kind`` is unknown.
    """
    task = run.get("task") or {}
    if "kind" not in task or "module" in task:
        return run
    kind = task.pop("kind")
    if kind not in OLD_TASK_KINDS:
        raise ValueError(f"checkpoint config has unknown task.kind={kind!r}.")
    target, head_keys = OLD_TASK_KINDS[kind]
    model = run.setdefault("model", {})
    module: dict[str, Any] = {"_target_": target, "_partial_": True}
    if "num_classes" in task:
        module["num_classes"] = task["num_classes"]
    for key in ("pooling", "tie_embeddings"):
        value = model.pop(key, None)
        if key in head_keys and value is not None:
            module[key] = value
    task["module"] = module
    model.setdefault("_target_", "attnlab.models.Backbone")
    model.setdefault("_partial_", True)
    optim = run.setdefault("optim", {})
    optim.setdefault("_target_", OLD_OPTIM_TARGET)
    optim.setdefault("_partial_", True)
    return run
