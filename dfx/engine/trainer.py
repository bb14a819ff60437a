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
import signal
import time
from dataclasses import dataclass, field
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
from dfx.log import logger, quieted
from dfx.engine.records import log_scalars, plot, read_rows, tensorboard_writer_class, write_rows
from dfx.engine.rundir import RunLock, check_resumable, latest_run, new_run_dir
from dfx.errors import RunError, UsageError, stop_if_terminated
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
                  pin_memory=ctx.device.type == "cuda", worker_init_fn=leave_sigterm_to_the_main_process)
    if shuffle:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                     drop_last=True)
        return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.distributed else dataset
    return DataLoader(shard, shuffle=False, **kwargs)


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """Data-loader workers ignore SIGTERM. A SIGTERM to the whole process group (``timeout``,
    ``kill -TERM -PGID``, a scheduler's time limit) then stops the run through the main process
    (exit 143, the run resumable), which shuts its workers down, instead of a worker dying first
    and the run failing with "DataLoader worker ... is killed by signal: Terminated"."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
    """Train a recipe; returns ``{"run_dir", "metrics", "best", "epochs", "stopped_early", "elapsed_s"}``
    (``epochs``: the epochs trained; ``stopped_early``: ``train.patience`` ended the run).

    ``resume``: None (new run), ``"latest"`` (newest run of this recipe) or a run directory.
    ``callbacks`` are called as ``cb(epoch=..., row=..., run_dir=...)`` after each epoch is saved.
    ``quiet``: no progress and no info records on stderr (warnings and errors still show).
    """
    recipe, resume_dir = resolve_run(recipe, overrides, resume)
    ctx = D.setup(device)
    lock: list[RunLock] = []
    try:
        with quieted(quiet or not ctx.is_main):  # the other ranks: warnings and errors only
            result = _train(recipe, ctx, out=out, resume_dir=resume_dir, callbacks=list(callbacks), quiet=quiet,
                            lock=lock)
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


@dataclass
class Run:
    """A training run between its steps: what was built, and how far it has come.

    ``model`` is the plain module (its state_dict is what checkpoints hold); ``net`` is what the
    steps call: ``model`` itself, or it compiled (``train.compile``) and/or wrapped in DDP.
    ``epoch`` is the last completed epoch (0 before the first).
    """

    recipe: Recipe
    ctx: D.Context
    task: object
    train_set: SeededDataset
    loader: DataLoader
    val_loader: DataLoader
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object | None
    dtype: torch.dtype | None
    run_dir: Path | None = None
    board: object | None = None
    epoch: int = 0
    global_step: int = 0
    best: dict | None = None
    rows: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the last validation metrics

    @property
    def eval_model(self) -> torch.nn.Module:
        # Evaluation runs eager: once an epoch, on shapes that vary (detection), in eval mode --
        # compiling it would cost more recompilations than it saves.
        return self.ema.module if self.ema is not None else self.model


def build(recipe: Recipe, ctx: D.Context, progress: EpochProgress) -> Run:
    """Data, model, optimizer, scheduler, AMP scaler and EMA, identically initialised on every rank."""
    t = recipe.train
    if t.batch_size % ctx.world_size:
        raise UsageError(f"train.batch_size {t.batch_size} is the global batch; it must divide by the "
                         f"{ctx.world_size} processes")
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
    optimizer = build_optimizer(model, task, t)
    scheduler = build_scheduler(optimizer, t, len(loader))
    dtype = amp_dtype(t.amp, ctx.device)
    if t.amp and ctx.device.type != "cuda" and ctx.is_main:
        logger.warning("dfx: train.amp applies on CUDA only; training in float32 on CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay)
    # torch.compile wraps the module (its state_dict keeps plain keys); DDP wraps the compiled
    # module, as PyTorch recommends, so Dynamo does not trace DDP's hooks.
    net = torch.compile(model) if t.compile else model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device.index]
                                                        if ctx.device.type == "cuda" else None)
    return Run(recipe, ctx, task, train_set, loader, val_loader, model, net, optimizer, scheduler, scaler, ema, dtype)


def restore(run: Run, state: dict) -> None:
    """Continue from a committed training state: weights, optimizer, scheduler, scaler, EMA, RNG
    states, counters and the records of exactly the committed epochs."""
    weights = run.run_dir / "checkpoints" / "last.safetensors"
    try:
        run.model.load_state_dict(ckpt.load_weights(weights))
    except RuntimeError as e:
        raise RunError(f"checkpoint {weights} does not fit the recipe's model: {str(e).splitlines()[0]}") from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and "ema" in state:
        run.ema.module.load_state_dict(state["ema"])
    run.epoch, run.global_step, run.best = state["epoch"], state["global_step"], state.get("best")
    ckpt.set_rng_state(state["rng"])
    run.files = state.get("files", {})
    # the records committed with the state; older runs kept them only in metrics.jsonl
    run.rows = state.get("rows") or [r for r in read_rows(run.run_dir) if r["epoch"] <= state["epoch"]]
    run.metrics = next(({k[4:]: v for k, v in r.items() if k.startswith("val/")} for r in reversed(run.rows)
                        if any(k.startswith("val/") for k in r)), {})
    if run.ctx.is_main:  # the records of exactly the committed epochs (a kill may have cut them short)
        write_rows(run.run_dir, run.rows)
        plot(run.run_dir, run.rows)


def open_run(run: Run, *, out, resume_dir: Path | None, lock: list, progress: EpochProgress, writer_class) -> None:
    """Create (rank 0) or find the run directory, shared with the other ranks, and restore its
    last committed state when resuming."""
    ctx, recipe = run.ctx, run.recipe
    if resume_dir is None:
        run.run_dir = Path(D.broadcast_object(str(new_run_dir(recipe.task, recipe.name, out)) if ctx.is_main else None,
                                              ctx))
    else:
        run.run_dir = resume_dir
    state = open_run_dir(run.run_dir, lock, resume_dir is not None, progress.log) if ctx.is_main else None
    if ctx.distributed and resume_dir is not None:  # the other ranks read what rank 0 recovered
        committed = D.broadcast_object(state is not None, ctx)
        if not ctx.is_main and committed:
            state = ckpt.load_state(run.run_dir / "checkpoints" / "last.state.pt")
    if state is not None:
        restore(run, state)
        progress.log(f"dfx: resuming {run.run_dir} from epoch {state['epoch']} (checkpoint verified)")
    if ctx.is_main:
        write_text_atomic(run.run_dir / "recipe.yaml", recipe.to_yaml())
        if hasattr(run.task, "output_dir"):  # tasks that write evaluation files (predictions, plots)
            run.task.output_dir = run.run_dir
        progress.log(f"dfx: run directory {run.run_dir}")
    run.board = writer_class(log_dir=str(run.run_dir / "tensorboard")) if writer_class is not None else None


def _values(loss_window: torch.Tensor, steps: int, logs: dict, lr: float, where: str) -> dict:
    """The numbers shown at a log point: the mean loss over the ``steps`` since the last one (one
    read from the device) and the last step's logs. A non-finite loss anywhere in the window
    stops the run here."""
    loss = loss_window.item() / steps
    if not math.isfinite(loss):
        raise RunError(f"training loss became {loss} {where}; lower train.lr, set train.grad_clip, or check the data")
    return {"loss": loss, "lr": lr, **{k: float(v) for k, v in logs.items()}}


def train_epoch(run: Run, epoch: int, progress: EpochProgress) -> dict:
    """One pass over the training data; returns the epoch's row (``train/loss``, ``lr``, time).

    The loss is summed on the device and read only every ``train.log_every`` steps and at the end
    of the epoch, so a step never waits for the GPU; the non-finite check happens at those reads.
    """
    t, ctx = run.recipe.train, run.ctx
    run.loader.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    run.net.train()
    steps = len(run.loader)
    progress.start(epoch, t.epochs, steps)
    # float64 on the device: the same sums as adding the steps' losses as Python floats
    epoch_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    window, window_start, t_epoch = torch.zeros_like(epoch_sum), 1, time.perf_counter()
    for step, batch in enumerate(run.loader, 1):
        stop_if_terminated()
        batch = to_device(batch, ctx.device)
        with autocast(run.dtype, ctx.device):
            loss, logs = run.task.loss(run.net, batch)
        epoch_sum += loss.detach()
        window += loss.detach()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if t.grad_clip:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.global_step += 1
        run.scheduler.step_update(num_updates=run.global_step)
        if run.ema is not None:
            run.ema.update(run.model, step=run.global_step)
        if step % t.log_every and step != steps:
            progress.step(step)
            continue
        where = f"at epoch {epoch} step {step}" if step == window_start else \
            f"at epoch {epoch} in steps {window_start}-{step}"
        values = _values(window, step - window_start + 1, logs, run.optimizer.param_groups[0]["lr"], where)
        progress.step(step, values)
        if run.board is not None:
            log_scalars(run.board, {f"step/{k}": v for k, v in values.items()}, run.global_step)
        window.zero_()
        window_start = step + 1
    progress.end()
    mean = D.all_reduce_mean({"loss": epoch_sum.item() / steps}, ctx)
    return {"epoch": epoch, **{f"train/{k}": v for k, v in mean.items()}, "lr": run.optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t_epoch}


def validate(run: Run, epoch: int, row: dict, progress: EpochProgress) -> bool:
    """Evaluate when ``eval.every`` (or the last epoch) says so, add the metrics to ``row`` and
    keep the best; returns whether this epoch is the new best."""
    recipe = run.recipe
    if epoch % recipe.eval.every and epoch != recipe.train.epochs:
        return False
    run.metrics = evaluate(run.task, run.eval_model, run.val_loader, run.ctx, run.dtype, progress=progress.enabled)
    row.update({f"val/{k}": v for k, v in run.metrics.items()})
    value = run.metrics.get(recipe.eval.metric)
    if value is None:
        raise UsageError(f"eval.metric {recipe.eval.metric!r} is not a metric of this task; "
                         f"available: {', '.join(run.metrics)}")
    sign = 1 if recipe.eval.mode == "max" else -1
    improved = run.best is None or sign * value > sign * run.best["value"]
    if improved:
        run.best = {"epoch": epoch, "value": value, "metrics": run.metrics}
    progress.log(f"epoch {epoch}/{recipe.train.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                  if k != "epoch"))
    return improved


def out_of_patience(run: Run) -> bool:
    """Whether ``train.patience`` epochs have passed since the best evaluation. Read from the
    committed state (last epoch, best epoch), so a resumed run stops exactly where it would have."""
    patience = run.recipe.train.patience
    return patience is not None and run.best is not None and run.epoch - run.best["epoch"] >= patience


def save(run: Run, row: dict, improved: bool) -> None:
    """Record the epoch and commit its checkpoint as a unit (rank 0): last (and best) weights, the
    training state, then metrics.jsonl / results.csv / plots and tensorboard."""
    run.rows.append(row)
    run.epoch = row["epoch"]
    if not run.ctx.is_main:
        return
    meta = checkpoint_metadata(run.recipe, run.task, run.epoch, run.metrics)
    weights = {"last": (run.model.state_dict(), meta)}
    if improved:
        weights["best"] = (run.eval_model.state_dict(), meta)
    state = {"epoch": run.epoch, "global_step": run.global_step, "best": run.best,
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": ckpt.rng_state(), "rows": run.rows, "files": run.files}
    if run.ema is not None:
        state["ema"] = run.ema.module.state_dict()
    run.files = ckpt.commit_epoch(run.run_dir / "checkpoints", weights, state)
    write_rows(run.run_dir, run.rows)  # after the commit: a resume rewrites them from the state
    plot(run.run_dir, run.rows)
    log_scalars(run.board, {k: v for k, v in row.items() if k != "epoch"}, run.epoch)
    if run.board is not None:
        run.board.flush()


def _train(recipe: Recipe, ctx: D.Context, *, out, resume_dir, callbacks, quiet, lock) -> dict:
    t, started = recipe.train, time.perf_counter()
    progress = EpochProgress(enabled=ctx.is_main and not quiet)
    writer_class = tensorboard_writer_class() if t.tensorboard and ctx.is_main else None  # fail before any work
    run = build(recipe, ctx, progress)
    open_run(run, out=out, resume_dir=resume_dir, lock=lock, progress=progress, writer_class=writer_class)
    if run.epoch >= t.epochs and ctx.is_main:
        logger.warning(f"dfx: {run.run_dir} already trained for {t.epochs} epochs; pass train.epochs=N to train longer")
    for epoch in range(run.epoch + 1, t.epochs + 1):
        if out_of_patience(run):
            progress.log(f"dfx: stopping early after epoch {run.epoch}: {recipe.eval.metric} has not improved since "
                         f"epoch {run.best['epoch']} (train.patience {t.patience})")
            break
        row = train_epoch(run, epoch, progress)
        improved = validate(run, epoch, row, progress)
        save(run, row, improved)
        for callback in callbacks:
            callback(epoch=epoch, row=row, run_dir=run.run_dir)
    if run.board is not None:
        run.board.close()
    return {
        "run_dir": str(run.run_dir),
        "metrics": run.metrics,
        "best": {"epoch": run.best["epoch"], **run.best["metrics"]} if run.best else {},
        "epochs": run.epoch,
        "stopped_early": run.epoch < t.epochs,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
