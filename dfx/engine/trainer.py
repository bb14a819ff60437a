"""The training loop every task uses.

recipe -> task builders (data, model) -> optimizer/scheduler (timm factories) -> epochs of
steps -> evaluation -> run directory (checkpoints, metrics, plots).

Reproducibility: the model is initialised from ``train.seed`` on every rank, the sampler order
depends on (seed, epoch) and each sample's augmentation on (seed, epoch, index), and all global
RNG states are saved with each checkpoint. A run resumed from its ``last`` checkpoint on CPU ends
with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

import dfx
from dfx.data.seeded import SeededDataset
from dfx.engine import checkpoint as ckpt
from dfx.engine import distributed as D
from dfx.engine.progress import EpochProgress, track
from dfx.engine.records import log_scalars, plot, read_rows, tensorboard_writer_class, write_rows
from dfx.engine.rundir import RunLock, check_resumable, latest_run, new_run_dir
from dfx.errors import RunError, UsageError
from dfx.files import check_writable, remove_stale_temporaries, write_text_atomic
from dfx.recipe import Recipe, load_recipe, task_module


def to_device(batch, device: torch.device):
    """Move tensors inside nested lists/tuples/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def amp_dtype(amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if not amp or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: torch.nn.Module, task, t) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    params = task.param_groups(model) if hasattr(task, "param_groups") else model
    return create_optimizer_v2(params, opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum)


def build_scheduler(optimizer, t, steps_per_epoch: int):
    """A timm scheduler stepped every update (``step_update``), warmup included."""
    from timm.scheduler import create_scheduler_v2

    warmup = t.warmup_steps / steps_per_epoch if t.warmup_steps else t.warmup_epochs
    name, decay_rate, decay_epochs = t.scheduler, t.decay_rate, t.decay_epochs
    if name == "constant":
        name, decay_rate, decay_epochs = "step", 1.0, t.epochs + 1
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=t.epochs, decay_epochs=decay_epochs, decay_milestones=t.milestones or (t.epochs,),
        decay_rate=decay_rate, min_lr=t.min_lr, warmup_lr=t.warmup_lr, warmup_epochs=warmup,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def make_loader(dataset, batch_size: int, ctx: D.Context, *, shuffle: bool, seed: int, num_workers: int,
                collate_fn=None) -> DataLoader:
    """Training loaders shard with DistributedSampler (drop_last); eval loaders take every n-th item."""
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                  pin_memory=ctx.device.type == "cuda")
    if shuffle:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                     drop_last=True)
        return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.distributed else dataset
    return DataLoader(shard, shuffle=False, **kwargs)


@torch.no_grad()
def evaluate(task, model: torch.nn.Module, loader: DataLoader, ctx: D.Context, dtype=None,
             progress: bool = False) -> dict:
    """Run the task's evaluator over this rank's shard; metrics merged over all ranks.

    ``progress``: show a bar (terminal) or a few lines (stderr) over the batches on rank 0.
    """
    evaluator = task.evaluator()
    was_training = model.training
    model.eval()
    for batch in track(loader, len(loader), "evaluating", enabled=progress and ctx.is_main):
        with autocast(dtype, ctx.device):
            evaluator.update(model, to_device(batch, ctx.device))
    model.train(was_training)
    return evaluator.summarize(D.gather_objects(evaluator.state(), ctx))


def checkpoint_metadata(recipe: Recipe, task, epoch: int, metrics: dict) -> dict:
    return {"format": "dfx", "dfx_version": dfx.__version__, "task": recipe.task, "name": recipe.name,
            "recipe": recipe.to_dict(), "epoch": epoch, "metrics": metrics, "info": task.info()}


def resolve_run(recipe: Recipe | str | Path, overrides: Iterable[str] = (), resume=None) -> tuple[Recipe, Path | None]:
    """The recipe to train and, when resuming, the run directory to continue.

    A resumed run uses its own ``recipe.yaml`` (plus any new overrides, e.g. more epochs), so an
    edited recipe file cannot silently change a run half-way.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        raise UsageError("overrides apply to recipe files; apply them before building the Recipe")
    if resume in (None, False):
        return recipe, None
    run_dir = latest_run(recipe.task, recipe.name) if resume in (True, "latest") else check_resumable(Path(resume))
    resumed = load_recipe(run_dir / "recipe.yaml", list(overrides))
    resumed.name = recipe.name if resume in (True, "latest") else _stem_of(run_dir, recipe.name)
    return resumed, run_dir


def _stem_of(run_dir: Path, default: str) -> str:
    meta = run_dir / "checkpoints" / "last.safetensors"
    if meta.is_file():
        return str(ckpt.read_metadata(meta).get("name", default))
    return default


def train(recipe: Recipe | str | Path, overrides: Iterable[str] = (), *, out: str | Path | None = None, resume=None,
          device: str = "auto", callbacks: Iterable[Callable] = (), quiet: bool = False) -> dict:
    """Train a recipe; returns ``{"run_dir", "metrics", "best", "epochs", "elapsed_s"}``.

    ``resume``: None (new run), ``"latest"`` (newest run of this recipe) or a run directory.
    ``callbacks`` are called as ``cb(epoch=..., row=..., run_dir=...)`` after each epoch is saved.
    """
    recipe, resume_dir = resolve_run(recipe, overrides, resume)
    ctx = D.setup(device)
    lock: list[RunLock] = []
    try:
        result = _train(recipe, ctx, out=out, resume_dir=resume_dir, callbacks=list(callbacks), quiet=quiet, lock=lock)
    finally:
        for held in lock:
            held.release()
    # Only on success: on a failure the process group stays up until this rank has reported its
    # error, so the other ranks' "connection closed" errors come later and the cause is reported.
    D.teardown()
    return result


def open_run_dir(run_dir: Path, lock: list, resuming: bool, log) -> dict | None:
    """Rank 0's start in a run directory: lock it, check it is writable, clean what a killed run
    left half-done, and return the last committed training state (None: start from scratch)."""
    lock.append(RunLock(run_dir).acquire())
    checkpoints = run_dir / "checkpoints"
    for folder in (run_dir, checkpoints):
        check_writable(folder)
        remove_stale_temporaries(folder)
    if not resuming:
        return None
    state = ckpt.recover(checkpoints)
    if state is None:
        log(f"dfx: {run_dir} has no checkpoint yet; training it from the start")
        for name in ("metrics.jsonl", "results.csv", "results.png"):  # nothing was committed
            (run_dir / name).unlink(missing_ok=True)
    return state


def _train(recipe: Recipe, ctx: D.Context, *, out, resume_dir, callbacks, quiet, lock) -> dict:
    t, started = recipe.train, time.perf_counter()
    progress = EpochProgress(enabled=ctx.is_main and not quiet, log_every=t.log_every)
    writer_class = tensorboard_writer_class() if t.tensorboard and ctx.is_main else None  # fail before any work
    if t.batch_size % ctx.world_size:
        raise UsageError(f"train.batch_size {t.batch_size} is the global batch; it must divide by the "
                         f"{ctx.world_size} processes")

    # data and model, identically initialised on every rank
    seed_everything(t.seed)
    task = task_module(recipe.task).Task(recipe)
    train_set = SeededDataset(task.dataset("train"), t.seed)
    val_set = task.dataset("val")
    loader = make_loader(train_set, t.batch_size // ctx.world_size, ctx, shuffle=True, seed=t.seed,
                         num_workers=t.num_workers, collate_fn=task.collate_fn)
    if len(loader) == 0:
        raise UsageError(f"train.batch_size {t.batch_size} is larger than the training set ({len(train_set)} items)")
    val_loader = make_loader(val_set, recipe.eval.batch_size, ctx, shuffle=False, seed=t.seed,
                             num_workers=t.num_workers, collate_fn=task.collate_fn)
    if hasattr(task, "data_summary"):
        progress.log(task.data_summary())
    model = task.build_model().to(ctx.device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                    else None) if ctx.distributed else model
    optimizer = build_optimizer(model, task, t)
    scheduler = build_scheduler(optimizer, t, len(loader))
    dtype = amp_dtype(t.amp, ctx.device)
    if t.amp and ctx.device.type != "cuda":
        progress.log("dfx: train.amp applies on CUDA only; training in float32 on CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay)

    # run directory: created (or found) by rank 0, shared with the others
    start_epoch, global_step, best, rows, files = 1, 0, None, [], {}
    if resume_dir is None:
        run_dir = Path(D.broadcast_object(str(new_run_dir(recipe.task, recipe.name, out)) if ctx.is_main else None, ctx))
    else:
        run_dir = resume_dir
    state = open_run_dir(run_dir, lock, resume_dir is not None, progress.log) if ctx.is_main else None
    if ctx.distributed and resume_dir is not None:  # the other ranks read what rank 0 recovered
        committed = D.broadcast_object(state is not None, ctx)
        if not ctx.is_main and committed:
            state = ckpt.load_state(run_dir / "checkpoints" / "last.state.pt")
    if state is not None:
        try:
            model.load_state_dict(ckpt.load_weights(run_dir / "checkpoints" / "last.safetensors"))
        except RuntimeError as e:
            raise RunError(f"checkpoint {run_dir}/checkpoints/last.safetensors does not fit the recipe's model: "
                           f"{str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        start_epoch, global_step, best = state["epoch"] + 1, state["global_step"], state.get("best")
        ckpt.set_rng_state(state["rng"])
        files = state.get("files", {})
        # the records committed with the state; older runs kept them only in metrics.jsonl
        rows = state.get("rows") or [r for r in read_rows(run_dir) if r["epoch"] <= state["epoch"]]
        if ctx.is_main:  # the records of exactly the committed epochs (a kill may have cut them short)
            write_rows(run_dir, rows)
            plot(run_dir, rows)
        progress.log(f"dfx: resuming {run_dir} from epoch {state['epoch']} (checkpoint verified)")
    if ctx.is_main:
        write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        if hasattr(task, "output_dir"):  # tasks that write evaluation files (predictions, plots)
            task.output_dir = run_dir
        progress.log(f"dfx: run directory {run_dir}")
    board = writer_class(log_dir=str(run_dir / "tensorboard")) if writer_class is not None else None

    last_metrics: dict = next(({k[4:]: v for k, v in r.items() if k.startswith("val/")} for r in reversed(rows)
                               if any(k.startswith("val/") for k in r)), {})
    if start_epoch > t.epochs:
        progress.log(f"dfx: {run_dir} already trained for {t.epochs} epochs; pass train.epochs=N to train longer")
    eval_model = ema.module if ema is not None else model
    for epoch in range(start_epoch, t.epochs + 1):
        loader.sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        net.train()
        progress.start(epoch, t.epochs, len(loader))
        loss_sum, t_epoch = 0.0, time.perf_counter()
        for step, batch in enumerate(loader, 1):
            batch = to_device(batch, ctx.device)
            with autocast(dtype, ctx.device):
                loss, logs = task.loss(net, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RunError(f"training loss became {value} at epoch {epoch} step {step}; lower train.lr, "
                               "set train.grad_clip, or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            scheduler.step_update(num_updates=global_step)
            if ema is not None:
                ema.update(model, step=global_step)
            loss_sum += value
            values = {"loss": value, "lr": optimizer.param_groups[0]["lr"], **logs}
            progress.step(step, values)
            if board is not None and (global_step % t.log_every == 0 or step == len(loader)):
                log_scalars(board, {f"step/{k}": v for k, v in values.items()}, global_step)
        progress.end()

        row = {"epoch": epoch, **{f"train/{k}": v for k, v in
                                  D.all_reduce_mean({"loss": loss_sum / len(loader)}, ctx).items()},
               "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t_epoch}
        improved = False
        if epoch % recipe.eval.every == 0 or epoch == t.epochs:
            last_metrics = evaluate(task, eval_model, val_loader, ctx, dtype, progress=progress.enabled)
            row.update({f"val/{k}": v for k, v in last_metrics.items()})
            value = last_metrics.get(recipe.eval.metric)
            if value is None:
                raise UsageError(f"eval.metric {recipe.eval.metric!r} is not a metric of this task; "
                                 f"available: {', '.join(last_metrics)}")
            sign = 1 if recipe.eval.mode == "max" else -1
            if best is None or sign * value > sign * best["value"]:
                best, improved = {"epoch": epoch, "value": value, "metrics": last_metrics}, True
            progress.log(f"epoch {epoch}/{t.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                if k != "epoch"))
        rows.append(row)
        if ctx.is_main:
            meta = checkpoint_metadata(recipe, task, epoch, last_metrics)
            weights = {"last": (model.state_dict(), meta)}
            if improved:
                weights["best"] = (eval_model.state_dict(), meta)
            state = {"epoch": epoch, "global_step": global_step, "best": best, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": ckpt.rng_state(),
                     "rows": rows, "files": files}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            files = ckpt.commit_epoch(run_dir / "checkpoints", weights, state)
            write_rows(run_dir, rows)  # after the commit: a resume rewrites them from the state
            plot(run_dir, rows)
            log_scalars(board, {k: v for k, v in row.items() if k != "epoch"}, epoch)
            if board is not None:
                board.flush()
        for callback in callbacks:
            callback(epoch=epoch, row=row, run_dir=run_dir)
    if board is not None:
        board.close()

    return {
        "run_dir": str(run_dir),
        "metrics": last_metrics,
        "best": {"epoch": best["epoch"], **best["metrics"]} if best else {},
        "epochs": t.epochs,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
