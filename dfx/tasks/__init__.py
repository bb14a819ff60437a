"""Tasks: each module defines its recipe sections (``SECTIONS``) and a ``Task`` class.

A ``Task(recipe)`` provides ``dataset(split)``, ``collate_fn``, ``build_model()``, ``info()``,
``loss(model, batch) -> (loss, logs)`` and ``evaluator()``; the engine (dfx.engine) owns the loop.
The table of task names lives in :data:`dfx.recipe.TASK_MODULES`.
"""
