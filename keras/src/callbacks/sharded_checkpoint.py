"""`ShardedCheckpoint`: `OrbaxCheckpoint`'s arguments, on torch's DCP.

Keras's `OrbaxCheckpoint` saves sharded checkpoints on JAX. This callback
takes the same arguments and writes checkpoints with
`torch.distributed.checkpoint` (see `keras/src/saving/sharded_checkpoint.py`
for the format): each rank writes only its own shards, and the checkpoint
loads into any mesh, layout or world size through `model.load_weights`,
`keras.saving.load_model` or `resume=True`.

Every rank runs the callback (the callback list keeps callbacks on the
training thread under a distribution), so every rank takes part in each
save. A background save (`save_on_background=True`) stages the values on
the training thread and writes them on DCP's own thread, with its
collectives in a process group of its own so that they never interleave
with training's. At most one save is in flight: the next save, and the
end of training, wait for the one before.
"""

import warnings

from keras.src import backend
from keras.src.api_export import keras_export
from keras.src.callbacks.monitor_callback import MonitorCallback
from keras.src.saving import sharded_checkpoint


@keras_export("keras.callbacks.ShardedCheckpoint")
class ShardedCheckpoint(MonitorCallback):
    """Save sharded checkpoints of the model and optimizer (torch backend).

    Each rank writes its own shards with `torch.distributed.checkpoint`,
    so no process ever holds a sharded variable in full. Checkpoints are
    folders `step-<n>` under `directory`, where `n` is the optimizer's
    step. Load the newest with `model.load_weights(directory)` or
    `keras.saving.load_model(directory)`, under any distribution (or
    none): each variable is read into the layout it has now.

    Example:

    ```python
    checkpoint = keras.callbacks.ShardedCheckpoint(
        "/tmp/ckpt", max_to_keep=2, resume=True
    )
    # Killed and started again, `fit` goes on from the last epoch saved.
    model.fit(x, y, epochs=10, callbacks=[checkpoint])
    ```

    Args:
        directory: Folder holding the checkpoints.
        monitor: The metric `save_best_only` watches.
        verbose: 1 prints a line, on process 0, for each save.
        save_best_only: Save only when `monitor` improves.
        mode: `"auto"`, `"min"` or `"max"`, for `save_best_only`.
        save_freq: `"epoch"`, or a number of batches between saves.
        initial_value_threshold: The initial "best" value of `monitor`.
        max_to_keep: How many of the newest checkpoints to keep (`None`
            keeps all).
        save_on_background: Write checkpoints in a background thread
            while training goes on.
        save_weights_only: Leave out the optimizer and the model's config.
        resume: Restore the newest checkpoint in `directory` when
            training begins (weights, optimizer state, and the epoch to
            start from), as `BackupAndRestore` does. Resuming is exact
            with `save_freq="epoch"`: a checkpoint taken mid-epoch
            restarts that epoch from its first batch.
    """

    def __init__(
        self,
        directory,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
        max_to_keep=1,
        save_on_background=True,
        save_weights_only=False,
        resume=False,
    ):
        super().__init__(monitor, mode, initial_value_threshold)
        if save_freq != "epoch" and not (
            isinstance(save_freq, int) and save_freq > 0
        ):
            raise ValueError(
                "`save_freq` must be 'epoch' or a positive number of "
                f"batches. Received: save_freq={save_freq!r}"
            )
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(
                "`max_to_keep` must be a positive integer or None. "
                f"Received: max_to_keep={max_to_keep!r}"
            )
        self.directory = str(directory)
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_freq = save_freq
        self.max_to_keep = max_to_keep
        self.save_on_background = save_on_background
        self.save_weights_only = save_weights_only
        self.resume = resume
        self._batches_since_save = 0
        self._epoch = 0
        self._pending = None
        self._pending_folder = None
        self._background_group = None

    def on_train_begin(self, logs=None):
        if self.resume and sharded_checkpoint.is_checkpoint(self.directory):
            self._restore()

    def _restore(self):
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        info = sharded_checkpoint.load(
            model,
            self.directory,
            include_optimizer=not self.save_weights_only,
        )
        model._initial_epoch = info["epoch"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._batches_since_save += 1
        if self._batches_since_save < self.save_freq:
            return
        self._batches_since_save = 0
        if self._worth_saving(logs, f"batch {batch}"):
            self._save(epoch=self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq != "epoch":
            return
        if self._worth_saving(logs, f"epoch {epoch}"):
            self._save(epoch=epoch + 1)

    def on_train_end(self, logs=None):
        self.wait_until_finished()

    def _worth_saving(self, logs, when):
        if not self.save_best_only:
            return True
        if self.monitor_op is None:
            self._set_monitor_op()
        current = (logs or {}).get(self.monitor)
        if current is None:
            warnings.warn(
                f"Can save best model only with {self.monitor} available, "
                f"skipping the save at {when}.",
                stacklevel=2,
            )
            return False
        if not self._is_improvement(current, self.best):
            return False
        self.best = current
        return True

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            return int(backend.convert_to_numpy(optimizer.iterations))
        return self._epoch

    def _save(self, epoch):
        # One save in flight: DCP's files for the next may not start until
        # the last are complete.
        self.wait_until_finished()
        step = self._step()
        folder = sharded_checkpoint.step_folder(self.directory, step)
        in_background = self.save_on_background
        self._pending = sharded_checkpoint.save(
            self.model,
            folder,
            step=step,
            epoch=epoch,
            include_optimizer=not self.save_weights_only,
            include_config=not self.save_weights_only,
            in_background=in_background,
            process_group=self._group() if in_background else None,
        )
        self._pending_folder = folder if self._pending else None
        if self.verbose and _is_chief():
            print(f"ShardedCheckpoint: saving step {step} to {folder}")
        if self._pending is None:
            self._remove_old()

    def _group(self):
        """The process group background saves run their collectives in."""
        from keras.src.backend.torch import process_group

        if not process_group.is_multi_process():
            return None
        if self._background_group is None:
            import torch.distributed as dist

            # Every rank reaches the first save together: a collective.
            self._background_group = dist.new_group(backend="gloo")
        return self._background_group

    def wait_until_finished(self):
        """Block until the save in flight, if any, is complete."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.wait()
        self._pending_folder = None
        self._remove_old()

    def _remove_old(self):
        if self.max_to_keep is None or not _is_chief():
            return
        protect = [self._pending_folder] if self._pending_folder else []
        sharded_checkpoint.remove_old(
            self.directory, self.max_to_keep, protect=protect
        )


def _is_chief():
    from keras.src.backend.torch import process_group

    if not process_group.is_initialized():
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0
