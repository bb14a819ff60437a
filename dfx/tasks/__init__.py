"""Tasks: each module defines its recipe sections (``SECTIONS``) and a ``Task`` class.

A ``Task(recipe)`` provides ``dataset(split)``, ``collate_fn``, ``build_model()``, ``info()``,
``loss(model, batch) -> (loss, logs)`` and ``evaluator()``; the engine (dfx.engine) owns the loop.
A regression task (depth) sets ``has_classes = False``: its model is built without a class list.
The table of task names lives in :data:`dfx.recipe.TASK_MODULES`.
"""
